"""Policy-pool synthesis with tiny random policies: triple rules, determinism, counted removals, kill -9 and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer
from typer.testing import CliRunner

from trl_polar.cli import app
from trl_polar.data import (
    DataError,
    Generation,
    Policy,
    PromptConfig,
    SamplingConfig,
    SynthesisConfig,
    find_loop,
    read_rows,
    sample_prompts,
    synthesize,
    trim_incomplete_ending,
    trim_loop,
)
from trl_polar.tiny import build_tiny_causal_lm

DATA = Path(__file__).parent / "data"
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
COLUMNS = {
    "prompt", "reference", "chosen", "rejected", "policy_a", "policy_b", "prompt_id", "kind", "wrapper",
    "loop_trimmed", "ending_trimmed", "seed", "shard", "backend", "temperature", "top_p", "top_k", "max_new_tokens",
}  # fmt: skip


@pytest.fixture(scope="module")
def pool(tmp_path_factory, plain_tokenizer_dir):
    """Three base policies and two chat policies: tiny random models, each with its own seed (a different policy)."""
    root = tmp_path_factory.mktemp("pool")
    specs = []
    for i in range(5):
        tokenizer = AutoTokenizer.from_pretrained(plain_tokenizer_dir)
        kind = "base" if i < 3 else "chat"
        if kind == "chat":
            tokenizer.chat_template = CHAT_TEMPLATE
        build_tiny_causal_lm(tokenizer, seed=i, out_dir=root / f"p{i}")
        specs.append(f"p{i}={root / f'p{i}'}" + (":base" if i == 0 else ""))  # p1.. auto-detected from the template
    return specs


@pytest.fixture(scope="module")
def prompts(plain_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(plain_tokenizer_dir)
    config = PromptConfig(num_prompts=10, max_prefix_tokens=12, instruction_share=0.2, seed=3)
    return sample_prompts(str(DATA / "corpus.jsonl"), tokenizer, config, instructions=str(DATA / "instructions.jsonl"))


def _config(out, pool, **overrides):
    sampling = SamplingConfig(max_new_tokens=overrides.pop("max_new_tokens", 6))
    params = {"out_dir": str(out), "policies": pool, "shard_size": 3, "batch_size": 4, "max_loaded_policies": 5,
              "progress": False, "sampling": sampling}  # fmt: skip
    params.update(overrides)
    return SynthesisConfig(**params)


def test_policy_specs_are_parsed_and_kinds_detected(pool):
    assert Policy.parse("a=some/model:chat") == Policy("a", "some/model", "chat")
    assert Policy.parse("C:/models/x:base").path == "C:/models/x"
    assert [Policy.parse(s).kind for s in pool] == ["base", "base", "base", "chat", "chat"]
    with pytest.raises(ValueError, match="kind must be one of"):
        Policy("a", "b", "instruct")


def test_triples_follow_the_paper_and_every_prompt_is_accounted_for(tmp_path, pool, prompts):
    result = synthesize(prompts, _config(tmp_path / "run", pool))
    rows = result.rows()
    assert result.complete and len(result.files) == 4  # 10 prompts, 3 per shard
    assert all(set(row) == COLUMNS for row in rows)
    counts = result.totals
    drops = sum(v for k, v in counts.items() if k.startswith("dropped"))
    assert counts["prompts"] == 10 and counts["triples"] == len(rows) == 10 - drops
    assert counts["generations"] == 30  # 2 trajectories from A, 1 from B, per prompt
    assert len({row["prompt_id"] for row in rows}) == len(rows)
    by_id = {row["prompt_id"]: row for row in prompts.rows}
    kinds = {"base": {"p0", "p1", "p2"}, "chat": {"p3", "p4"}}
    for row in rows:
        assert row["policy_a"] != row["policy_b"]
        source = by_id[row["prompt_id"]]
        assert row["prompt"] == source["prompt"] and row["kind"] == source["kind"]
        pool_of_kind = kinds["chat"] if row["kind"] == "instruction" else kinds["base"]
        assert {row["policy_a"], row["policy_b"]} <= pool_of_kind  # instructions only go to chat policies
        assert row["wrapper"] == ("sft" if row["kind"] == "instruction" else "pretrain")
        assert (row["temperature"], row["top_p"], row["top_k"], row["max_new_tokens"]) == (1.0, 0.9, 50, 6)
        assert row["chosen"] != row["rejected"]
    assert sum(row["kind"] == "instruction" for row in rows) == 2
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["complete"] and [s["rows"] for s in manifest["shards"]] == [3, 3, 3, 1]


def test_same_seed_same_triples_other_seed_other_triples(tmp_path, pool, prompts):
    subset = prompts.rows[:4]
    first = synthesize(subset, _config(tmp_path / "a", pool, output_format="jsonl")).rows()
    again = synthesize(subset, _config(tmp_path / "b", pool, output_format="jsonl")).rows()
    other = synthesize(subset, _config(tmp_path / "c", pool, output_format="jsonl", seed=1)).rows()
    assert first == again
    assert [r["chosen"] for r in first] != [r["chosen"] for r in other]


def test_a_finished_run_is_not_redone_and_other_settings_are_refused(tmp_path, pool, prompts):
    subset = prompts.rows[:4]
    config = _config(tmp_path / "run", pool)
    synthesize(subset, config)
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").glob("shard-*")}
    assert len(stamps) == 4  # two shards, data and counts
    synthesize(subset, config)
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").glob("shard-*")}
    with pytest.raises(DataError, match=r"other settings \(seed: was 0, now 5\)"):
        synthesize(subset, _config(tmp_path / "run", pool, seed=5))


KILLED_RUN = """
import os, signal, sys
from pathlib import Path
from transformers import AutoTokenizer
from trl_polar.data import PromptConfig, SamplingConfig, SynthesisConfig, sample_prompts, synthesize
out, tokenizer_dir, kill_at, kill_on, *pool = sys.argv[1:]
renames = {{"seen": 0}}
replace = os.replace  # every atomic write renames through it (trl_polar.atomic)

def replace_or_die(tmp, final):
    # The kill point: the temporary file is written in full, the rename has not happened (what a kill -9 in the
    # middle of any atomic write leaves behind).
    if Path(final).name == kill_at:
        renames["seen"] += 1
        if renames["seen"] == int(kill_on):
            os.kill(os.getpid(), signal.SIGKILL)
    replace(tmp, final)

os.replace = replace_or_die
prompts = sample_prompts({corpus!r}, AutoTokenizer.from_pretrained(tokenizer_dir),
                         PromptConfig(num_prompts=6, max_prefix_tokens=12, seed=3))
synthesize(prompts, SynthesisConfig(out_dir=out, policies=pool, shard_size=1, batch_size=4, max_loaded_policies=5,
                                    progress=False, sampling=SamplingConfig(max_new_tokens=8)))
"""


@pytest.mark.parametrize(
    ("kill_at", "kill_on", "complete_shards", "left"),
    [
        ("shard-00002.parquet", 1, 2, ".tmp-shard-00002.parquet-*"),  # during a shard's data write
        ("shard-00002.json", 1, 2, ".tmp-shard-00002.json-*"),  # data renamed, its counts file not yet
        ("manifest.json", 4, 4, ".tmp-manifest.json-*"),  # during the fourth manifest write
    ],
)
def test_kill_9_then_resume_loses_and_duplicates_nothing(
    tmp_path, pool, plain_tokenizer_dir, kill_at, kill_on, complete_shards, left
):
    base = pool[:3]
    out = tmp_path / "killed"
    script = KILLED_RUN.format(corpus=str(DATA / "corpus.jsonl"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-c", script, str(out), plain_tokenizer_dir, kill_at, str(kill_on), *base]
    process = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
    assert process.returncode == -signal.SIGKILL, process.stderr.decode()[-2000:]
    assert len(list(out.glob("shard-*.json"))) == complete_shards
    assert len(list(out.glob(left))) == 1  # the partial write the kill left behind

    tokenizer = AutoTokenizer.from_pretrained(plain_tokenizer_dir)
    prompts = sample_prompts(str(DATA / "corpus.jsonl"), tokenizer, PromptConfig(num_prompts=6, max_prefix_tokens=12,
                                                                                 seed=3))  # fmt: skip
    resumed = synthesize(prompts, _config(out, base, shard_size=1, max_new_tokens=8))
    whole = synthesize(prompts, _config(tmp_path / "whole", base, shard_size=1, max_new_tokens=8))
    assert resumed.complete and not list(out.glob(".tmp-*"))
    assert resumed.rows() == whole.rows()  # nothing lost, nothing duplicated, same trajectories
    assert resumed.totals == whole.totals
    assert sorted(r["prompt_id"] for r in resumed.rows()) == sorted(r["prompt_id"] for r in prompts.rows)


class ScriptedBackend:
    """Replays fixed trajectories: random tiny policies never produce loops, empty or identical answers on cue,
    and those are the cases whose counting is under test. Everything around the backend is the real code."""

    name = "scripted"

    def __init__(self, script):
        self.script = script

    def generate(self, policy, requests, sampling, seed):
        return [self.script[(policy.name, request.text)].pop(0) for request in requests]

    def decode(self, policy, token_ids):
        return " ".join(f"w{t}" if t >= 0 else "end." for t in token_ids)

    def close(self):
        pass


def test_loops_are_trimmed_not_dropped_and_every_removal_is_counted(tmp_path, pool):
    rows = [{"prompt_id": str(i), "prompt": f"prompt {i}"} for i in range(4)]
    rows.append({"prompt_id": "9", "prompt": "prompt 0"})  # an exact duplicate prompt under another id
    config = _config(tmp_path / "scripted", pool[:2], shard_size=10, max_new_tokens=100)
    loop = Generation([7] + [1, 2, 3] * 20, False)
    script = {}
    plan = {  # (A's two trajectories, B's one) per prompt
        "prompt 0": ([loop, Generation([4, -1, 5], False)], [Generation([8], True)]),  # loop kept, ending trimmed
        "prompt 1": ([Generation([], True), Generation([1], True)], [Generation([2], True)]),  # empty reference
        "prompt 2": ([Generation([3], True), Generation([6], True)], [Generation([6], True)]),  # chosen == rejected
        "prompt 3": ([Generation([3], True), Generation([5, 6], False)], [Generation([9], True)]),  # no sentence end
    }
    from trl_polar.data import Synthesizer

    synthesizer = Synthesizer(config, backend=ScriptedBackend(script))
    for i in range(4):
        a, b = synthesizer.draw_pair(str(i), "prefix")
        script.setdefault((a.name, f"prompt {i}"), []).extend(plan[f"prompt {i}"][0])
        script.setdefault((b.name, f"prompt {i}"), []).extend(plan[f"prompt {i}"][1])
    result = synthesizer.run(rows)
    out = result.rows()
    assert [r["prompt_id"] for r in out] == ["0", "3"]
    assert out[0]["reference"] == "w7 w1 w2 w3 w1 w2 w3" and out[0]["loop_trimmed"] == "reference"
    assert out[0]["chosen"] == "w4 end." and out[0]["ending_trimmed"] == "chosen"
    assert out[1]["chosen"] == "w5 w6"  # no sentence end to cut back to: kept and counted
    totals = result.totals
    assert totals["duplicate_prompts"] == 1 and totals["prompts"] == 4 and totals["triples"] == 2
    assert totals["dropped_empty"] == 1 and totals["dropped_chosen_equals_rejected"] == 1
    assert totals["loops_trimmed"] == 1 and totals["endings_trimmed"] == 1 and totals["endings_untrimmable"] == 1


def test_loop_and_ending_helpers():
    assert find_loop([5, 6] + [1, 2, 3] * 12, min_tokens=9).period == 3
    assert find_loop(list(range(100))) is None
    assert find_loop([1, 2, 3, 4] * 3) is None  # 3 copies: below min_repeats=4
    assert trim_loop([9] + [4] * 50)[0] == [9, 4, 4]
    assert trim_incomplete_ending("First. Second sentence is cut") == ("First.", True)
    assert trim_incomplete_ending("Line one\nline two is cut") == ("Line one", True)
    assert trim_incomplete_ending("no end at all") == ("no end at all", False)
    assert trim_incomplete_ending("Version 3.5 is out") == ("Version 3.5 is out", False)  # a decimal point is no end


def test_pool_too_small_for_a_prompt_kind_is_a_clear_error(tmp_path, pool, prompts):
    with pytest.raises(DataError, match=r"instruction prompts need at least two chat policies"):
        synthesize(prompts, _config(tmp_path / "x", pool[:3]))


def _cli_args(out, pool):
    args = ["build-data", "--corpus", str(DATA / "corpus.jsonl"), "--out", str(out),  # one prompt per document
            "--max-new-tokens", "4", "--max-prefix-tokens", "8", "--shard-size", "2", "--output-format", "jsonl",
            "--no-progress", "--max-loaded-policies", "3"]  # fmt: skip
    for spec in pool[:3]:
        args += ["--policy", spec]
    return args


def test_build_data_cli(tmp_path, pool):
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, _cli_args(out, pool))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["complete"] and report["counts"]["prompts"] == 9
    assert report["counts"]["prompt_sampling_empty_documents"] == 1  # corpus.jsonl has one empty document
    rows = [row for k in range(5) for row in read_rows(out / f"shard-{k:05d}.jsonl")]
    assert len(rows) == report["counts"]["triples"]


@pytest.mark.multiprocess
def test_two_ranks_under_accelerate_launch_make_the_same_shards_as_one_process(tmp_path, pool):
    """Each rank makes its own shards (r, r + 2, ...) and the result equals a one-process run, shard for shard."""
    single, double = tmp_path / "one", tmp_path / "two"
    assert CliRunner().invoke(app, _cli_args(single, pool)).exit_code == 0
    launcher = Path(sys.executable).with_name("accelerate")
    command = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "trl_polar.cli",
               *_cli_args(double, pool)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    # Two real ranks, each with its own shards (a launch that silently ran one process twice would say "0 of 1").
    assert "rank 0 of 2 made shards [0, 2, 4]" in done.stderr and "rank 1 of 2 made shards [1, 3]" in done.stderr
    for k in range(5):
        assert read_rows(double / f"shard-{k:05d}.jsonl") == read_rows(single / f"shard-{k:05d}.jsonl")
    assert json.loads((double / "manifest.json").read_text()) == json.loads((single / "manifest.json").read_text())


def test_vllm_backend_is_optional_and_says_how_to_install_it():
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("vLLM is installed here; this test covers machines without it")
    from trl_polar.data import VLLMBackend

    with pytest.raises(ImportError, match=r"pip install 'trl-polar\[vllm\]'"):
        VLLMBackend()


def _sentencepiece_policy(out_dir: Path, bigrams: dict[str, str]) -> str:
    """A real Llama policy over a SentencePiece-style word tokenizer (Metaspace pre-tokenizer and decoder, as
    Llama-2, Yi or Gemma) that continues text along `bigrams`: its layers add nothing (zero output projections) and
    its head reads the current token, so sampling follows the table whatever the temperature."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|reward|>", "[UNUSED_TOKEN_130]"]
    vocab = {token: i for i, token in enumerate(specials + ["▁Hello", "▁world", "▁again", "▁there"])}
    model = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    model.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    model.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>", additional_special_tokens=specials[4:])  # fmt: skip
    ids = {"bos_token_id": vocab["<s>"], "eos_token_id": vocab["</s>"], "pad_token_id": vocab["<pad>"]}
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False, **ids)  # fmt: skip
    lm = LlamaForCausalLM(config)
    with torch.no_grad():
        for parameter in lm.parameters():
            parameter.zero_()
        lm.model.embed_tokens.weight[:, : len(vocab)] = torch.eye(len(vocab))
        for name, parameter in lm.named_parameters():
            if name.endswith("norm.weight"):
                parameter.fill_(1.0)
        for current, following in bigrams.items():
            lm.lm_head.weight[vocab[following], vocab[current]] = 30.0
    lm.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)


def test_a_sentencepiece_policy_keeps_the_space_where_its_continuation_meets_the_prefix(tmp_path):
    from trl_polar.template import PolarTemplate

    a = _sentencepiece_policy(tmp_path / "a", {"▁Hello": "▁world", "▁world": "▁again", "▁again": "</s>"})
    b = _sentencepiece_policy(tmp_path / "b", {"▁Hello": "▁there", "▁there": "</s>"})
    tokenizer = AutoTokenizer.from_pretrained(a)
    continuation = tokenizer("▁world again", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(continuation) == ["▁world", "▁again"]
    assert tokenizer.decode(continuation) == "world again"  # decoded alone, the seam's space is gone

    config = SynthesisConfig(out_dir=str(tmp_path / "out"), policies=[f"a={a}:base", f"b={b}:base"], progress=False,
                             sampling=SamplingConfig(max_new_tokens=6))  # fmt: skip
    result = synthesize([{"prompt": "Hello"}], config)
    (row,) = result.rows()
    said = {"a": " world again", "b": " there"}
    assert (row["prompt"], row["kind"], row["wrapper"]) == ("Hello", "prefix", "pretrain")
    assert (row["reference"], row["chosen"], row["rejected"]) == (
        said[row["policy_a"]],
        said[row["policy_a"]],
        said[row["policy_b"]],
    )
    assert row["prompt"] + said["a"] == "Hello world again"
    assert result.totals["triples"] == 1 and "seam_decoded_alone" not in result.totals

    # The template's 'pretrain' wrapper joins prompt and response directly: it too keeps the space, whether the
    # response carries it or not (a Metaspace tokenizer encodes " world" and "world" alike); 'sft' is unchanged.
    template = PolarTemplate(tokenizer)
    for reference in (" world again", "world again"):
        assert template.format("Hello", reference, " there", wrapper="pretrain") == (
            "Hello world again<|reward|>Hello there[UNUSED_TOKEN_130]"
        )
    assert (
        template.format("Hello", "world again", "there")
        == "Hello\nworld again<|reward|>Hello\nthere[UNUSED_TOKEN_130]"
    )
    ids = template.encode("Hello", " world again", " there", wrapper="pretrain")
    assert tokenizer.convert_ids_to_tokens(ids) == [
        "<s>", "▁Hello", "▁world", "▁again", "<|reward|>", "▁Hello", "▁there", "[UNUSED_TOKEN_130]"
    ]  # fmt: skip
