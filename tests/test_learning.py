"""PolarRewardTrainer learns a policy-discrimination task at least as well as plain trl.RewardTrainer.

The task is POLAR's pre-training objective at toy size: three policies that write with disjoint word lists; in
each triple the reference and the chosen answer come from one policy and the rejected answer from another, so only
a model that compares the candidate with the reference can rank them. Both trainers start from the same tiny
Qwen2 backbone (hidden 64, 2 layers, a tokenizer without the POLAR tokens, as a fresh backbone ships) and get the
same budget: 100 steps of 8 pairs at lr 1e-3. Plain TRL reads the same POLAR text, which its tokenizer spells in
pieces, and scores at the EOS token it appends; PolarRewardTrainer adds the separator and reward token (rows at the
mean embedding) and a zero value head.

One seed proves nothing here: at lr 2e-3 seed 0 gave PolarRewardTrainer 0.95+ but seeds 1-4 gave 0.760-0.896, below
plain TRL on some. So the test compares means over seeds 0-4 at a learning rate where PolarRewardTrainer is steady.
Measured (held-out accuracy, seeds 0-4): PolarRewardTrainer 0.979 0.979 0.979 0.990 0.802 (mean 0.946), plain TRL
0.802 0.719 0.375 0.844 0.823 (mean 0.712). The bars sit below the means by about one bad seed each: a mean of 0.90
(one more seed at 0.80 still passes) and a lead of 0.10 over plain TRL (the lead measured is 0.23; the standard error
of the difference of two 5-seed means is about 0.09). A sign flip in the loss gives PolarRewardTrainer about 0.
"""

from __future__ import annotations

import random

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer

from trl_polar import PolarConfig, PolarRewardTrainer
from trl_polar.evaluation import evaluate
from trl_polar.modeling import add_polar_tokens
from trl_polar.scorer import PolarScorer
from trl_polar.template import PolarTemplate
from trl_polar.tiny import build_tiny_causal_lm, build_tiny_tokenizer

POLICIES = [
    ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "plum"],
    ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"],
    ["cat", "dog", "horse", "mouse", "tiger", "zebra", "camel", "eagle"],
]
TOPICS = ["Tell me about", "Write a line on", "Describe", "Say something about"]
BUDGET = {"max_steps": 100, "per_device_train_batch_size": 8, "learning_rate": 1e-3}
SEEDS = (0, 1, 2, 3, 4)


def triples(n: int, seed: int) -> list[dict[str, str]]:
    """A/A/B triples: reference and chosen from one policy, rejected from another."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.sample(range(len(POLICIES)), 2)

        def answer(k: int) -> str:
            return " ".join(rng.choice(POLICIES[k]) for _ in range(rng.randint(3, 10)))

        prompt = f"{rng.choice(TOPICS)} item {i}."
        rows.append({"prompt": prompt, "reference": answer(a), "chosen": answer(a), "rejected": answer(b)})
    return rows


@pytest.fixture(autouse=True)
def one_thread():
    """One thread keeps the summation order, hence the numbers, of every run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("learning_backbone")
    corpus = [" ".join(words) for words in POLICIES] * 10 + TOPICS * 10
    tokenizer = build_tiny_tokenizer(corpus=corpus, polar_tokens=False)
    build_tiny_causal_lm(tokenizer, seed=1234, out_dir=path)
    return str(path)


def _common(tmp_path, seed: int) -> dict:
    return dict(
        output_dir=str(tmp_path),
        logging_steps=1000,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=seed,
        disable_tqdm=True,
        **BUDGET,
    )


def polar_accuracy(backbone: str, tmp_path, seed: int, batching: str) -> float:
    args = PolarConfig(
        **_common(tmp_path / f"polar-{batching}-{seed}", seed),
        batching=batching,
        max_length=512,
        max_response_length=128,
    )
    trainer = PolarRewardTrainer(model=backbone, args=args, train_dataset=Dataset.from_list(triples(256, seed)))
    trainer.train()
    return evaluate(PolarScorer(trainer.model, trainer.template, device="cpu"), triples(96, seed + 100)).accuracy


def trl_accuracy(backbone: str, tmp_path, seed: int) -> float:
    from trl import RewardConfig, RewardTrainer

    tokenizer = AutoTokenizer.from_pretrained(backbone)
    # The POLAR text, written by a template on a copy of the tokenizer that knows the tokens; plain TRL then reads
    # that text with the backbone's own tokenizer, as it would read any preference text.
    writer = AutoTokenizer.from_pretrained(backbone)
    add_polar_tokens(writer)
    template = PolarTemplate(writer)

    def text(row: dict, answer: str) -> str:
        return template.build(row["prompt"], row["reference"], answer).text + template.reward_token

    data = Dataset.from_list(
        [{"chosen": text(r, r["chosen"]), "rejected": text(r, r["rejected"])} for r in triples(256, seed)]
    )
    args = RewardConfig(**_common(tmp_path / f"trl-{seed}", seed))
    trainer = RewardTrainer(model=backbone, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    model = trainer.model.eval()
    correct = 0
    held_out = triples(96, seed + 100)
    with torch.no_grad():
        for row in held_out:
            # Scored as TRL trained: the text with the EOS token it appends.
            scores = [
                model(**tokenizer(text(row, answer) + tokenizer.eos_token, return_tensors="pt")).logits[0, 0].item()
                for answer in (row["chosen"], row["rejected"])
            ]
            correct += scores[0] > scores[1]
    return correct / len(held_out)


def test_polar_trainer_learns_better_than_plain_trl_over_seeds(backbone, tmp_path):
    """Seeds 0-4, the default batching: the mean held-out accuracy against plain TRL's, same budget."""
    polar = [polar_accuracy(backbone, tmp_path, seed, batching="shared_prefix") for seed in SEEDS]
    trl = [trl_accuracy(backbone, tmp_path, seed) for seed in SEEDS]
    polar_mean, trl_mean = sum(polar) / len(SEEDS), sum(trl) / len(SEEDS)
    assert polar_mean >= 0.90, polar
    assert polar_mean >= trl_mean + 0.10, (polar, trl)


@pytest.mark.slow
def test_polar_trainer_matches_plain_trl_over_seeds_and_batchings(backbone, tmp_path):
    """Seeds 0-4: the padded batching learns as the default one does, with the same lead over plain TRL."""
    trl = sum(trl_accuracy(backbone, tmp_path, seed) for seed in SEEDS) / len(SEEDS)
    polar = sum(polar_accuracy(backbone, tmp_path, seed, "padded") for seed in SEEDS) / len(SEEDS)
    assert polar >= 0.90 and polar >= trl + 0.10
