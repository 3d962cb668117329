"""POLAR pre-training data synthesis from a policy pool (paper §3.3, Eq. 7, App. D.1.1).

For each prompt two different policies A and B are drawn at random; A writes two trajectories (the *reference* and
the *chosen*), B writes one (the *rejected*). No labels are involved: "same policy" is what the reward model learns
to prefer. Sampling follows the paper (temperature 1.0, top-p 0.9, top-k 50, at most 4096 new tokens).

Output is a directory of shards, each written atomically (temporary file + rename), plus a manifest::

    out/run.json              the settings and the prompts' fingerprint (a resumed run must match them)
    out/shard-00000.parquet   the triples of prompts [0, shard_size)
    out/shard-00000.json      that shard's counts; its presence marks the shard as complete
    out/manifest.json         all shards, total counts, and whether the run is complete

A shard's content depends only on the seed, the shard index and the settings, never on which process made it or
when, so a run killed at any moment (even ``kill -9``) and started again regenerates exactly the missing shards:
no triple is lost and none is duplicated. Under ``accelerate launch`` rank r makes shards r, r + world, ...
"""

from __future__ import annotations

import gc
import glob
import hashlib
import json
import logging
import os
import random
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..template import flatten
from .io import DataError, atomic_write_json, read_rows, write_rows
from .prompts import PromptSet
from .trimming import trim_incomplete_ending, trim_loop

logger = logging.getLogger(__name__)

POLICY_KINDS = ("base", "chat")
BACKENDS = ("transformers", "vllm")
OUTPUT_FORMATS = ("parquet", "jsonl")
INCOMPLETE_ENDINGS = ("trim", "keep", "drop")
ROLES = ("reference", "chosen", "rejected")
RUN_FILE, MANIFEST_FILE = "run.json", "manifest.json"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class Policy:
    """One policy of the pool: a model id or path, tagged base (continues raw text) or chat (answers instructions)."""

    name: str
    path: str
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in POLICY_KINDS:
            raise ValueError(f"Policy {self.name!r}: kind must be one of {POLICY_KINDS}, got {self.kind!r}.")

    @classmethod
    def parse(cls, spec: str) -> Policy:
        """Parse ``[NAME=]PATH[:base|:chat]``; without a kind, a tokenizer with a chat template means chat.

        >>> Policy.parse("small=Qwen/Qwen2.5-0.5B:base")
        Policy(name='small', path='Qwen/Qwen2.5-0.5B', kind='base')
        """
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"A policy must be given as '[NAME=]PATH[:base|:chat]', got {spec!r}.")
        name, sep, rest = spec.partition("=")
        if not sep:
            name, rest = "", spec
        path, kind = rest, None
        head, colon, tail = rest.rpartition(":")
        if colon and tail in POLICY_KINDS:
            path, kind = head, tail
        if not path:
            raise ValueError(f"Policy {spec!r} has no path; use '[NAME=]PATH[:base|:chat]'.")
        if kind is None:
            kind = _detect_kind(path)
        return cls(name or path.rstrip("/").replace("\\", "/"), path, kind)


def _detect_kind(path: str) -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    return "chat" if getattr(tokenizer, "chat_template", None) else "base"


@dataclass
class SamplingConfig:
    """How each policy samples, and how its trajectories are cleaned (paper App. D.1.1)."""

    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (paper: 1.0)."})
    top_p: float = field(default=0.9, metadata={"help": "Nucleus sampling mass (paper: 0.9)."})
    top_k: int = field(default=50, metadata={"help": "Top-k sampling (paper: 50)."})
    max_new_tokens: int = field(default=4096, metadata={"help": "Longest trajectory in tokens (paper: 4096)."})
    trim_loops: bool = field(
        default=True, metadata={"help": "Cut repetition loops short (kept, not dropped: a policy trait)."}
    )
    loop_keep_repeats: int = field(default=2, metadata={"help": "Copies of a looping block kept after trimming."})
    loop_max_period: int = field(default=128, metadata={"help": "Longest looping block searched for, in tokens."})
    loop_min_repeats: int = field(default=4, metadata={"help": "Copies in a row that make a repetition a loop."})
    loop_min_tokens: int = field(default=32, metadata={"help": "Fewest tokens a loop covers to count as one."})
    incomplete_endings: str = field(
        default="trim",
        metadata={
            "help": "Trajectories that hit max_new_tokens: 'trim' cuts them back to the last sentence end (as the "
            "paper, so each is self-contained), 'keep' leaves them, 'drop' drops their triple (counted)."
        },
    )

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"`temperature` must be > 0 (sampling), got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"`top_p` must lie in (0, 1], got {self.top_p}.")
        if self.top_k < 0 or self.max_new_tokens <= 0:
            raise ValueError(f"Need top_k >= 0 and max_new_tokens > 0, got {self.top_k} and {self.max_new_tokens}.")
        if self.incomplete_endings not in INCOMPLETE_ENDINGS:
            raise ValueError(
                f"`incomplete_endings` must be one of {INCOMPLETE_ENDINGS}, got {self.incomplete_endings!r}."
            )
        if self.loop_keep_repeats < 1 or self.loop_min_repeats <= self.loop_keep_repeats:
            raise ValueError(
                "Need 1 <= loop_keep_repeats < loop_min_repeats, so that a trimmed loop is shorter than a loop."
            )


@dataclass
class SynthesisConfig:
    """A synthesis run: the pool, the output and the backend."""

    out_dir: str = field(metadata={"help": "Output directory (shards, manifest); an existing run there resumes."})
    policies: list[str] = field(
        metadata={"help": "The pool, each '[NAME=]PATH[:base|:chat]'; at least two policies per prompt kind."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the A/B draws and of sampling."})
    shard_size: int = field(default=1000, metadata={"help": "Prompts per shard (the unit of resumption)."})
    output_format: str = field(default="parquet", metadata={"help": "'parquet' or 'jsonl'."})
    backend: str = field(default="transformers", metadata={"help": "'transformers' (default) or 'vllm' (GPU)."})
    batch_size: int = field(default=16, metadata={"help": "Prompts per generate call (transformers backend)."})
    dtype: str = field(default="auto", metadata={"help": "Model dtype: 'auto', 'bfloat16', 'float16', 'float32'."})
    chat_on_prefixes: bool = field(
        default=False,
        metadata={"help": "Let chat policies continue raw-text prefixes too (default: only base policies do)."},
    )
    max_loaded_policies: int = field(
        default=2, metadata={"help": "Policies kept in memory at once by the transformers backend."}
    )
    progress: bool = field(default=True, metadata={"help": "Show tqdm progress bars."})
    sampling: SamplingConfig = field(default_factory=SamplingConfig, metadata={"help": "Sampling settings."})

    def __post_init__(self) -> None:
        if isinstance(self.sampling, Mapping):
            self.sampling = SamplingConfig(**self.sampling)
        if self.output_format not in OUTPUT_FORMATS:
            raise ValueError(f"`output_format` must be one of {OUTPUT_FORMATS}, got {self.output_format!r}.")
        if self.backend not in BACKENDS:
            raise ValueError(f"`backend` must be one of {BACKENDS}, got {self.backend!r}.")
        for name in ("shard_size", "batch_size", "max_loaded_policies"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)!r}.")
        if len(self.policies) < 2:
            raise ValueError(f"The pool needs at least two policies (A and B differ), got {len(self.policies)}.")


# ------------------------------------------------------------------------------------------------------ backends
@dataclass(frozen=True)
class Request:
    """One trajectory to sample: the prompt as raw text, or as messages for a chat policy's template."""

    text: str
    messages: list[dict[str, str]] | None


@dataclass(frozen=True)
class Generation:
    """A sampled trajectory: its new token ids (EOS excluded) and whether it ended by EOS (not the length cap)."""

    token_ids: list[int]
    finished: bool


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
                 progress: bool = False) -> None:  # fmt: skip
        import torch

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
        tokenizer = AutoTokenizer.from_pretrained(policy.path)
        tokenizer.padding_side = "left"  # decoder-only generation appends after the prompt: pad on the left
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        dtype = self.dtype if self.dtype == "auto" else getattr(torch, self.dtype)
        model = AutoModelForCausalLM.from_pretrained(policy.path, dtype=dtype).to(self.device).eval()
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
                results[i] = Generation(ids if end is None else ids[:end], end is not None)
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

    def __init__(self, dtype: str = "auto", gpu_memory_utilization: float = 0.85, **llm_kwargs: Any) -> None:
        try:
            import vllm  # noqa: F401 - imported here so that the rest of trl_polar never needs vLLM
        except ImportError as e:
            raise ImportError(
                "The vLLM backend needs vLLM: pip install 'trl-polar[vllm]' (GPU only), or use backend='transformers'."
            ) from e
        self.dtype = dtype
        self.llm_kwargs = {"gpu_memory_utilization": gpu_memory_utilization, **llm_kwargs}
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
        return [Generation(list(o.outputs[0].token_ids), o.outputs[0].finish_reason == "stop") for o in outputs]

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
        return VLLMBackend(dtype=config.dtype)
    return TransformersBackend(
        batch_size=config.batch_size,
        device=device,
        dtype=config.dtype,
        max_loaded=config.max_loaded_policies,
        progress=config.progress,
    )


# ------------------------------------------------------------------------------------------------------ synthesis
@dataclass
class SynthesisResult:
    """What a run produced: its directory, shard files and the manifest's total counts."""

    out_dir: Path
    files: list[Path]
    totals: dict[str, int]
    complete: bool

    def rows(self) -> list[dict[str, Any]]:
        """All triples, shard by shard (fine for small runs; use `datasets.load_dataset` on `files` for big ones)."""
        return [row for path in self.files for row in read_rows(path)]


def prompt_rows(prompts: PromptSet | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Normalise prompts: a `PromptSet`, or rows with ``prompt`` (text or messages) and optional ``prompt_id``."""
    rows = prompts.rows if isinstance(prompts, PromptSet) else prompts
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping) or "prompt" not in row:
            raise DataError(f"prompt row {i}: needs a 'prompt' field (text or message list), got {row!r:.80}.")
        value = row["prompt"]
        messages = row.get("messages")
        if messages is None and not isinstance(value, str):
            messages = [dict(m) for m in value]
        kind = row.get("kind") or ("instruction" if messages is not None else "prefix")
        if kind not in ("prefix", "instruction"):
            raise DataError(f"prompt row {i}: kind must be 'prefix' or 'instruction', got {kind!r}.")
        if kind == "instruction" and messages is None:
            messages = [{"role": "user", "content": value}]  # a chat policy answers it through its template
        out.append(
            {
                "prompt_id": str(row.get("prompt_id", i)),
                "kind": kind,
                "prompt": flatten(value, f"prompts[{i}]") if messages is None else flatten(messages, f"prompts[{i}]"),
                "messages": messages,
                "wrapper": row.get("wrapper") or ("sft" if kind == "instruction" else "pretrain"),
            }
        )
    ids = Counter(r["prompt_id"] for r in out)
    duplicates = [k for k, v in ids.items() if v > 1]
    if duplicates:
        raise DataError(f"Prompt ids must be unique; these repeat: {duplicates[:5]}. Give each prompt its own id.")
    return out


def _shard_name(index: int, suffix: str) -> str:
    return f"shard-{index:05d}.{suffix}"


def _run_settings(config: SynthesisConfig, policies: list[Policy], rows: list[dict], fingerprint: str) -> dict:
    # Everything that changes a shard's content; progress bars and memory limits do not.
    return {
        "format_version": FORMAT_VERSION,
        "seed": config.seed,
        "shard_size": config.shard_size,
        "output_format": config.output_format,
        "backend": config.backend,
        "batch_size": config.batch_size,
        "dtype": config.dtype,
        "chat_on_prefixes": config.chat_on_prefixes,
        "policies": [asdict(p) for p in policies],
        "sampling": asdict(config.sampling),
        "num_prompts": len(rows),
        "prompts_fingerprint": fingerprint,
    }


def _check_resume(out_dir: Path, settings: dict) -> None:
    path = out_dir / RUN_FILE
    if not path.exists():
        atomic_write_json(path, settings)
        return
    old = json.loads(path.read_text(encoding="utf-8"))
    changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if changed:
        details = "; ".join(f"{k}: was {old.get(k)!r:.60}, now {settings.get(k)!r:.60}" for k in changed)
        raise DataError(
            f"{out_dir} holds a run with other settings ({details}). Resuming would mix two datasets: use another "
            "--out directory, or restore the original settings to resume."
        )
    logger.info("resuming the run in %s", out_dir)


class Synthesizer:
    """Runs the policy-pool synthesis; see the module docstring. Use `synthesize` for a one-call run."""

    def __init__(self, config: SynthesisConfig, backend: GenerationBackend | None = None) -> None:
        import torch
        from accelerate import PartialState

        self.config = config
        # cpu=True on a CPU-only box: otherwise PartialState reports one process of one under accelerate launch and
        # every rank would make every shard (feasibility.md §1).
        self.state = PartialState(cpu=not torch.cuda.is_available())
        self.policies = [p if isinstance(p, Policy) else Policy.parse(p) for p in config.policies]
        names = Counter(p.name for p in self.policies)
        if any(v > 1 for v in names.values()):
            raise DataError(f"Policy names must be unique, got {dict(names)}; name them with NAME=PATH.")
        self.backend = backend or make_backend(config, device=self.state.device)

    def eligible(self, kind: str) -> list[Policy]:
        if kind == "instruction":
            return [p for p in self.policies if p.kind == "chat"]
        return [p for p in self.policies if p.kind == "base" or self.config.chat_on_prefixes]

    def draw_pair(self, prompt_id: str, kind: str) -> tuple[Policy, Policy]:
        """Policies A and B for one prompt: two different ones, seeded by the prompt's id alone."""
        pool = self.eligible(kind)
        a, b = random.Random(f"{self.config.seed}/pair/{prompt_id}").sample(pool, 2)
        return a, b

    def run(self, prompts: PromptSet | Sequence[Mapping[str, Any]]) -> SynthesisResult:
        from tqdm.auto import tqdm

        config, state = self.config, self.state
        rows = prompt_rows(prompts)
        kept, seen, duplicate_prompts = [], set(), 0
        for row in rows:
            # Exact duplicate prompts would give duplicate-looking triples; the first is kept, the rest counted.
            key = (row["prompt"], row["kind"])
            if key in seen:
                duplicate_prompts += 1
                continue
            seen.add(key)
            kept.append(row)
        rows = kept
        for kind in sorted({r["kind"] for r in rows}):
            pool = self.eligible(kind)
            if len(pool) < 2:
                who = "chat" if kind == "instruction" else "base (or chat with chat_on_prefixes)"
                raise DataError(
                    f"{kind} prompts need at least two {who} policies, the pool has {[p.name for p in pool]}. Add "
                    "policies tagged ':base' / ':chat', or change the prompt mix."
                )
        fingerprint = PromptSet(rows, Counter(), None).fingerprint()
        out_dir = Path(config.out_dir)
        settings = _run_settings(config, self.policies, rows, fingerprint)
        if state.is_main_process:
            out_dir.mkdir(parents=True, exist_ok=True)
            _check_resume(out_dir, settings)
        state.wait_for_everyone()
        if not state.is_main_process:
            _check_resume(out_dir, settings)  # every rank fails alike when the settings differ

        suffix = config.output_format
        num_shards = (len(rows) + config.shard_size - 1) // config.shard_size
        mine = list(range(state.process_index, num_shards, state.num_processes))
        todo = []
        for k in mine:
            for stray in glob.glob(str(out_dir / f".tmp-shard-{k:05d}.*")):
                # Left by a run killed while writing; its shard is regenerated below.
                logger.warning("removing %s, a partial write of a killed run", stray)
                os.unlink(stray)
            if not (out_dir / _shard_name(k, "json")).exists():
                todo.append(k)
        if len(todo) < len(mine):
            logger.info("rank %d: %d of its %d shards are already complete", state.process_index,
                        len(mine) - len(todo), len(mine))  # fmt: skip
        bar = tqdm(
            total=len(mine),
            initial=len(mine) - len(todo),
            desc=f"shards (rank {state.process_index})",
            disable=not config.progress,
            position=state.process_index,
        )
        for k in todo:
            shard_rows, counts = self._make_shard(k, rows[k * config.shard_size : (k + 1) * config.shard_size])
            if k == 0:
                counts["duplicate_prompts"] += duplicate_prompts
            # Data first, then the counts file: the counts file is what marks a shard complete.
            write_rows(shard_rows, out_dir / _shard_name(k, suffix))
            atomic_write_json(out_dir / _shard_name(k, "json"), {"index": k, "rows": len(shard_rows), **counts})
            bar.update(1)
            bar.set_postfix(triples=counts["triples"])
            if state.num_processes == 1:
                self._write_manifest(out_dir, num_shards, suffix)
        bar.close()
        logger.info("rank %d of %d made shards %s", state.process_index, state.num_processes, todo)
        state.wait_for_everyone()
        if state.is_main_process:
            self._write_manifest(out_dir, num_shards, suffix)
        state.wait_for_everyone()
        manifest = json.loads((out_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
        if state.is_main_process:
            logger.info("synthesis totals: %s", manifest["totals"])
        files = [out_dir / s["file"] for s in manifest["shards"]]
        return SynthesisResult(out_dir, files, manifest["totals"], manifest["complete"])

    def _write_manifest(self, out_dir: Path, num_shards: int, suffix: str) -> None:
        shards, totals = [], Counter()
        for k in range(num_shards):
            meta_path = out_dir / _shard_name(k, "json")
            if meta_path.exists():
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
                totals.update({key: v for key, v in meta.items() if key != "index"})
                shards.append({"index": k, "file": _shard_name(k, suffix), "rows": meta["rows"]})
        manifest = {
            "format_version": FORMAT_VERSION,
            "num_shards": num_shards,
            "complete": len(shards) == num_shards,
            "shards": shards,
            "totals": dict(sorted(totals.items())),
        }
        atomic_write_json(out_dir / MANIFEST_FILE, manifest)

    def _make_shard(self, index: int, rows: list[dict]) -> tuple[list[dict], Counter]:
        config, sampling = self.config, self.config.sampling
        counts: Counter = Counter(prompts=len(rows))
        plan = [self.draw_pair(r["prompt_id"], r["kind"]) for r in rows]
        requests: dict[str, list[tuple[int, str]]] = {}
        for i, (a, b) in enumerate(plan):
            requests.setdefault(a.name, []).extend([(i, "reference"), (i, "chosen")])
            requests.setdefault(b.name, []).append((i, "rejected"))
        texts: dict[tuple[int, str], str] = {}
        flags: dict[tuple[int, str], str] = {}
        for policy in self.policies:  # pool order: each policy is loaded once per shard
            work = requests.get(policy.name)
            if not work:
                continue
            inputs = [Request(rows[i]["prompt"], rows[i]["messages"]) for i, _ in work]
            generations = self.backend.generate(policy, inputs, sampling, derive_seed(config.seed, index, policy.name))
            counts["generations"] += len(generations)
            for (i, role), generation in zip(work, generations):
                texts[(i, role)], flags[(i, role)] = self._clean(policy, generation, counts)

        out = []
        for i, (row, (a, b)) in enumerate(zip(rows, plan)):
            triple = {role: texts[(i, role)] for role in ROLES}
            states = {role: flags[(i, role)] for role in ROLES}
            if any(not t.strip() for t in triple.values()):
                counts["dropped_empty"] += 1
                continue
            if "unfinished" in states.values() and sampling.incomplete_endings == "drop":
                counts["dropped_incomplete"] += 1
                continue
            if triple["chosen"] == triple["rejected"]:
                # Identical texts labelled both better and worse teach nothing; an exact duplicate, removed.
                counts["dropped_chosen_equals_rejected"] += 1
                continue
            out.append(
                {
                    "prompt": row["prompt"],
                    **triple,
                    "policy_a": a.name,
                    "policy_b": b.name,
                    "prompt_id": row["prompt_id"],
                    "kind": row["kind"],
                    "wrapper": row["wrapper"],
                    "loop_trimmed": ",".join(r for r in ROLES if "loop" in states[r]),
                    "ending_trimmed": ",".join(r for r in ROLES if "ending" in states[r]),
                    "seed": config.seed,
                    "shard": index,
                    "backend": self.backend.name,
                    "temperature": sampling.temperature,
                    "top_p": sampling.top_p,
                    "top_k": sampling.top_k,
                    "max_new_tokens": sampling.max_new_tokens,
                }
            )
        counts["triples"] = len(out)
        return out, counts

    def _clean(self, policy: Policy, generation: Generation, counts: Counter) -> tuple[str, str]:
        sampling = self.config.sampling
        ids, state = generation.token_ids, []
        if sampling.trim_loops:
            ids, trimmed = trim_loop(
                ids,
                keep_repeats=sampling.loop_keep_repeats,
                max_period=sampling.loop_max_period,
                min_repeats=sampling.loop_min_repeats,
                min_tokens=sampling.loop_min_tokens,
            )
            if trimmed:
                counts["loops_trimmed"] += 1
                state.append("loop")
        text = self.backend.decode(policy, ids)
        # A trimmed loop was cut on purpose; only a trajectory that ran into the length cap has an incomplete end.
        if not generation.finished and "loop" not in state:
            counts["hit_max_new_tokens"] += 1
            if sampling.incomplete_endings == "trim":
                text, ok = trim_incomplete_ending(text)
                if ok:
                    counts["endings_trimmed"] += 1
                    state.append("ending")
                else:
                    counts["endings_untrimmable"] += 1
                    state.append("unfinished")
            else:
                state.append("unfinished")
        return text, "+".join(state)


def synthesize(
    prompts: PromptSet | Sequence[Mapping[str, Any]],
    config: SynthesisConfig,
    backend: GenerationBackend | None = None,
) -> SynthesisResult:
    """Make POLAR triples for ``prompts`` with the pool in ``config``; resumes a run found in ``config.out_dir``.

    Example::

        prompts = sample_prompts("corpus.jsonl", tokenizer, PromptConfig(num_prompts=10_000))
        result = synthesize(prompts, SynthesisConfig(out_dir="polar-pt", policies=["a=Qwen/Qwen2.5-0.5B:base",
                                                                                   "b=meta-llama/Llama-3.2-1B:base"]))
        print(result.totals)   # prompts, triples and every removal, counted
    """
    synthesizer = Synthesizer(config, backend)
    try:
        return synthesizer.run(prompts)
    finally:
        if backend is None:
            synthesizer.backend.close()
