"""Whether RL moved a policy, measured on fixed held-out prompts: the quickstart's GRPO stage and its examples.

A measure maps a policy's sampled answers to one number per answer (its POLAR reward, or its mean per-token
log-likelihood under a target policy); `sample_answers` draws the same number of answers per held-out prompt with the
same seed each time, and `paired_change` compares two measurements prompt by prompt. The standard error comes from
the variation between prompts: each prompt's mean over its answers is one observation, and before/after are paired
on the prompt.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

# A measure: (prompts, answer texts, prompt ids, answer ids) -> one value per answer.
Measure = Callable[[list[str], list[str], list[Any], list[Any]], list[float]]


@dataclass
class Answers:
    """Sampled answers, ``samples`` per prompt, prompt-major: answer ``i`` belongs to prompt ``i // samples``."""

    prompts: list[str]
    texts: list[str]
    prompt_ids: list[Any]
    answer_ids: list[Any]
    samples: int


def sample_answers(
    model: Any, tokenizer: Any, prompts: Sequence[str], samples: int, max_new_tokens: int, seed: int, **kwargs: Any
) -> Answers:
    """``samples`` answers per prompt at temperature 1 (GRPO's sampling), in one batch, with a fixed seed that leaves
    the global random state as it was. Answer ids end at (and include) EOS when the policy stopped; ``kwargs`` go to
    ``generate`` (``min_new_tokens=1`` for references that must not be empty)."""
    import torch

    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # generation continues every prompt from its last token
    batch = tokenizer(list(prompts), return_tensors="pt", padding=True)
    tokenizer.padding_side = side
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        generated = model.generate(
            **batch,
            do_sample=True,
            top_k=0,
            top_p=1.0,
            temperature=1.0,
            max_new_tokens=max_new_tokens,
            num_return_sequences=samples,
            pad_token_id=tokenizer.pad_token_id,
            **kwargs,
        )
    model.train(was_training)
    out = Answers([], [], [], [], samples)
    for i, seq in enumerate(generated[:, batch["input_ids"].shape[1] :]):
        stop = (seq == tokenizer.eos_token_id).nonzero()
        seq = seq[: int(stop[0]) + 1] if len(stop) else seq
        k = i // samples
        out.prompts.append(prompts[k])
        out.texts.append(tokenizer.decode(seq, skip_special_tokens=True))
        out.prompt_ids.append(batch["input_ids"][k][batch["attention_mask"][k].bool()])
        out.answer_ids.append(seq)
    return out


def target_loglik(target: Any) -> Measure:
    """The measure "how much an answer reads like ``target``'s": its mean per-token log-likelihood (EOS included)
    under the target model, over the tokens the target can write (its generation config's ``suppress_tokens`` are
    excluded, as when it samples). No reward model is involved."""
    import torch

    suppress = list(target.generation_config.suppress_tokens or [])

    def measure(prompts, texts, prompt_ids, answer_ids) -> list[float]:
        if any(len(a) == 0 for a in answer_ids):
            raise ValueError("An answer without tokens has no log-likelihood; sample at least one token.")
        rows = [torch.cat([p, a]) for p, a in zip(prompt_ids, answer_ids, strict=True)]
        ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)  # right padding: positions stay 0, 1, ...
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in rows], batch_first=True)
        with torch.no_grad():
            logits = target(input_ids=ids, attention_mask=mask).logits.float()
        logits[..., suppress] = float("-inf")
        logp = logits.log_softmax(-1)
        values = []
        for row, (p, a) in enumerate(zip(prompt_ids, answer_ids, strict=True)):
            predicted = logp[row, len(p) - 1 : len(p) + len(a) - 1]  # position t predicts token t + 1
            values.append(predicted.gather(1, a[:, None]).mean().item())
        return values

    return measure


def polar_reward_measure(scorer: Any, references: dict[str, str], wrapper: str) -> Measure:
    """The measure "POLAR reward against the target's reference for the prompt"."""

    def measure(prompts, texts, prompt_ids, answer_ids) -> list[float]:
        return scorer.score(prompts, [references[p] for p in prompts], texts, wrapper)

    return measure


def per_prompt(values: Sequence[float], samples: int) -> list[float]:
    """The mean of each prompt's ``samples`` consecutive values.

    >>> per_prompt([1.0, 3.0, 0.0, 2.0], 2)
    [2.0, 1.0]
    """
    return [statistics.fmean(values[i : i + samples]) for i in range(0, len(values), samples)]


def paired_change(before: Sequence[float], after: Sequence[float]) -> tuple[float, float]:
    """The mean change over prompts and its standard error (per-prompt changes: stdev / sqrt(prompts)).

    >>> paired_change([0.0, 1.0, 2.0], [1.0, 2.0, 4.0])
    (1.3333333333333333, 0.3333333333333333)
    """
    diffs = [a - b for a, b in zip(after, before, strict=True)]
    if len(diffs) < 2:
        raise ValueError(f"A standard error needs at least 2 held-out prompts, got {len(diffs)}.")
    return statistics.fmean(diffs), statistics.stdev(diffs) / len(diffs) ** 0.5


class Tracker:
    """Measures a policy on fixed held-out prompts now and then; ``history`` holds one row per measurement."""

    def __init__(self, tokenizer, prompts, measures: dict[str, Measure], samples: int, max_new_tokens: int, seed: int):
        self.tokenizer, self.prompts, self.measures = tokenizer, list(prompts), measures
        self.samples, self.max_new_tokens, self.seed = samples, max_new_tokens, seed
        self.history: list[dict[str, Any]] = []

    def measure(self, model: Any, step: int) -> dict[str, Any]:
        answers = sample_answers(model, self.tokenizer, self.prompts, self.samples, self.max_new_tokens, self.seed)
        row: dict[str, Any] = {"step": step}
        args = (answers.prompts, answers.texts, answers.prompt_ids, answers.answer_ids)
        for name, measure in self.measures.items():
            row[name] = per_prompt(measure(*args), self.samples)
        self.history.append(row)
        return row

    def change(self, name: str) -> dict[str, float]:
        """First and last measurement of ``name`` (means over prompts) and the paired change's standard error."""
        first, last = self.history[0][name], self.history[-1][name]
        change, stderr = paired_change(first, last)
        return {"before": statistics.fmean(first), "after": statistics.fmean(last), "change": change, "stderr": stderr}

    def callback(self, every: int):
        """A `transformers.TrainerCallback` that measures every ``every`` optimizer steps and at the end."""
        from transformers import TrainerCallback

        tracker = self

        class _Measure(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):
                if state.global_step % every == 0 or state.global_step == state.max_steps:
                    row = tracker.measure(model, state.global_step)
                    means = ", ".join(f"{k} {statistics.fmean(v):+.3f}" for k, v in row.items() if k != "step")
                    print(f"  step {state.global_step:>3}/{state.max_steps}: {means}", flush=True)

        return _Measure()


def grpo_args(output_dir: str, steps: int, learning_rate: float, max_new_tokens: int, seed: int, **overrides):
    """GRPO settings that move a tiny policy in a few dozen CPU steps: 8 answers for each of 4 prompts a step."""
    from trl import GRPOConfig

    params: dict[str, Any] = {
        "output_dir": output_dir,
        "max_steps": steps,
        "per_device_train_batch_size": 32,
        "num_generations": 8,
        "max_completion_length": max_new_tokens,
        "learning_rate": learning_rate,
        "lr_scheduler_type": "constant",
        "logging_steps": max(1, steps // 4),
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "bf16": False,
        "activation_checkpointing": False,  # a tiny model: nothing to save (and the old name warns)
        "disable_tqdm": True,
        "seed": seed,
        "top_k": 0,
    }
    params.update(overrides)
    return GRPOConfig(**params)


def train_grpo(model: Any, reward_funcs: list, args: Any, dataset: Any, tracker: Tracker, every: int, **kwargs):
    """GRPO with ``tracker`` measuring before the first step, every ``every`` steps and after the last; returns the
    trained model. The trainer's own per-step log lines are left out: the tracker prints what moved."""
    from transformers import PrinterCallback
    from trl import GRPOTrainer

    trainer = GRPOTrainer(model=model, reward_funcs=reward_funcs, args=args, train_dataset=dataset, **kwargs)
    trainer.remove_callback(PrinterCallback)
    tracker.measure(trainer.model, 0)
    trainer.add_callback(tracker.callback(every))
    trainer.train()
    return trainer.model
