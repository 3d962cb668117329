"""The reward pre-flight (`trl-polar preflight`) and the warning of a training run that did not move the model."""

from __future__ import annotations

import json
import logging
import random
import subprocess
import sys

import pytest
import torch
from datasets import Dataset

from trl_polar import PolarConfig, PolarRewardTrainer
from trl_polar.movement import unmoved
from trl_polar.preflight import perturb, preflight
from trl_polar.scorer import PolarScorer
from trl_polar.tiny import build_tiny_causal_lm, build_tiny_tokenizer

POLICIES = [
    ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "plum"],
    ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"],
    ["cat", "dog", "horse", "mouse", "tiger", "zebra", "camel", "eagle"],
]


def _answer(rng: random.Random, policy: int) -> str:
    return " ".join(rng.choice(POLICIES[policy]) for _ in range(rng.randint(4, 9)))


def rl_rows(n: int, seed: int) -> list[dict[str, str]]:
    """RL rows: a prompt and its reference, the references' policies taking turns."""
    rng = random.Random(seed)
    return [{"prompt": f"Describe item {i}.", "reference": _answer(rng, i % 3)} for i in range(n)]


def training_rows(n: int, seed: int) -> list[dict[str, str]]:
    """Triples that teach what the pre-flight expects: a copy above a perturbed copy above another policy's answer."""
    rng = random.Random(seed)
    rows = []
    for row in rl_rows(n, seed):
        a = next(k for k, words in enumerate(POLICIES) if row["reference"].split()[0] in words)
        other = _answer(rng, rng.choice([k for k in range(3) if k != a]))
        near = perturb(row["reference"], rng.randrange(1000))
        chosen, rejected = (row["reference"], near) if rng.random() < 0.5 else (near, other)
        rows.append({**row, "chosen": chosen, "rejected": rejected})
    return rows


@pytest.fixture(scope="module")
def trained_rm(tmp_path_factory) -> str:
    backbone, out = tmp_path_factory.mktemp("preflight_backbone"), tmp_path_factory.mktemp("preflight_rm")
    corpus = [" ".join(words) for words in POLICIES] * 10 + ["Describe item 12."] * 10
    build_tiny_causal_lm(build_tiny_tokenizer(corpus=corpus, polar_tokens=False), seed=1234, out_dir=backbone)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the summation order, hence the numbers, of every run
    try:
        args = PolarConfig(output_dir=str(out), max_steps=200, per_device_train_batch_size=16, learning_rate=5e-4,
                           logging_steps=1000, save_strategy="no", report_to="none", use_cpu=True, seed=0,
                           disable_tqdm=True, max_length=256, max_response_length=64)  # fmt: skip
        trainer = PolarRewardTrainer(model=str(backbone), args=args, train_dataset=Dataset.from_list(
            training_rows(3200, seed=1)))  # fmt: skip
        trainer.train()
        trainer.save_model(str(out))
    finally:
        torch.set_num_threads(threads)
    return str(out)


def _preflight_cli(model: str, data, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trl_polar.cli", "preflight", "--model", model, "--data", str(data), "--rows", "24",
         "--device", "cpu", *extra],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def test_preflight_passes_a_trained_model_on_held_out_rl_rows(trained_rm, tmp_path):
    data = tmp_path / "rl.jsonl"
    # 24 rows, every --rows of them: each row's "wrong" answer (the next row's reference) is another policy's.
    data.write_text("".join(json.dumps(r) + "\n" for r in rl_rows(24, seed=99)))
    out = _preflight_cli(trained_rm, data, "--json")
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["passed"] and report["rows"] == 24
    means = {kind: report["scores"][kind]["mean"] for kind in ("copy", "perturbed", "wrong")}
    assert means["copy"] > means["perturbed"] > means["wrong"]
    assert all(rate >= 0.8 for rate in report["agreement"].values())
    # The same numbers from the library.
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    again = preflight(PolarScorer(trained_rm, device="cpu", dtype="fp32"), [r["prompt"] for r in rows],
                      [r["reference"] for r in rows])  # fmt: skip
    assert again.scores["copy"]["mean"] == pytest.approx(means["copy"], abs=1e-4)


def test_preflight_fails_an_untrained_model_with_exit_1(tiny_qwen2_rm_dir, tmp_path):
    data = tmp_path / "rl.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rl_rows(40, seed=99)))
    out = _preflight_cli(tiny_qwen2_rm_dir, data)
    assert out.returncode == 1, out.stdout + out.stderr[-2000:]
    assert out.stdout.startswith("Reward pre-flight on 24 rows: FAIL")
    assert "- [ ] copy well above wrong" in out.stdout


def test_preflight_names_a_missing_column(tiny_qwen2_rm_dir, tmp_path):
    data = tmp_path / "rl.jsonl"
    data.write_text(json.dumps({"prompt": "p", "answer": "a"}) + "\n" + json.dumps({"prompt": "q", "answer": "b"}))
    out = _preflight_cli(tiny_qwen2_rm_dir, data)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith(f"Error: {data}: no column(s) ['reference']")


def test_a_run_whose_only_step_had_learning_rate_0_warns(tmp_path, tiny_qwen2_rm_dir, caplog):
    rows = Dataset.from_list(training_rows(8, seed=2))
    common = {"per_device_train_batch_size": 4, "learning_rate": 1e-3, "save_strategy": "no", "report_to": "none",
              "use_cpu": True, "disable_tqdm": True, "max_length": 256, "max_response_length": 64}  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="trl_polar.movement"):
        # One step with a one-step linear warmup: the step runs at learning rate 0.
        PolarRewardTrainer(model=tiny_qwen2_rm_dir, train_dataset=rows, args=PolarConfig(
            output_dir=str(tmp_path / "a"), max_steps=1, warmup_steps=1, **common)).train()  # fmt: skip
    assert "TRAINING DID NOT MOVE THE MODEL: all 1 optimizer step(s) ran at learning rate 0" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trl_polar.movement"):
        PolarRewardTrainer(model=tiny_qwen2_rm_dir, train_dataset=rows, args=PolarConfig(
            output_dir=str(tmp_path / "b"), max_steps=1, warmup_steps=0, **common)).train()  # fmt: skip
    assert "DID NOT MOVE" not in caplog.text


def test_a_head_left_at_zero_is_named():
    zeros = [torch.zeros(1, 4)]
    assert "still all zeros" in unmoved([1e-3], zeros, [z.clone() for z in zeros])
    assert unmoved([1e-3], zeros, [torch.ones(1, 4)]) is None
