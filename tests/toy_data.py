"""A learnable toy POLAR task shared by the training tests: tell policy A's answers from policy B's.

Policy A answers in lower-case digits words, policy B shouts in capitals; the reference always comes from A, so a
model that learns "candidate looks like the reference" ranks A's answer above B's. Lengths vary a lot on purpose:
the batching modes must agree on pairs of very different lengths.
"""

from __future__ import annotations

import random

WORDS_A = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
WORDS_B = ["ALPHA", "BRAVO", "CHARLIE", "DELTA", "ECHO", "FOXTROT", "GOLF", "HOTEL"]


def toy_rows(n: int, seed: int = 0, ranked: bool = False, margin: bool = False, messages: bool = False) -> list[dict]:
    """Rows with prompt, reference, chosen, rejected (or candidates best first when ``ranked``).

    With ``messages`` the prompts are message lists (Arrow needs one type per column).
    """
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = f"Question {i}: " + " ".join(rng.choice(WORDS_A) for _ in range(rng.randint(2, 12)))

        def answer(words, lo, hi):
            return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

        row = {"prompt": prompt, "reference": answer(WORDS_A, 3, 10)}
        if ranked:
            row["candidates"] = [answer(WORDS_A, 1, 25), answer(WORDS_A + WORDS_B, 2, 6), answer(WORDS_B, 1, 30)]
        else:
            # Very different lengths: one side short, the other long, alternating.
            short, long = (1, 3), (15, 40)
            a, b = (short, long) if i % 2 else (long, short)
            row["chosen"] = answer(WORDS_A, *a)
            row["rejected"] = answer(WORDS_B, *b)
            if margin:
                row["margin"] = rng.choice([0.0, 0.5, 1.0])
        if messages:
            row["prompt"] = [{"role": "user", "content": row["prompt"]}]
        rows.append(row)
    return rows
