"""PolarScorer: exact against a plain per-item forward, budgeted, shared-prefix, file scoring."""

from __future__ import annotations

import json

import pytest
import torch

from trl_polar.score_file import score_file
from trl_polar.scorer import PolarScorer
from trl_polar.template import PolarTemplate

PROMPT_A = "What is 2 + 2? Let me think step by step about the answer."
PROMPT_B = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Translate to French: good morning"},
]
PROMPTS = [PROMPT_A] * 5 + [PROMPT_B] * 3 + ["A lone prompt", PROMPT_A]
REFERENCES = ["The answer is 4."] * 5 + ["bonjour"] * 3 + ["lone reference", "A different reference: 4"]
CANDIDATES = [
    "4",
    "The answer is 4. The quick brown fox jumps over the lazy dog, twice: the quick brown fox jumps again.",
    "five",
    "",
    "The answer is 4.",
    [{"role": "assistant", "content": "bonjour"}],
    "good morning -> bonjour, le matin",
    "bonjour " * 30,
    "lone candidate",
    "4",
]


def _load(path, attn="sdpa"):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path, attn_implementation=attn).eval()
    return model, PolarTemplate.from_pretrained(path)


def _plain_scores(model, template, prompts, references, candidates):
    """The reference implementation: one unpadded sequence at a time through the model's own forward."""
    with torch.no_grad():
        return [
            model(input_ids=torch.tensor([template.encode(p, r, c)])).logits[0, 0].item()
            for p, r, c in zip(prompts, references, candidates, strict=True)
        ]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_scores_equal_plain_forward(arch, attn, request):
    path = request.getfixturevalue(f"tiny_{arch}_rm_dir")
    model, template = _load(path, attn)
    expected = _plain_scores(model, template, PROMPTS, REFERENCES, CANDIDATES)
    # A large budget puts both groups and the lone items in one unpadded row; a small one splits the first group into
    # chunks that each carry its prefix.
    for budget in (4096, 60):
        scorer = PolarScorer(model, template, max_tokens_per_batch=budget, device="cpu")
        with scorer.observe() as runs:
            got = scorer.score(PROMPTS, REFERENCES, CANDIDATES)
        assert got == pytest.approx(expected, abs=1e-5), budget
        plan = runs[-1].plan
        assert {mb.kind for mb in plan} == {"row"}
        assert runs[-1].kernels == {"split": len(plan) * model.config.num_hidden_layers}  # CPU inference's kernel
        # The two groups with >= 2 candidates share a prefix; the lone item and the odd reference run whole.
        prefixes = {i: p for mb in plan for i, p in zip(mb.indices, mb.prefixes, strict=True)}
        assert sorted(i for i, p in prefixes.items() if p > 0) == list(range(8))
    assert len(plan) >= 3
    rows_of_first_group = [mb for mb in plan if set(mb.indices) & {0, 1, 2, 3, 4}]
    assert len(rows_of_first_group) >= 2, "the first group must span several rows"


def test_shared_prefix_off_and_small_budget_give_same_scores(tiny_qwen2_rm_dir):
    model, template = _load(tiny_qwen2_rm_dir)
    fast = PolarScorer(model, template, max_tokens_per_batch=4096, device="cpu").score(PROMPTS, REFERENCES, CANDIDATES)
    unshared_scorer = PolarScorer(model, template, max_tokens_per_batch=4096, device="cpu", shared_prefix=False)
    with unshared_scorer.observe() as unshared_runs:
        unshared = unshared_scorer.score(PROMPTS, REFERENCES, CANDIDATES)
    # Without sharing, the items still go unpadded into one row, each whole.
    assert [(mb.kind, set(mb.prefixes)) for mb in unshared_runs[-1].plan] == [("row", {0})]
    # A budget below one sequence: every item runs alone (with its group's prefix as a segment of its own).
    tiny_budget = PolarScorer(model, template, max_tokens_per_batch=8, device="cpu")
    with tiny_budget.observe() as single_runs:
        single = tiny_budget.score(PROMPTS, REFERENCES, CANDIDATES)
    assert all(len(mb.indices) == 1 for mb in single_runs[-1].plan)
    expected = _plain_scores(model, template, PROMPTS, REFERENCES, CANDIDATES)
    for got in (fast, unshared, single):
        assert got == pytest.approx(expected, abs=1e-5)


def test_sliding_window_model_is_scored_plainly(tiny_tokenizer_dir):
    """Segment attention implements no sliding window: such a model gets padded plain batches, still exact."""
    from transformers import AutoTokenizer

    from trl_polar.tiny import build_tiny_reward_model

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    config = {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1}
    model = build_tiny_reward_model(tokenizer, arch="qwen2", **config)
    assert "sliding_attention" in model.config.layer_types
    template = PolarTemplate(tokenizer)
    scorer = PolarScorer(model.eval(), template, device="cpu")
    with scorer.observe() as runs:
        got = scorer.score(PROMPTS, REFERENCES, CANDIDATES)
    assert not scorer.uses_segment_attention
    assert {mb.kind for mb in runs[-1].plan} == {"plain"} and runs[-1].kernels == {}
    assert got == pytest.approx(_plain_scores(model, template, PROMPTS, REFERENCES, CANDIDATES), abs=1e-5)


def test_budget_bounds_every_forward(tiny_qwen2_rm_dir):
    """Count the tokens of every real forward pass: each stays under the budget."""
    model, template = _load(tiny_qwen2_rm_dir)
    budget = 300
    scorer = PolarScorer(model, template, max_tokens_per_batch=budget, device="cpu")
    assert scorer.uses_segment_attention
    seen = []

    def record(module, args, kwargs):
        seen.append(tuple(kwargs["input_ids"].shape))

    handle = scorer._backbone.register_forward_pre_hook(record, with_kwargs=True)
    prompts = [PROMPT_A] * 16 + [f"prompt number {i}" for i in range(16)]
    references = ["The answer is 4."] * 16 + [f"reference {i}" for i in range(16)]
    candidates = [("word " * (i % 7 + 1)).strip() for i in range(32)]
    try:
        with scorer.observe() as runs:
            got = scorer.score(prompts, references, candidates)
    finally:
        handle.remove()
    assert len(seen) >= 3
    assert all(rows == 1 and tokens <= budget for rows, tokens in seen), seen
    # The plan agrees with what ran, and scored every item exactly once.
    assert [tokens for _, tokens in seen] == [mb.length for mb in runs[-1].plan]
    assert sorted(i for mb in runs[-1].plan for i in mb.indices) == list(range(32))
    assert got == pytest.approx(_plain_scores(model, template, prompts, references, candidates), abs=1e-5)


def test_truncated_items_still_exact(tiny_tokenizer_dir, tiny_qwen2_rm_dir):
    model, _ = _load(tiny_qwen2_rm_dir)
    template = PolarTemplate.from_pretrained(tiny_qwen2_rm_dir, max_length=96, max_response_length=24)
    prompts = ["The quick brown fox jumps over the lazy dog. " * 6] * 3
    references = ["A reward model scores how close a candidate answer is to a reference answer."] * 3
    candidates = ["short", "1 2 3 4 5 6 7 8 9 10 11 12 100 1000 " * 4, "medium length candidate answer here"]
    scorer = PolarScorer(model, template, device="cpu", min_prefix_tokens=1)
    got = scorer.score(prompts, references, candidates)
    assert scorer.encode_items(prompts, references, candidates).truncated >= 1
    assert got == pytest.approx(_plain_scores(model, template, prompts, references, candidates), abs=1e-5)


def test_length_mismatch_names_the_lists(tiny_qwen2_rm_dir):
    scorer = PolarScorer(tiny_qwen2_rm_dir, device="cpu")
    with pytest.raises(ValueError, match=r"prompts=2, references=1, candidates=2"):
        scorer.score(["a", "b"], ["r"], ["c", "d"])
    with pytest.raises(ValueError, match=r"`candidates` must be a list"):
        scorer.score(["a"], ["r"], "c")
    assert scorer.score([], [], []) == []


def test_loads_from_path_with_dtype(tiny_qwen2_rm_dir):
    fp32 = PolarScorer(tiny_qwen2_rm_dir, device="cpu", dtype="auto")
    assert next(fp32.model.parameters()).dtype == torch.float32  # "auto" is bf16 only on a GPU
    bf16 = PolarScorer(tiny_qwen2_rm_dir, device="cpu", dtype="bf16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    a = fp32.score(PROMPTS, REFERENCES, CANDIDATES)
    b = bf16.score(PROMPTS, REFERENCES, CANDIDATES, show_progress=True)
    assert all(isinstance(x, float) for x in b)
    # The tolerance is what bf16 costs the plain path: the model's own forward, one item at a time, in bf16 (about
    # 2e-3 here, against scores spread over 0.25). A sign flip, a shifted reward position or a constant output in
    # the bf16 path moves scores by far more; a bf16 run that secretly ran in fp32 would have no error at all.
    plain, template = _load(tiny_qwen2_rm_dir)
    plain_bf16 = _plain_scores(plain.to(torch.bfloat16), template, PROMPTS, REFERENCES, CANDIDATES)
    plain_error = max(abs(x - y) for x, y in zip(plain_bf16, a, strict=True))
    assert 0 < plain_error < 0.01
    assert b == pytest.approx(a, abs=2 * plain_error)
    assert max(a) - min(a) > 20 * 2 * plain_error  # the scores differ by far more than the tolerance
    with pytest.raises(ValueError, match="dtype"):
        PolarScorer(tiny_qwen2_rm_dir, device="cpu", dtype="float8")


def test_score_file_roundtrip(tmp_path, tiny_qwen2_rm_dir):
    data = tmp_path / "in.jsonl"
    rows = [
        {"prompt": p, "reference": r, "output": c, "id": i}
        for i, (p, r, c) in enumerate(zip(PROMPTS[:4], REFERENCES[:4], CANDIDATES[:4], strict=True))
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    out = tmp_path / "sub" / "out.jsonl"
    summary = score_file(tiny_qwen2_rm_dir, data, out, device="cpu", show_progress=False)
    written = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    expected = PolarScorer(tiny_qwen2_rm_dir, device="cpu").score(PROMPTS[:4], REFERENCES[:4], CANDIDATES[:4])
    assert [w["id"] for w in written] == [0, 1, 2, 3]
    assert [w["reward"] for w in written] == pytest.approx(expected, abs=1e-6)
    assert summary["rows"] == 4 and summary["min"] <= summary["mean"] <= summary["max"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "reference": "r", "output": "c"}) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        score_file(tiny_qwen2_rm_dir, bad, tmp_path / "x.jsonl", device="cpu")
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"prompt": "p", "output": "c"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"missing.jsonl:1 has no 'reference' value"):
        score_file(tiny_qwen2_rm_dir, missing, tmp_path / "x.jsonl", device="cpu")


def test_score_file_reads_a_json_array_as_evaluate_does(tmp_path, tiny_qwen2_rm_dir):
    rows = [{"prompt": p, "reference": r, "output": c} for p, r, c in zip(PROMPTS[:3], REFERENCES[:3], CANDIDATES[:3])]
    data = tmp_path / "in.json"
    data.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    summary = score_file(tiny_qwen2_rm_dir, data, out, device="cpu", show_progress=False)
    expected = PolarScorer(tiny_qwen2_rm_dir, device="cpu").score(PROMPTS[:3], REFERENCES[:3], CANDIDATES[:3])
    assert [json.loads(line)["reward"] for line in out.read_text().splitlines()] == pytest.approx(expected, abs=1e-6)
    assert summary["rows"] == 3
    rows[1].pop("reference")
    data.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    line = data.read_text().splitlines().index(" {", 2) + 1  # where the second record opens
    with pytest.raises(ValueError, match=rf"in.json:{line} has no 'reference' value"):
        score_file(tiny_qwen2_rm_dir, data, tmp_path / "x.jsonl", device="cpu")


def test_parallel_encoding_matches_serial(tiny_qwen2_rm_dir):
    model, template = _load(tiny_qwen2_rm_dir)
    prompts = [f"prompt {i % 5}: " + "the quick brown fox " * (i % 3 + 1) for i in range(40)]
    references = [f"reference {i % 5}" for i in range(40)]
    candidates = [("word " * (i % 9)).strip() for i in range(40)]
    serial = PolarScorer(model, template, device="cpu", encode_workers=1).encode(prompts, references, candidates)
    parallel = PolarScorer(model, template, device="cpu", encode_workers=3)
    assert parallel.encode(prompts, references, candidates) == serial
    assert serial == [template.encode(p, r, c) for p, r, c in zip(prompts, references, candidates, strict=True)]


def test_peft_wrapped_model(tiny_qwen2_rm_dir):
    """A LoRA-trained reward model scores through its adapters and its trained head, exactly."""
    from peft import LoraConfig, get_peft_model

    model, template = _load(tiny_qwen2_rm_dir)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS", init_lora_weights=False)
    peft_model = get_peft_model(model, config).eval()
    expected = _plain_scores(peft_model, template, PROMPTS[:8], REFERENCES[:8], CANDIDATES[:8])
    scorer = PolarScorer(peft_model, template, device="cpu")
    with scorer.observe() as runs:
        got = scorer.score(PROMPTS[:8], REFERENCES[:8], CANDIDATES[:8])
    assert got == pytest.approx(expected, abs=1e-5)
    assert any(p > 0 for mb in runs[-1].plan for p in mb.prefixes)
    with peft_model.disable_adapter():
        without = _plain_scores(peft_model, template, PROMPTS[:8], REFERENCES[:8], CANDIDATES[:8])
    assert max(abs(a - b) for a, b in zip(without, got, strict=True)) > 1e-4, "the adapters must take part"


def test_a_bad_input_does_not_switch_segment_attention_off(tiny_qwen2_rm_dir):
    from trl_polar.scorer import PolarScorer

    scorer = PolarScorer(tiny_qwen2_rm_dir, device="cpu")
    good = scorer.encode(["What is 2 + 2?"] * 3, ["4"] * 3, ["4", "five", "It is 4."])
    expected = PolarScorer(tiny_qwen2_rm_dir, device="cpu", shared_prefix=False).score_ids(good, ["g"] * 3)
    with scorer.observe() as runs:
        assert scorer.score_ids(good, ["g"] * 3) == pytest.approx(expected, abs=1e-5)
    assert [(mb.kind, min(mb.prefixes) > 0) for mb in runs[-1].plan] == [("row", True)]
    with pytest.raises(TypeError):
        scorer.score_ids(good, [["unhashable"]] * 3)  # fails while planning, before any forward
    with pytest.raises(ValueError, match=r"Sequence\(s\) \[1\] are empty"):
        scorer.score_ids([good[0], []], ["g", "g"])
    # The fast path survives bad calls (a long-running server must not lose it to one bad request).
    assert scorer.uses_segment_attention
    with scorer.observe() as runs:
        assert scorer.score_ids(good, ["g"] * 3) == pytest.approx(expected, abs=1e-5)
    assert [(mb.kind, min(mb.prefixes) > 0) for mb in runs[-1].plan] == [("row", True)]


class InterruptAfter:
    """Ctrl-C arriving while the given call of a real scorer is running (the calls before it score normally)."""

    def __init__(self, scorer, calls: int) -> None:
        self.scorer, self.calls, self.seen = scorer, calls, []

    def score(self, prompts, references, candidates, wrapper="sft"):
        self.seen.append(len(candidates))
        if len(self.seen) == self.calls:
            raise KeyboardInterrupt
        return self.scorer.score(prompts, references, candidates, wrapper)


def _file_rows(n: int) -> list[dict]:
    return [
        {"prompt": PROMPTS[i % 8], "reference": REFERENCES[i % 8], "output": CANDIDATES[i % 8], "id": i}
        for i in range(n)
    ]


def test_score_file_is_atomic_keeps_work_on_ctrl_c_and_resumes(tmp_path, tiny_qwen2_rm_dir):
    from trl_polar.score_file import ScoringInterrupted

    scorer = PolarScorer(tiny_qwen2_rm_dir, device="cpu")
    data, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _file_rows(10)), encoding="utf-8")
    out.write_text("previous output\n", encoding="utf-8")
    with pytest.raises(ScoringInterrupted, match=r"after 6 of 10 rows; their scores are kept in .*out.jsonl.partial"):
        score_file(InterruptAfter(scorer, calls=3), data, out, chunk_rows=3, show_progress=False)
    # The destination is untouched; the three chunks scored before the interrupt are kept.
    assert out.read_text(encoding="utf-8") == "previous output\n"
    kept = [json.loads(line) for line in (tmp_path / "out.jsonl.partial").read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in kept] == [0, 1, 2, 3, 4, 5]
    # The same command resumes after them: only the last 4 rows are scored, and the result is an uninterrupted run's.
    resumed = InterruptAfter(scorer, calls=0)
    summary = score_file(resumed, data, out, chunk_rows=3, show_progress=False)
    assert resumed.seen == [3, 1] and summary["resumed"] == 6 and summary["rows"] == 10
    written = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    rows = _file_rows(10)
    expected = scorer.score([r["prompt"] for r in rows], [r["reference"] for r in rows], [r["output"] for r in rows])
    assert [r["id"] for r in written] == list(range(10))
    assert [r["reward"] for r in written] == pytest.approx(expected, abs=1e-5)
    assert not (tmp_path / "out.jsonl.partial").exists()


def test_score_file_checks_the_output_before_any_work(tmp_path, tiny_qwen2_rm_dir):
    data = tmp_path / "in.jsonl"
    original = "".join(json.dumps(r) + "\n" for r in _file_rows(2))
    data.write_text(original, encoding="utf-8")
    never = InterruptAfter(None, calls=1)  # would raise if anything were scored
    with pytest.raises(ValueError, match=r"in.jsonl is also the input; writing it would destroy the input"):
        score_file(never, data, data)
    assert data.read_text(encoding="utf-8") == original
    with pytest.raises(ValueError, match=r"is a folder; the output is a file"):
        score_file(never, data, tmp_path)
    assert never.seen == []


def test_score_file_resumes_after_a_kill_that_cut_the_last_line(tmp_path, tiny_qwen2_rm_dir):
    # What kill -9 during an append leaves: whole scored lines, then part of one.
    scorer = PolarScorer(tiny_qwen2_rm_dir, device="cpu")
    data, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rows = _file_rows(5)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    first = scorer.score(
        [r["prompt"] for r in rows[:2]], [r["reference"] for r in rows[:2]], [r["output"] for r in rows[:2]]
    )
    kept = "".join(json.dumps({**r, "reward": s}) + "\n" for r, s in zip(rows[:2], first, strict=True))
    (tmp_path / "out.jsonl.partial").write_text(kept + json.dumps(rows[2])[:17], encoding="utf-8")
    counting = InterruptAfter(scorer, calls=0)
    summary = score_file(counting, data, out, chunk_rows=2, show_progress=False)
    assert summary["resumed"] == 2 and counting.seen == [2, 1]
    written = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    expected = scorer.score([r["prompt"] for r in rows], [r["reference"] for r in rows], [r["output"] for r in rows])
    assert [r["id"] for r in written] == list(range(5))
    assert [r["reward"] for r in written] == pytest.approx(expected, abs=1e-5)
