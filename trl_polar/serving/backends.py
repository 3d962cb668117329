"""One small adapter per engine `PolarClient` talks to: its endpoint, its request body, where its answer holds
the scores. The shapes themselves are the models of `trl_polar.serving.protocol`.

- ``"trl-polar"``: this project's server, ``POST /score`` with the raw triples; the server formats them itself.
- ``"lmdeploy"``: ``POST /pooling {"input": [text, ...]}`` -> ``data[i].data`` is the score.
- ``"vllm"``: ``POST /pooling {"input": [text, ...]}`` -> ``data[i].data`` holds per-token values (ALL pooling, as
  vLLM's InternLM2 reward model does) or one value: the score is the last one.
- ``"sglang"``: ``POST /classify {"model": name, "text": [text, ...]}`` -> a list whose ``item.embedding[0]`` is the
  score.

The last three receive each text built by `PolarTemplate.format` (exactly what the official POLAR client sends,
reward-token text included).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ValidationError

from ..template import PolarTemplate, Text, flatten
from .errors import first_error
from .protocol import ClassifyResponse, PoolingResponse, ScoreResponse


class Backend:
    """This project's server: raw triples to ``/score``."""

    name = "trl-polar"
    endpoint = "/score"
    formats = False  # whether the client builds the text (and so needs the template)

    def item(self, template: PolarTemplate | None, prompt: Text, reference: Text, candidate: Text, wrapper: str):
        for name, value in (("prompt", prompt), ("reference", reference), ("candidate", candidate)):
            flatten(value, name)  # fail here, naming the item, rather than with a 422
        # Each item carries its wrapper, so that one request may mix "sft" and "pretrain" items.
        return {"prompt": prompt, "reference": reference, "candidate": candidate, "wrapper": wrapper}

    def request(self, chunk: list, model_name: str | None, wrapper: str) -> dict:
        return {"items": chunk, "options": {"wrapper": wrapper}}

    def scores(self, body: Any, n: int) -> list[float]:
        return list(_read(ScoreResponse, body).scores)


class Lmdeploy(Backend):
    name = "lmdeploy"
    endpoint = "/pooling"
    formats = True

    def item(self, template, prompt, reference, candidate, wrapper) -> str:
        return template.format(prompt, reference, candidate, wrapper)

    def request(self, chunk: list, model_name: str | None, wrapper: str) -> dict:
        return {"input": chunk, **({"model": model_name} if model_name else {})}

    def scores(self, body: Any, n: int) -> list[float]:
        return _indexed(_read(PoolingResponse, body).data, n, lambda item, i: _last_value(item.data, f"data[{i}]"))


class VLLM(Lmdeploy):
    name = "vllm"


class SGLang(Lmdeploy):
    name = "sglang"
    endpoint = "/classify"

    def request(self, chunk: list, model_name: str | None, wrapper: str) -> dict:
        return {"text": chunk, **({"model": model_name} if model_name else {})}

    def scores(self, body: Any, n: int) -> list[float]:
        items = [body] if isinstance(body, dict) and n == 1 else body  # one input may come back as a bare object
        return _indexed(_read(ClassifyResponse, items).root, n, lambda item, i: item.embedding[0])


BACKENDS: dict[str, Backend] = {b.name: b for b in (Backend(), VLLM(), SGLang(), Lmdeploy())}


def parse_scores(backend: str, body: Any, n: int) -> list[float]:
    """Scores from a server's JSON answer to ``n`` inputs, in input order; a wrong shape or count raises ValueError."""
    values = BACKENDS[backend].scores(body, n)
    if len(values) != n:
        raise ValueError(f"the answer holds {len(values)} scores for {n} inputs")
    return [float(v) for v in values]


def _read(model: type[BaseModel], body: Any) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as err:
        raise ValueError(f"{first_error(model, err.errors(), whole='the answer')[1]} Got: {str(body):.200}") from None


def _last_value(data: Any, where: str) -> float:
    """The score inside a pooling item: a number, ``[v]``, per-token ``[v1, ..., vn]`` or ``[[v1], ..., [vn]]``."""
    if not isinstance(data, list):
        return data
    if not data:
        raise ValueError(f"`{where}.data` is an empty list")
    last = data[-1]
    if isinstance(last, list):
        if len(last) != 1:
            raise ValueError(f"`{where}.data[-1]` has {len(last)} values; a reward model has one")
        return last[0]
    return last


def _indexed(items: list, n: int, value_of: Callable[[Any, int], float]) -> list[float]:
    # Servers may answer out of order; every item then carries its input's index.
    if items and all(item.index is not None for item in items):
        indices = [item.index for item in items]
        if sorted(indices) != list(range(len(items))):
            raise ValueError(f"the answer's indices {indices[:20]} are not 0..{len(items) - 1}")
        items = sorted(items, key=lambda item: item.index)
    return [value_of(item, i) for i, item in enumerate(items)]
