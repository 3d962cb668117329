"""PolarRewardTrainer: exact batching modes, TRL-equal loss, learning, saving, LoRA, resume, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from toy_data import toy_rows
from transformers import AutoModelForSequenceClassification

from trl_polar.cli.train import parse_train_args
from trl_polar.config import PolarConfig
from trl_polar.template import PolarTemplate
from trl_polar.trainer import PolarRewardTrainer

FAST = {
    "use_cpu": True,
    "bf16": False,
    "report_to": "none",
    "gradient_checkpointing": False,
    "save_strategy": "no",
    "max_length": 1024,
    "max_response_length": 384,
    "per_device_train_batch_size": 4,
    "logging_steps": 1,
    "dataloader_num_workers": 0,
    "disable_tqdm": True,
}


def _config(tmp_path, **overrides) -> PolarConfig:
    return PolarConfig(output_dir=str(tmp_path / "out"), **{**FAST, **overrides})


def _load(model_dir, attn="sdpa"):
    return AutoModelForSequenceClassification.from_pretrained(model_dir, attn_implementation=attn, dtype=torch.float32)


def _loss_and_grads(trainer, rows):
    model = trainer.model
    model.train()
    model.zero_grad()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in rows])
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize(
    ("arch", "attn", "ranked"),
    [("qwen2", "sdpa", False), ("qwen2", "eager", False), ("llama", "sdpa", False), ("qwen2", "eager", True)],
)
def test_batching_modes_give_padded_loss_and_gradients(tmp_path, request, arch, attn, ranked):
    model_dir = request.getfixturevalue(f"tiny_{arch}_rm_dir")
    ds = Dataset.from_list(toy_rows(6, seed=3, ranked=ranked, messages=True))
    results = {}
    for batching in ("padded", "packed", "shared_prefix"):
        args = _config(tmp_path, batching=batching, loss_type="listwise" if ranked else "bradley_terry")
        trainer = PolarRewardTrainer(model=_load(model_dir, attn), args=args, train_dataset=ds)
        assert trainer.batching == batching
        lengths = [len(trainer.train_dataset[i]["chosen_ids" if not ranked else "candidates_ids"]) for i in range(6)]
        results[batching] = _loss_and_grads(trainer, range(6))
    if not ranked:
        assert max(lengths) > 1.5 * min(lengths)  # pairs of very different lengths share batches
    loss0, grads0 = results["padded"]
    for batching in ("packed", "shared_prefix"):
        loss, grads = results[batching]
        assert abs(loss.item() - loss0.item()) <= 1e-5, batching
        assert grads.keys() == grads0.keys()
        for name in grads0:
            torch.testing.assert_close(grads[name], grads0[name], atol=1e-5, rtol=0, msg=f"{batching}: {name}")


def test_bradley_terry_loss_equals_trl_reward_trainer(tmp_path, tiny_qwen2_rm_dir):
    from trl import RewardConfig, RewardTrainer

    rows = toy_rows(4, seed=5, margin=True)
    ours = PolarRewardTrainer(
        model=_load(tiny_qwen2_rm_dir),
        args=_config(tmp_path, batching="shared_prefix"),
        train_dataset=Dataset.from_list(rows),
    )
    tokenized = ours.train_dataset.remove_columns("truncated")
    trl_args = RewardConfig(
        output_dir=str(tmp_path / "trl"),
        use_cpu=True,
        bf16=False,
        report_to="none",
        gradient_checkpointing=False,
        max_length=None,
    )
    theirs = RewardTrainer(
        model=_load(tiny_qwen2_rm_dir), args=trl_args, train_dataset=tokenized, processing_class=ours.processing_class
    )
    examples = [tokenized[i] for i in range(4)]
    with torch.no_grad():
        trl_loss = theirs.compute_loss(theirs.model, theirs.data_collator(examples))
        our_loss = ours.compute_loss(ours.model, ours.data_collator([ours.train_dataset[i] for i in range(4)]))
    assert our_loss.item() == pytest.approx(trl_loss.item(), abs=1e-6)


def test_training_learns_saves_and_reloads(tmp_path, tiny_qwen2_lm_dir):
    # A causal-LM backbone given by path: tokens are added and the head starts at zero (loss log 2).
    train, held_out = Dataset.from_list(toy_rows(48, seed=0)), Dataset.from_list(toy_rows(16, seed=1))
    args = _config(
        tmp_path,
        max_steps=24,
        learning_rate=3e-3,
        warmup_steps=0,
        lr_scheduler_type="constant",
        eval_strategy="no",
        per_device_eval_batch_size=8,
    )
    trainer = PolarRewardTrainer(model=tiny_qwen2_lm_dir, args=args, train_dataset=train, eval_dataset=held_out)
    before = trainer.evaluate()
    assert before["eval_loss"] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-6)
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_loss"] < 0.5 * before["eval_loss"]
    assert after["eval_accuracy"] >= 0.9
    logged = {k for entry in trainer.state.log_history for k in entry}
    assert {"loss", "accuracy", "margin", "min_reward", "mean_reward", "max_reward", "num_tokens"} <= logged

    out = tmp_path / "saved"
    trainer.save_model(str(out))
    trainer.save_model()  # the run's output_dir gets the model card
    assert "POLAR" in (tmp_path / "out" / "README.md").read_text()
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    template = PolarTemplate.from_pretrained(str(out))
    assert template.to_dict() == trainer.template.to_dict()
    row = toy_rows(1, seed=9)[0]
    ids = torch.tensor([template.encode(row["prompt"], row["reference"], row["chosen"])])
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, trainer.model(input_ids=ids).logits)


def test_truncation_is_counted_and_logged(tmp_path, tiny_qwen2_rm_dir, caplog):
    rows = toy_rows(8, seed=0)
    rows[2]["prompt"] += " and" * 150  # a row whose prompt alone is cut
    args = _config(tmp_path, max_length=240, max_response_length=100, max_steps=2)
    with caplog.at_level("WARNING"):
        trainer = PolarRewardTrainer(model=_load(tiny_qwen2_rm_dir), args=args, train_dataset=Dataset.from_list(rows))
    counts = trainer.truncation_counts["train"]
    # The exact counts, from the tokenizer's own lengths: a response is cut when it holds more than 100 tokens (its
    # BOS included, as the template counts); a row is counted once however many of its parts are cut.
    template = trainer.template

    def long(text: str) -> bool:
        return len(template.tokenizer.encode(text, add_special_tokens=True)) > 100

    pairs = [template.build_pair(r["prompt"], r["reference"], r["chosen"], r["rejected"]) for r in rows]
    cut = [
        (p.chosen.prompt.truncated, long(r["reference"]), long(r["chosen"]) or long(r["rejected"]))
        for r, p in zip(rows, pairs, strict=True)
    ]
    expected = {
        "rows": 8,
        "truncated_rows": sum(any(parts) for parts in cut),
        "prompt": sum(parts[0] for parts in cut),
        "reference": sum(parts[1] for parts in cut),
        "candidate": sum(parts[2] for parts in cut),
    }
    assert counts == expected
    assert 0 < counts["truncated_rows"] < 8  # some rows are cut and some are not: all-or-none would prove little
    assert any(parts == (True, False, False) for parts in cut)  # and one is cut in its prompt only
    assert "No row was dropped" in caplog.text
    trainer.train()  # 2 steps x 4 rows: every row once
    assert trainer.state.log_history[1]["truncated_rows"] == counts["truncated_rows"]


def test_lora_trains_adapters_and_head_only(tmp_path, tiny_qwen2_rm_dir):
    from peft import LoraConfig

    base = _load(tiny_qwen2_rm_dir)
    frozen = {n: p.detach().clone() for n, p in base.named_parameters()}
    lora = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    args = _config(tmp_path, max_steps=3, learning_rate=1e-2, batching="shared_prefix")
    trainer = PolarRewardTrainer(
        model=base, args=args, train_dataset=Dataset.from_list(toy_rows(12)), peft_config=lora
    )
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "score" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert any("lora_B" in n for n in changed) and any("score" in n for n in changed)
    for name, param in trainer.model.get_base_model().named_parameters():
        if "lora_" not in name and "score" not in name and name in frozen:
            assert torch.equal(param, frozen[name]), name


def test_resume_from_checkpoint_gives_the_same_curve(tmp_path, tiny_qwen2_rm_dir):
    ds = Dataset.from_list(toy_rows(24, seed=4))
    common = {"max_steps": 6, "learning_rate": 1e-3, "save_strategy": "steps", "save_steps": 3, "seed": 7}
    full = PolarRewardTrainer(model=tiny_qwen2_rm_dir, args=_config(tmp_path / "a", **common), train_dataset=ds)
    full.train()
    losses = [e["loss"] for e in full.state.log_history if "loss" in e]
    checkpoint = tmp_path / "a" / "out" / "checkpoint-3"
    assert checkpoint.is_dir()
    resumed = PolarRewardTrainer(model=tiny_qwen2_rm_dir, args=_config(tmp_path / "b", **common), train_dataset=ds)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    resumed_losses = [e["loss"] for e in resumed.state.log_history if "loss" in e and e["step"] > 3]
    assert resumed_losses == pytest.approx(losses[3:], abs=1e-6)
    for (n, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=n)


def test_missing_reference_column_explains_how_to_convert(tmp_path, tiny_qwen2_rm_dir):
    ds = Dataset.from_list([{"prompt": "p", "chosen": "a", "rejected": "b"}])
    with pytest.raises(ValueError, match="no `reference`") as info:
        PolarRewardTrainer(model=_load(tiny_qwen2_rm_dir), args=_config(tmp_path), train_dataset=ds)
    message = str(info.value)
    assert "rank 1 as `reference`" in message and "gold answer" in message


def test_bad_row_error_names_row_and_column(tmp_path, tiny_qwen2_rm_dir):
    rows = [
        {
            "prompt": "p",
            "reference": "r",
            "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}],
        }
        for _ in range(3)
    ]
    rows[2]["rejected"] = [{"role": "assistant", "content": None}]
    with pytest.raises(ValueError, match=r"train dataset, index 2: `rejected\[0\]\['content'\]`"):
        PolarRewardTrainer(
            model=_load(tiny_qwen2_rm_dir), args=_config(tmp_path), train_dataset=Dataset.from_list(rows)
        )


def test_dataset_and_loss_must_agree(tmp_path, tiny_qwen2_rm_dir):
    ranked = Dataset.from_list(toy_rows(2, ranked=True))
    with pytest.raises(ValueError, match="loss_type='listwise'"):
        PolarRewardTrainer(model=_load(tiny_qwen2_rm_dir), args=_config(tmp_path), train_dataset=ranked)
    with_margin = Dataset.from_list(toy_rows(2, margin=True))
    with pytest.raises(ValueError, match="margin"):
        PolarRewardTrainer(
            model=_load(tiny_qwen2_rm_dir), args=_config(tmp_path, loss_type="listwise"), train_dataset=with_margin
        )


def test_pretokenized_rows_must_end_with_the_reward_token(tmp_path, tiny_qwen2_rm_dir):
    ds = Dataset.from_list([{"chosen_ids": [1, 5, 6], "rejected_ids": [1, 5, 7]}])
    with pytest.raises(ValueError, match="index 0, column `chosen_ids`"):
        PolarRewardTrainer(model=_load(tiny_qwen2_rm_dir), args=_config(tmp_path), train_dataset=ds)


def test_only_sliding_window_models_fall_back_to_packed(tmp_path, tiny_qwen2_rm_dir):
    model = _load(tiny_qwen2_rm_dir)
    # Segment attention replaces whatever attention the model was loaded with, flash kernels included.
    model.config._attn_implementation = "flash_attention_2"
    assert PolarRewardTrainer._resolve_batching(model, _config(tmp_path)) == "shared_prefix"
    model.config.layer_types = ["sliding_attention", "full_attention"]
    assert PolarRewardTrainer._resolve_batching(model, _config(tmp_path)) == "packed"


def test_a_config_file_with_a_yaml_syntax_error_is_one_line_naming_file_and_line(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("model_name_or_path: m\ntrain_data: d.jsonl\noutput_dir: out\n  use_cpu: true\n")
    run = subprocess.run(
        [sys.executable, "-m", "trl_polar.cli", "train", "--config", str(config)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [
        f"Error: {config}:4:10: not valid YAML (mapping values are not allowed here). Write one `field: value` per "
        "line, unindented, and quote values that contain ': ' or ' #'."
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("learning_rate: fast", "`learning_rate: fast` is not a valid float; fix the value."),
        ("batching: sideways", "`batching: sideways` is not one of padded, packed, shared_prefix; use one of them."),
        (
            "save_strategy: no",
            "`save_strategy: False` is not one of no, steps, epoch, best; use one of them (quote words YAML reads as "
            "booleans: 'no', 'off').",
        ),
        ("learning_rat: 0.1", "unknown field(s) ['learning_rat']; `trl-polar train --help` lists every field."),
    ],
)
def test_a_bad_value_in_a_config_file_names_file_and_line(tmp_path, line, message):
    config = tmp_path / "train.yaml"
    config.write_text(f"model_name_or_path: m\ntrain_data: d.jsonl\n{line}\noutput_dir: out\n")
    with pytest.raises(ValueError) as info:
        parse_train_args([], str(config))
    assert str(info.value) == f"{config}:3: {message}"


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"batching": "ragged"}, "batching"),
        ({"loss_type": "hinge"}, "loss_type"),
        ({"max_length": 100, "max_response_length": 48}, "too small"),
        ({"wrapper": "chat"}, "wrapper"),
        ({"max_length": None}, "cannot be None"),
    ],
)
def test_config_rejects_bad_values(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        _config(tmp_path, **overrides)


def test_every_new_config_field_has_help():
    from dataclasses import fields

    from trl import RewardConfig

    inherited = {f.name for f in fields(RewardConfig)}
    new = [f for f in fields(PolarConfig) if f.name not in inherited or f.name == "max_length"]
    assert len(new) >= 10
    assert all(f.metadata.get("help") for f in new), [f.name for f in new if not f.metadata.get("help")]
    assert json.loads(json.dumps(_config_dict()))["batching"] == "shared_prefix"


def _config_dict():
    return {k: v for k, v in PolarConfig(output_dir=os.devnull, use_cpu=True).to_dict().items() if k != "output_dir"}
