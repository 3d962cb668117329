"""`check_engine`: score rows through a served engine and in process, and say why the two differ.

The remote scores come from `PolarClient` with the engine's backend (exactly what a training run would get); the
in-process scores from `PolarScorer` on the same checkpoint. When the largest difference is over the tolerance,
the likely causes are named from evidence, in this order:

1. tokenizer or special tokens: the engine's own tokenization of the formatted text (`TOKENIZE_ROUTES`), compared
   id for id with the local one; and the in-process scores of the engine's ids and of the text without BOS,
   against the remote scores;
2. template text: the in-process score of the other wrapper's text ("sft" <-> "pretrain");
3. head or activation: remote = sigmoid(local), remote = local + c, remote = -local, or remote = a * local + b;
4. precision: small differences without a pattern, as a bf16/fp16 engine gives against fp32 in process;
5. otherwise another model: the scores do not follow each other.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# bf16 keeps 8 bits of mantissa: through a deep network its scores land within a few percent of fp32's.
PRECISION_SPREAD = 0.05
# How many rows' tokenization is asked of the engine (one request each).
TOKENIZE_ROWS = 8


@dataclass
class EngineCheck:
    """What `check_engine` found: both score lists, the largest difference and, when they differ, the causes."""

    backend: str
    url: str
    remote: list[float]
    local: list[float]
    tolerance: float
    causes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def differences(self) -> list[float]:
        return [r - x for r, x in zip(self.remote, self.local)]

    @property
    def worst(self) -> int:
        """The row with the largest difference."""
        diffs = self.differences
        return max(range(len(diffs)), key=lambda i: abs(diffs[i]))

    @property
    def max_difference(self) -> float:
        return abs(self.differences[self.worst])

    @property
    def agrees(self) -> bool:
        return self.max_difference <= self.tolerance

    def report(self) -> str:
        i = self.worst
        lines = [
            f"{len(self.local)} rows scored by {self.backend} at {self.url} and in process.",
            f"largest difference: {self.max_difference:.6g} (row {i}: remote {self.remote[i]:.6g}, in process "
            f"{self.local[i]:.6g}); tolerance {self.tolerance:.3g}.",
        ]
        if self.agrees:
            lines.append("The engine agrees with the in-process scores.")
        else:
            lines.append("The engine differs. Likely cause:" if len(self.causes) == 1 else "The engine differs:")
            lines += [f"  - {cause}" for cause in self.causes]
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def check_engine(
    url: str,
    backend: str,
    model: str | os.PathLike,
    prompts: Sequence[Any],
    references: Sequence[Any],
    candidates: Sequence[Any],
    wrappers: Sequence[str] | None = None,
    *,
    api_key: str | None = None,
    model_name: str | None = None,
    tolerance: float | None = None,
    device: str | None = None,
    dtype: str | None = None,
    timeout: float = 120.0,
) -> EngineCheck:
    """Score the rows remotely (``PolarClient(url, backend=backend)``) and in process (``PolarScorer(model)``).

    Args:
        url: the engine, e.g. ``http://10.0.0.5:8000``.
        backend: ``"vllm"``, ``"sglang"``, ``"lmdeploy"`` or ``"trl-polar"``.
        model: the checkpoint the engine serves (its path here).
        prompts, references, candidates, wrappers: the rows (wrappers default to "sft").
        tolerance: the largest difference taken as equal (default: 1e-3 times the largest |score|, at least 1e-3).

    Example::

        check = check_engine("http://127.0.0.1:8000", "vllm", "internlm/POLAR-7B", prompts, references, candidates)
        print(check.report())
    """
    from ..scorer import PolarScorer
    from .client import PolarClient

    wrappers = _wrappers(prompts, references, candidates, wrappers)
    scorer = PolarScorer(model, device=device, dtype=dtype)
    local = scorer.score(prompts, references, candidates, wrappers)
    client = PolarClient(
        url=url,
        backend=backend,
        api_key=api_key,
        model_name=model_name,
        template=scorer.template,
        timeout=timeout,
        max_retries=1,
    )
    try:
        remote = client.score(prompts, references, candidates, wrappers)
    finally:
        client.close()
    if tolerance is None:
        tolerance = 1e-3 * max(1.0, max(abs(x) for x in local))
    check = EngineCheck(backend, url, remote, local, tolerance)
    if not check.agrees:
        rows = (prompts, references, candidates, wrappers)
        check.causes = _explain(check, scorer, rows, api_key=api_key, model_name=model_name, timeout=timeout)
    return check


def _wrappers(prompts: Sequence[Any], references: Sequence[Any], candidates: Sequence[Any], wrappers: Any) -> list:
    """The rows' wrappers ("sft" by default), once the rows are known to be rows."""
    n = len(candidates)
    if not (len(prompts) == len(references) == n) or n == 0:
        raise ValueError(
            f"check_engine needs rows: got {len(prompts)} prompts, {len(references)} references, {n} candidates."
        )
    return list(wrappers) if wrappers is not None else ["sft"] * n


def _explain(check: EngineCheck, scorer: Any, rows: tuple, **engine: Any) -> list[str]:
    """Why the engine's scores differ: the in-process scores of variants of the input (the engine's own token
    ids, no BOS, the other wrapper) compared with the remote ones, and the engine's tokenization with ours."""
    prompts, references, candidates, wrappers = rows
    remote, tolerance, url, backend = check.remote, check.tolerance, check.url, check.backend
    api_key, model_name, timeout = engine["api_key"], engine["model_name"], engine["timeout"]
    template = scorer.template
    texts = [template.format(p, r, c, w) for p, r, c, w in zip(prompts, references, candidates, wrappers)]
    ids = [template.tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
    engine_ids, note = engine_tokenization(url, backend, texts[:TOKENIZE_ROWS], api_key, model_name, timeout)
    if note:
        check.notes.append(note)
    alternatives = {}
    if engine_ids is not None and all(x[-1:] == [template.reward_token_id] for x in engine_ids):
        # The engine's ids scored here: if that gives the remote scores, tokenization is the whole difference.
        alternatives["engine ids"] = scorer.score_ids([*engine_ids, *ids[len(engine_ids) :]])
    bos = template.tokenizer.bos_token_id
    if bos is not None and all(x and x[0] == bos for x in ids):
        alternatives["no BOS"] = scorer.score_ids([x[1:] for x in ids])
    other = ["pretrain" if w == "sft" else "sft" for w in wrappers]
    alternatives["other wrapper"] = scorer.score(prompts, references, candidates, other)
    return diagnose(
        remote,
        check.local,
        tolerance=tolerance,
        alternatives=alternatives,
        tokenization=compare_ids(engine_ids, ids, template) if engine_ids is not None else [],
        wrapper=wrappers[0],
    )


# Where each engine tokenizes a text: lmdeploy's /v1/encode ({"input", "add_bos"} -> {"input_ids"}); vLLM's and
# this server's /tokenize, SGLang's /v1/tokenize (older: /tokenize) ({"prompt", "add_special_tokens"} -> {"tokens"}).
TOKENIZE_ROUTES = {
    "lmdeploy": ("/v1/encode",),
    "vllm": ("/tokenize",),
    "sglang": ("/v1/tokenize", "/tokenize"),
    "trl-polar": ("/tokenize",),
}


def engine_tokenization(
    url: str, backend: str, texts: list[str], api_key: str | None, model_name: str | None, timeout: float
) -> tuple[list[list[int]] | None, str | None]:
    """The engine's token ids of ``texts``, from its tokenizer route, or (None, why not)."""
    import httpx

    base = url.strip().rstrip("/")
    base = base if "://" in base else "http://" + base
    for endpoint in ("/score", "/pooling", "/classify", "/get_reward"):
        base = base.removesuffix(endpoint)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    tried = []
    with httpx.Client(timeout=timeout, headers=headers) as http:
        for route in TOKENIZE_ROUTES[backend]:
            try:
                out = [_tokenize(http, base + route, route, text, model_name) for text in texts]
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as err:
                tried.append(f"{route}: {type(err).__name__}: {str(err)[:120]}")
                continue
            return out, None
    return None, f"the engine's tokenization was not checked ({'; '.join(tried)})."


def _tokenize(http: Any, url: str, route: str, text: str, model_name: str | None) -> list[int]:
    if route == "/v1/encode":
        answer = http.post(url, json={"input": text, "add_bos": True})
        key = "input_ids"
    else:
        answer = http.post(
            url, json={"prompt": text, "add_special_tokens": True, **({"model": model_name} if model_name else {})}
        )
        key = "tokens"
    answer.raise_for_status()
    return [int(t) for t in answer.json()[key]]


def compare_ids(engine: list[list[int]], local: list[list[int]], template: Any) -> list[str]:
    """What differs between the engine's and the local token ids of the same texts (empty when they agree)."""
    tokenizer = template.tokenizer
    for i, (a, b) in enumerate(zip(engine, local)):
        if a == b:
            continue
        if a[-1:] != [template.reward_token_id]:
            last = tokenizer.convert_ids_to_tokens(a[-3:])
            return [
                f"tokenizer or special tokens: the engine does not tokenize {template.reward_token!r} as the reward "
                f"token (id {template.reward_token_id}); row {i} ends with {last}, so the head reads another token. "
                "Serve the checkpoint with its own tokenizer (the reward token must be a special token)."
            ]
        if tokenizer.bos_token_id is not None and (a[:1] == [tokenizer.bos_token_id]) != (
            b[:1] == [tokenizer.bos_token_id]
        ):
            has = "adds no" if b[:1] == [tokenizer.bos_token_id] else "adds a"
            return [
                f"tokenizer or special tokens: the engine {has} BOS token ({tokenizer.bos_token!r}) at the start "
                f"of row {i}, unlike the model's training; serve it with the checkpoint's tokenizer config."
            ]
        at = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return [
            f"tokenizer or special tokens: the engine tokenizes row {i} differently ({len(a)} tokens against "
            f"{len(b)} here, the first difference at token {at}: {tokenizer.convert_ids_to_tokens(a[at : at + 3])} "
            f"against {tokenizer.convert_ids_to_tokens(b[at : at + 3])}); serve the checkpoint with its own tokenizer."
        ]
    return []


def _close(a: Sequence[float], b: Sequence[float], tolerance: float) -> bool:
    return all(abs(x - y) <= tolerance for x, y in zip(a, b))


def _fit(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, float, float]:
    """Least squares y = a * x + b: (a, b, the largest residual, the correlation)."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((v - mx) ** 2 for v in x)
    syy = sum((v - my) ** 2 for v in y)
    sxy = sum((u - mx) * (v - my) for u, v in zip(x, y))
    a = sxy / sxx if sxx > 0 else 0.0
    b = my - a * mx
    residual = max(abs(v - (a * u + b)) for u, v in zip(x, y))
    r = sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else 0.0
    return a, b, residual, r


def diagnose(
    remote: Sequence[float],
    local: Sequence[float],
    *,
    tolerance: float,
    alternatives: dict[str, Sequence[float]] | None = None,
    tokenization: list[str] | None = None,
    wrapper: str = "sft",
) -> list[str]:
    """The likely causes of ``remote`` differing from ``local`` (see the module's docstring for the order).

    ``alternatives``: in-process scores of variants of the input ("engine ids", "no BOS", "other wrapper") that
    the remote scores are compared with; ``tokenization``: what `compare_ids` found.
    """
    alternatives = alternatives or {}
    causes = list(tokenization or [])
    if "engine ids" in alternatives and causes and _close(remote, alternatives["engine ids"], tolerance):
        causes.append(
            "the in-process model scores the engine's token ids as the engine does: the tokenization is "
            "the whole difference."
        )
        return causes
    if "no BOS" in alternatives and _close(remote, alternatives["no BOS"], tolerance):
        return [
            *causes,
            "tokenizer or special tokens: the remote scores are the in-process scores of the text without "
            "its BOS token: the engine's tokenizer does not add BOS (set add_bos_token, or serve the "
            "checkpoint's tokenizer config).",
        ]
    if "other wrapper" in alternatives and _close(remote, alternatives["other wrapper"], tolerance):
        other = "pretrain" if wrapper == "sft" else "sft"
        return [
            *causes,
            f"template text: the remote scores are the in-process scores of the {other!r} wrapper's "
            f"text (the '\\n' after the prompt {'dropped' if other == 'pretrain' else 'added'}); send "
            f"wrapper={other!r} rows here or fix the engine's template.",
        ]
    return causes or _head_causes(remote, local, tolerance)


def _head_causes(remote: Sequence[float], local: Sequence[float], tolerance: float) -> list[str]:
    """The causes read from the scores alone, when the input explains nothing: an activation, an affine head, the
    engine's precision, or another model."""
    if _close(remote, [1 / (1 + math.exp(-x)) for x in local], tolerance):
        return [
            "head or activation: the remote scores are sigmoid(in-process scores): the engine applies an "
            "activation to the head's output (vLLM's use_activation for classify/reward poolers); read raw "
            "scores (use_activation=false) or take the logit of what it returns."
        ]
    a, b, residual, r = _fit(local, remote)
    if len(local) >= 2 and residual <= tolerance:
        if abs(a - 1) <= 1e-3:
            return [
                f"head or activation: a constant offset, remote = in process {b:+.6g}: a bias in the served head "
                "or a reward normalisation on the engine's side."
            ]
        if abs(a + 1) <= 1e-3 and abs(b) <= tolerance:
            return [
                "head or activation: the sign is flipped (remote = -in process): the served head's weights are "
                "negated, or the engine reports a loss, not a reward."
            ]
        return [
            f"head or activation: remote = {a:.6g} * in process {b:+.6g}: the engine serves a scaled or "
            "shifted value head (another head, or a normalisation) over the same backbone."
        ]
    spread = max(1.0, max(abs(x) for x in local))
    largest = max(abs(x - y) for x, y in zip(remote, local))
    if largest <= PRECISION_SPREAD * spread and (len(local) < 3 or r >= 0.99):
        return [
            f"precision: differences up to {largest:.3g} ({100 * largest / spread:.2g}% of the score scale) "
            "without a pattern, what a bf16/fp16 engine gives against fp32 in process; rerun with --dtype bf16 "
            "(or serve in fp32) to confirm."
        ]
    return [
        f"model: the remote scores do not follow the in-process ones (correlation {r:.3f}): the engine serves "
        "another checkpoint or another head; pass the served checkpoint as --model."
    ]
