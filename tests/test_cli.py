"""The `trl-polar` CLI skeleton: version and format, run as users run them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from trl_polar import PolarTemplate, __version__


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trl_polar.cli", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_version():
    out = run_cli("version")
    assert out.returncode == 0
    assert out.stdout.splitlines()[0] == f"trl-polar {__version__}"
    assert any(line.startswith("trl 1.16") for line in out.stdout.splitlines())


def test_format_prints_the_clients_text_and_token_count(tiny_qwen2_rm_dir):
    out = run_cli("format", "--model", tiny_qwen2_rm_dir, "--prompt", "2+2?", "--reference", "4", "--candidate", "4!")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "2+2?\n4<|reward|>2+2?\n4![UNUSED_TOKEN_130]\n"
    n = len(PolarTemplate.from_pretrained(tiny_qwen2_rm_dir).encode("2+2?", "4", "4!"))
    assert f"tokens: {n} (max_length 16384)" in out.stderr and "truncated: nothing" in out.stderr


def test_format_reads_a_jsonl_row_and_reports_truncation(tmp_path, tiny_tokenizer_dir):
    rows = [
        {"prompt": "first", "reference": "a", "chosen": "b"},
        {
            "prompt": [{"role": "user", "content": "one two three four five six seven"}],
            "reference": "x",
            "chosen": "y",
        },
    ]
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = run_cli(
        "format", "--tokenizer", tiny_tokenizer_dir, "--data", str(data), "--row", "1",
        "--candidate-column", "chosen", "--max-length", "16", "--json",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    template = PolarTemplate(AutoTokenizer.from_pretrained(tiny_tokenizer_dir), max_length=16)
    expected = template.build(rows[1]["prompt"], "x", "y")
    assert report["num_tokens"] == len(expected.input_ids) <= 16
    assert report["truncated"] == {"prompt": {"original": expected.prompt.original, "kept": expected.prompt.kept}}
    assert report["text"].endswith("seven\ny[UNUSED_TOKEN_130]")


def test_errors_are_one_line(tmp_path, tiny_tokenizer_dir):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"prompt": "p", "chosen": "c"}) + "\n")
    out = run_cli("format", "--tokenizer", tiny_tokenizer_dir, "--data", str(data))
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"Error: {data}: row 0 lacks column(s) ['reference', 'candidate'] (it has ['chosen', 'prompt']); "
        "use --candidate-column to name the candidate's column."
    ]
    out = run_cli("format", "--tokenizer", tiny_tokenizer_dir, "--data", str(data), "--row", "3")
    expected = f"Error: {data}: has no row at index 3 (it has 1 rows, at indices 0 to 0)."
    assert out.returncode == 1 and out.stderr.strip() == expected
    out = run_cli("format", "--tokenizer", tiny_tokenizer_dir, "--prompt", "p", "--reference", "r",
                  "--candidate", "c", "--wrapper", "chat")  # fmt: skip
    assert out.returncode == 1 and out.stderr.startswith("Error: `wrapper` must be one of ('sft', 'pretrain')")
    assert "Traceback" not in out.stderr


def test_scaling_prints_the_papers_numbers():
    out = run_cli("scaling", "--params", "1.8e9", "--base-tokens", "2.5e12", "--rm-tokens", "0.94e12")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "learning rate:   1.429e-05 (peak)" in lines and "batch size:      1940 samples per optimizer step" in lines
    out = run_cli("scaling", "--params", "7e9", "--base-tokens", "4e12", "--rm-tokens", "3.6e12",
                  "--tokens-per-sample", "8192")  # fmt: skip
    lines = out.stdout.splitlines()
    assert "learning rate:   1.674e-05 (peak)" in lines and "batch size:      4343 samples per optimizer step" in lines
    assert "steps:           101,187 at 8,192 tokens per sample (3.558e+07 tokens per step)" in lines


def test_scaling_fits_a_csv(tmp_path):
    runs = tmp_path / "runs.csv"
    runs.write_text("compute,loss\n1e18,2.0\n1e19,1.0\n1e20,0.5\n")
    out = run_cli("scaling", "--fit", str(runs), "--plot", str(tmp_path / "fit.png"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("loss = 524288 * compute^-0.30103   (R^2 = 1.0000)")
    assert (tmp_path / "fit.png").stat().st_size > 1000
    runs.write_text("flops,loss\n1,2\n")
    out = run_cli("scaling", "--fit", str(runs))
    assert out.returncode == 1
    assert out.stderr.strip() == f"Error: {runs}: needs columns compute and loss; missing ['compute']."


def test_convert_command(tmp_path, shared_fixtures):
    out = run_cli(
        "convert", str(shared_fixtures / "internlm2_reward_tiny"), str(tmp_path / "out"),
        "--tokenizer", str(shared_fixtures / "bpe_tokenizer_with_bos"),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert PolarTemplate.from_pretrained(tmp_path / "out").reward_token_id == 1999


def test_train_from_yaml_with_flag_overrides(tmp_path, tiny_qwen2_lm_dir):
    row = {"reference": "one two", "chosen": "one two three", "rejected": "ALPHA"}
    rows = [{"prompt": f"q{i}", **row} for i in range(8)]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = tmp_path / "train.yaml"
    config.write_text(
        f"model_name_or_path: {tiny_qwen2_lm_dir}\ntrain_data: {data}\noutput_dir: {tmp_path / 'yaml-out'}\n"
        "max_steps: 1\nper_device_train_batch_size: 4\nmax_length: 256\nmax_response_length: 64\n"
        "report_to: none\nuse_cpu: true\nsave_strategy: 'no'\nbatching: padded\n"
    )
    out = run_cli("train", "--config", str(config), "--max_steps", "2", "--output_dir", str(tmp_path / "flag-out"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert not (tmp_path / "yaml-out").exists()  # the flag overrode the file
    saved = json.loads((tmp_path / "flag-out" / "config.json").read_text())
    assert saved["polar_template"]["max_length"] == 256 and saved["polar_template"]["max_response_length"] == 64
    assert PolarTemplate.from_pretrained(tmp_path / "flag-out").max_response_length == 64
    # The value head starts at zero; two optimizer steps on real pairs moved it.
    from transformers import AutoModelForSequenceClassification

    head = AutoModelForSequenceClassification.from_pretrained(tmp_path / "flag-out").score.weight
    assert head.abs().sum().item() > 0
    bad = run_cli("train", "--config", str(config), "--batching", "sideways")
    assert bad.returncode == 2 and "invalid choice: 'sideways'" in bad.stderr
    config.write_text("learning_rat: 0.1\n")
    bad = run_cli("train", "--config", str(config))
    assert bad.returncode == 1 and "unknown field(s) ['learning_rat']" in bad.stderr


def test_score_and_evaluate_commands(tmp_path, tiny_qwen2_rm_dir):
    from trl_polar.scorer import PolarScorer

    rows = [{"prompt": f"What is {i} + {i}?", "reference": str(2 * i), "output": f"It is {2 * i + k}."}
            for i in range(3) for k in range(2)]  # fmt: skip
    data = tmp_path / "in.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = run_cli("score", "--model", tiny_qwen2_rm_dir, "--data", str(data), "--output", str(tmp_path / "out.jsonl"))
    assert out.returncode == 0, out.stderr[-2000:]
    scored = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    expected = PolarScorer(tiny_qwen2_rm_dir).score(
        [r["prompt"] for r in rows], [r["reference"] for r in rows], [r["output"] for r in rows]
    )
    assert [r["reward"] for r in scored] == pytest.approx(expected, abs=1e-5)
    assert [r["output"] for r in scored] == [r["output"] for r in rows]

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps(
        {"prompt": r["prompt"], "reference": r["reference"], "chosen": r["output"], "rejected": "no idea"}
    ) for r in rows) + "\n")  # fmt: skip
    out = run_cli("evaluate", "--model", tiny_qwen2_rm_dir, "--data", str(pairs), "--out", str(tmp_path / "eval"))
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["protocol"] == "pairwise" and report["num_rows"] == 6
    assert f"- accuracy: {report['accuracy']:.4f}" in out.stdout


def test_the_command_line_starts_without_torch_or_fastapi():
    code = "import sys, trl_polar.cli; print(sorted(m for m in ('torch', 'fastapi') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
