"""Generation backends: what synthesis needs from an inference engine, for transformers and for vLLM."""

from __future__ import annotations

import gc
import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..io import DataError
from .config import Policy, SamplingConfig, SynthesisConfig


@dataclass(frozen=True)
class Request:
    """One trajectory to sample: the prompt as raw text, or as messages for a chat policy's template."""

    text: str
    messages: list[dict[str, str]] | None


@dataclass(frozen=True)
class Generation:
    """A sampled trajectory: its new token ids (EOS excluded), whether it ended by EOS (not the length cap), and the
    prompt ids the policy continued (None if the backend does not say; the trajectory is then decoded alone)."""

    token_ids: list[int]
    finished: bool
    prompt_token_ids: list[int] | None = None


class GenerationBackend(Protocol):
    """What synthesis needs from an inference engine."""

    name: str

    def generate(
        self, policy: Policy, requests: Sequence[Request], sampling: SamplingConfig, seed: int
    ) -> list[Generation]: ...

    def decode(self, policy: Policy, token_ids: Sequence[int]) -> str: ...

    def close(self) -> None: ...


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts, stable across processes and Python versions."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _prompt_text(policy: Policy, request: Request, tokenizer: Any) -> tuple[str, bool]:
    """The text given to the policy and whether it already holds the special tokens (a rendered chat template)."""
    if policy.kind == "chat" and request.messages is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(
                f"Policy {policy.name!r} is tagged chat but its tokenizer has no chat template; tag it ':base' or "
                "give it a tokenizer with a chat_template."
            )
        return tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=False), True
    return request.text, False


class TransformersBackend:
    """Batched sampling with `transformers` ``generate`` (the default backend; CPU or GPU).

    Requests are sorted by length and left-padded in batches of ``batch_size``; each batch is seeded from the
    caller's seed and its index, so a given seed and batch size always give the same trajectories.
    """

    name = "transformers"

    def __init__(self, batch_size: int = 16, device: Any = None, dtype: str = "auto", max_loaded: int = 2,
                 progress: bool = False, trust_remote_code: bool = False) -> None:  # fmt: skip
        import torch

        self.trust_remote_code = trust_remote_code
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.max_loaded = max_loaded
        self.progress = progress
        self._loaded: OrderedDict[str, tuple[Any, Any]] = OrderedDict()

    def _load(self, policy: Policy) -> tuple[Any, Any]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if policy.name in self._loaded:
            self._loaded.move_to_end(policy.name)
            return self._loaded[policy.name]
        while len(self._loaded) >= self.max_loaded:
            self._loaded.popitem(last=False)
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        # Always explicit: with None, transformers asks on the terminal about repositories that ship code.
        remote = self.trust_remote_code
        tokenizer = AutoTokenizer.from_pretrained(policy.path, trust_remote_code=remote)
        tokenizer.padding_side = "left"  # decoder-only generation appends after the prompt: pad on the left
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        dtype = self.dtype if self.dtype == "auto" else getattr(torch, self.dtype)
        model = AutoModelForCausalLM.from_pretrained(policy.path, dtype=dtype, trust_remote_code=remote)
        model = model.to(self.device).eval()
        self._loaded[policy.name] = (model, tokenizer)
        return model, tokenizer

    @staticmethod
    def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
        ids = model.generation_config.eos_token_id
        ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
        if tokenizer.eos_token_id is not None:
            ids.add(tokenizer.eos_token_id)
        return ids

    def generate(self, policy, requests, sampling, seed):
        import torch
        from tqdm.auto import tqdm

        model, tokenizer = self._load(policy)
        eos = self._eos_ids(model, tokenizer)
        encoded = []
        for request in requests:
            text, templated = _prompt_text(policy, request, tokenizer)
            encoded.append(tokenizer(text, add_special_tokens=not templated)["input_ids"])
        # Longest first: similar lengths share a batch, which wastes less compute on padding.
        order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))
        results: list[Generation | None] = [None] * len(encoded)
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for b, batch in enumerate(tqdm(batches, desc=f"  {policy.name}", leave=False, disable=not self.progress)):
            padded = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt").to(self.device)
            torch.manual_seed(derive_seed(seed, "batch", b))
            with torch.no_grad():
                out = model.generate(
                    **padded,
                    do_sample=True,
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    top_k=sampling.top_k,
                    max_new_tokens=sampling.max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=sorted(eos),
                )
            new = out[:, padded["input_ids"].shape[1] :].tolist()
            for i, ids in zip(batch, new):
                end = next((j for j, t in enumerate(ids) if t in eos), None)
                results[i] = Generation(ids if end is None else ids[:end], end is not None, encoded[i])
        return results

    def decode(self, policy, token_ids):
        _, tokenizer = self._load(policy)
        return tokenizer.decode(token_ids, skip_special_tokens=True)

    def close(self) -> None:
        self._loaded.clear()
        gc.collect()


class VLLMBackend:
    """Sampling with vLLM (GPU only; ``pip install trl-polar[vllm]``).

    Same interface as `TransformersBackend`. Every request carries its own seed, so results do not depend on how
    vLLM batches them. NOT tested in this project's CI (no GPU there): see docs/data.md.
    """

    name = "vllm"

    def __init__(
        self,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.85,
        trust_remote_code: bool = False,
        **llm_kwargs: Any,
    ) -> None:
        try:
            import vllm  # noqa: F401 - imported here so that the rest of trl_polar never needs vLLM
        except ImportError as e:
            raise ImportError(
                "The vLLM backend needs vLLM: pip install 'trl-polar[vllm]' (GPU only), or use backend='transformers'."
            ) from e
        self.dtype = dtype
        self.llm_kwargs = {
            "gpu_memory_utilization": gpu_memory_utilization,
            "trust_remote_code": trust_remote_code,
            **llm_kwargs,
        }
        self._policy: Policy | None = None
        self._llm: Any = None

    def _load(self, policy: Policy) -> Any:
        from vllm import LLM

        if self._policy != policy:
            self.close()  # one engine at a time: each takes most of the GPU's memory
            self._llm = LLM(model=policy.path, dtype=self.dtype, seed=0, **self.llm_kwargs)
            self._policy = policy
        return self._llm

    def generate(self, policy, requests, sampling, seed):
        from vllm import SamplingParams

        llm = self._load(policy)
        tokenizer = llm.get_tokenizer()
        prompts, params = [], []
        for i, request in enumerate(requests):
            text, templated = _prompt_text(policy, request, tokenizer)
            prompts.append({"prompt_token_ids": tokenizer(text, add_special_tokens=not templated)["input_ids"]})
            params.append(
                SamplingParams(
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    top_k=sampling.top_k,
                    max_tokens=sampling.max_new_tokens,
                    seed=derive_seed(seed, "request", i) % (2**31),
                )
            )
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return [
            Generation(list(o.outputs[0].token_ids), o.outputs[0].finish_reason == "stop", p["prompt_token_ids"])
            for o, p in zip(outputs, prompts)
        ]

    def decode(self, policy, token_ids):
        return self._load(policy).get_tokenizer().decode(token_ids, skip_special_tokens=True)

    def close(self) -> None:
        if self._llm is not None:
            import torch

            self._llm, self._policy = None, None
            gc.collect()
            torch.cuda.empty_cache()


def make_backend(config: SynthesisConfig, device: Any = None) -> GenerationBackend:
    if config.backend == "vllm":
        return VLLMBackend(dtype=config.dtype, trust_remote_code=config.trust_remote_code)
    return TransformersBackend(
        batch_size=config.batch_size,
        device=device,
        dtype=config.dtype,
        max_loaded=config.max_loaded_policies,
        progress=config.progress,
        trust_remote_code=config.trust_remote_code,
    )
