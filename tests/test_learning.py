"""PolarRewardTrainer learns a policy-discrimination task at least as well as plain trl.RewardTrainer.

The task is POLAR's pre-training objective at toy size: three policies that write with disjoint word lists; in
each triple the reference and the chosen answer come from one policy and the rejected answer from another, so only
a model that compares the candidate with the reference can rank them. Both trainers start from the same tiny
Qwen2 backbone (hidden 64, 2 layers, a tokenizer without the POLAR tokens, as a fresh backbone ships) and get the
same budget: 150 steps of 8 pairs at lr 2e-3. Plain TRL reads the same POLAR text, which its tokenizer spells in
pieces, and scores at the EOS token it appends; PolarRewardTrainer adds the separator and reward token (rows at the
mean embedding) and a zero value head.
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
BUDGET = {"max_steps": 150, "per_device_train_batch_size": 8, "learning_rate": 2e-3}


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
    """Training at lr 2e-3 is chaotic: one thread keeps the summation order, hence the numbers, of every run."""
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


def test_polar_trainer_learns_at_least_as_well_as_plain_trl(backbone, tmp_path):
    """One seed, the default batching: PolarRewardTrainer's held-out accuracy against plain TRL's, same budget."""
    polar = polar_accuracy(backbone, tmp_path, seed=0, batching="shared_prefix")
    trl = trl_accuracy(backbone, tmp_path, seed=0)
    assert polar >= trl
    assert polar >= 0.95


@pytest.mark.slow
def test_polar_trainer_matches_plain_trl_over_seeds_and_batchings(backbone, tmp_path):
    """Seeds 0-2: the mean held-out accuracy of each batching is at least plain TRL's mean."""
    seeds = (0, 1, 2)
    trl = sum(trl_accuracy(backbone, tmp_path, seed) for seed in seeds) / len(seeds)
    for batching in ("shared_prefix", "padded"):
        polar = sum(polar_accuracy(backbone, tmp_path, seed, batching) for seed in seeds) / len(seeds)
        assert polar >= trl, batching
