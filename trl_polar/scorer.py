"""PolarScorer: the one engine that turns (prompt, reference, candidate) triples into POLAR rewards.

Every consumer (the GRPO/RLOO reward callable, the verl and OpenRLHF adapters, the CLI, evaluation, the server)
scores through `PolarScorer.score`. Two ideas make it fast and memory-safe:

- **Token-budgeted, unpadded micro-batches.** Items are packed into rows of at most ``max_tokens_per_batch`` tokens
  with no padding at all; peak memory follows the budget, not the number of items.
- **Shared prefix.** Candidates of one (prompt, reference) pair, such as a GRPO group, start with the same ids
  ``BOS P \\n REF <|reward|> P \\n``. A row holds that prefix once and then each candidate's own tokens; segment
  attention (`trl_polar.segment_attention`) lets every candidate attend to the prefix and causally to itself, with
  positions continuing from the prefix. The model's projections and MLPs see only unique tokens. Causal attention
  makes this exact; the prefix is the longest common run of the *final* token ids, so a tokenizer that merges
  across the boundary only shortens it.

The attention is chosen by rule, never by trial: segment attention (its kernel by `choose_kernel`'s rule, or the
one named by ``kernel`` or ``TRL_POLAR_ATTENTION_KERNEL``) unless the model has no separable backbone or has
sliding-window layers, which are scored with length-sorted, right-padded plain batches (``kernel="plain"`` asks for
those). The choice is logged; a kernel that fails raises an error naming it, and nothing switches to another kernel.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from .checks import check_positive_int
from .hub import default_device, resolve_dtype
from .packing import Unit, group_units, lay_out, pack_padded, pack_summed
from .segment_attention import KERNELS, KernelError, SegmentLayout, has_sliding_window, segment_forward
from .template import PolarTemplate, Text, flatten

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS_PER_BATCH = 16384
# Sharing costs nothing but a masked attention bucket, so any common prefix is worth sharing by default.
DEFAULT_MIN_PREFIX_TOKENS = 1
# Fewer items than this are tokenized serially: a thread hand-off costs more than it saves.
_PARALLEL_ENCODE_MIN_ITEMS = 32


@dataclass(frozen=True)
class MicroBatch:
    """One forward pass of the plan.

    kind: "row" (one unpadded row of ``length`` tokens laid out from ``units`` by `trl_polar.packing.lay_out`:
    each unit's shared prefix once, then its members' own tokens) or "plain" (full sequences right-padded to
    ``length``). ``indices`` lists the items in the order the pass returns their scores.
    """

    kind: str
    indices: tuple[int, ...]
    length: int
    units: tuple[Unit, ...] = ()

    @property
    def prefixes(self) -> tuple[int, ...]:
        """Each item's shared prefix length, in ``indices`` order (0 for an item alone or in a plain batch)."""
        if self.kind != "row":
            return (0,) * len(self.indices)
        return tuple(unit.prefix for unit in self.units for _ in unit.members)

    @property
    def tokens(self) -> int:
        """Positions the pass runs: the row's tokens, or rows x padded length for a plain batch."""
        return self.length if self.kind == "row" else len(self.indices) * self.length


@dataclass(frozen=True)
class ScoringRun:
    """What one scoring call ran (`PolarScorer.observe`): its micro-batches in order, and the segment-attention
    kernel calls by kernel name (one per layer and row; plain batches run the model's own attention)."""

    plan: tuple[MicroBatch, ...]
    kernels: dict[str, int] = field(default_factory=dict)


@runtime_checkable
class Scorer(Protocol):
    """What scores POLAR triples: `PolarScorer` (a local model) and `trl_polar.PolarClient` (a server or engine).

    The reward callable, the integrations, evaluation and the CLI take any `Scorer`; ``wrapper`` is "sft" or
    "pretrain", for all items or one per item.
    """

    def score(
        self,
        prompts: Sequence[Text],
        references: Sequence[Text],
        candidates: Sequence[Text],
        wrapper: str | Sequence[str] = "sft",
    ) -> list[float]: ...


class EncodeError(ValueError):
    """An item the template cannot build; ``index`` is its position in the call (0-based)."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(f"Item {index}: {message}")
        self.index = index
        self.reason = message


@dataclass(frozen=True)
class Encoded:
    """What `PolarScorer.encode_items` returns: ids per item, the keys of items that may share a prefix, and how
    many items the template truncated."""

    input_ids: list[list[int]]
    group_keys: list[tuple]
    truncated: int


class PolarScorer:
    """Batched, token-budgeted, shared-prefix scoring with a local POLAR reward model.

    Args:
        model_or_path: a saved POLAR reward model directory (or hub name), or a loaded one-label
            sequence-classification model (then pass ``template`` or let it be rebuilt from the model's config).
        template: the `PolarTemplate`; read from the checkpoint when omitted.
        max_tokens_per_batch: the most tokens one micro-batch runs through the model (a shared prefix counts
            once, nothing is padded; plain batches count rows x padded length). A single item longer than the
            budget still runs, alone.
        device: where the model runs; defaults to this process's accelerate device (each rank scores with its own
            copy).
        dtype: ``torch.bfloat16``, ``"bf16"``, ``"auto"`` (bf16 on a GPU that supports it, else fp32) or None (keep).
        shared_prefix: run a (prompt, reference) prefix once for all its candidates.
        min_prefix_tokens: shortest common prefix to share; a group with a shorter one runs each item whole.
        show_progress: show a progress bar over micro-batches.
        encode_workers: threads that tokenize in parallel (default: up to 8 CPU cores); 1 tokenizes serially. On a
            GPU, tokenizing the full POLAR sequences is a large part of the scoring time.
        kernel: "auto" (segment attention where the model takes it, its kernel by rule or
            ``TRL_POLAR_ATTENTION_KERNEL``; else plain batches), a segment-attention kernel ("flex", "buckets",
            "split"), or "plain" (right-padded batches through the model's own attention).

    Example::

        scorer = PolarScorer("path/to/polar-rm", max_tokens_per_batch=32768, dtype="auto")
        scorer.score(["What is 2+2?"] * 2, ["4"] * 2, ["The answer is 4.", "5"])
    """

    def __init__(
        self,
        model_or_path: Any,
        template: PolarTemplate | None = None,
        max_tokens_per_batch: int = DEFAULT_MAX_TOKENS_PER_BATCH,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        *,
        shared_prefix: bool = True,
        min_prefix_tokens: int = DEFAULT_MIN_PREFIX_TOKENS,
        show_progress: bool = False,
        encode_workers: int | None = None,
        kernel: str = "auto",
    ) -> None:
        check_positive_int("max_tokens_per_batch", max_tokens_per_batch)
        if kernel not in (*KERNELS, "plain"):
            raise ValueError(f"`kernel` must be one of {[*KERNELS, 'plain']}, got {kernel!r}.")
        device = torch.device(device) if device is not None else default_device()
        model, template = _load(model_or_path, template, resolve_dtype(dtype, device))
        self.model = model.to(device).eval()
        self.template = template
        self.device = device
        self.max_tokens_per_batch = max_tokens_per_batch
        self.min_prefix_tokens = max(1, int(min_prefix_tokens))
        self.show_progress = show_progress
        self.pad_token_id = self._pad_token_id()
        self._inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self._backbone = getattr(self._inner, getattr(self._inner, "base_model_prefix", "model"), None)
        from .modeling import value_head

        self._head = value_head(self.model)
        self.shared_prefix = shared_prefix
        self.kernel = kernel
        self._segments = self._takes_segments()
        # Engines call from threads (OpenRLHF, the server); one forward at a time keeps memory within the budget.
        self._lock = threading.RLock()
        if encode_workers is None:
            encode_workers = min(8, os.cpu_count() or 1)
        self.encode_workers = max(1, int(encode_workers))
        self._pool: ThreadPoolExecutor | None = None
        self._thread_state = threading.local()
        self._observers: list[list[ScoringRun]] = []
        self._kernels_logged = False

    # ------------------------------------------------------------------------------------------------ set-up
    def _pad_token_id(self) -> int:
        tokenizer = self.template.tokenizer
        for value in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
            if value is not None:
                return int(value)
        return 0

    def _takes_segments(self) -> bool:
        """The rule: segment attention unless asked for plain batches or the model cannot take it (logged)."""
        name = type(self.model).__name__
        why_not = None
        if self._backbone is None:
            why_not = "it has no separable backbone"
        elif has_sliding_window(getattr(self.model, "config", None)):
            why_not = "segment attention implements no sliding window"
        if self.kernel == "plain":
            logger.info("%s scores in plain batches (kernel='plain').", name)
            return False
        if why_not is None:
            logger.info("%s scores unpadded rows through segment attention (kernel=%r).", name, self.kernel)
            return True
        if self.kernel != "auto":
            raise ValueError(f"kernel={self.kernel!r} needs segment attention, but {why_not}; use kernel='plain'.")
        logger.info("%s scores in plain batches: %s.", name, why_not)
        return False

    @property
    def uses_segment_attention(self) -> bool:
        """Whether rows run unpadded through segment attention (decided at construction, by `kernel` and the model)."""
        return self._segments

    @contextlib.contextmanager
    def observe(self) -> Iterator[list[ScoringRun]]:
        """A debug hook: inside the block, every scoring call appends the `ScoringRun` of what it ran to the list.

        Example::

            with scorer.observe() as runs:
                scorer.score(prompts, references, candidates)
            runs[-1].plan, runs[-1].kernels  # the micro-batches, and e.g. {"flex": 24} on a GPU
        """
        runs: list[ScoringRun] = []
        with self._lock:
            self._observers.append(runs)
        try:
            yield runs
        finally:
            with self._lock:
                self._observers.remove(runs)

    def _local_template(self) -> PolarTemplate:
        # Each encoding thread has its own template: the template's part cache is not safe to share across threads.
        if threading.current_thread() is threading.main_thread() or self.encode_workers <= 1:
            return self.template
        template = getattr(self._thread_state, "template", None)
        if template is None:
            template = type(self.template)(self.template.tokenizer, **self.template.to_dict())
            self._thread_state.template = template
        return template

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.encode_workers, thread_name_prefix="polar-encode")
        return self._pool

    # ------------------------------------------------------------------------------------------------ public
    def encode(
        self, prompts: Sequence[Text], references: Sequence[Text], candidates: Sequence[Text], wrapper="sft"
    ) -> list[list[int]]:
        """The model input ids of every triple, through the one template."""
        return self.encode_items(prompts, references, candidates, wrapper).input_ids

    def encode_items(
        self,
        prompts: Sequence[Text],
        references: Sequence[Text],
        candidates: Sequence[Text],
        wrapper: str | Sequence[str] = "sft",
        *,
        template: PolarTemplate | None = None,
    ) -> Encoded:
        """Ids, prefix-group keys and the truncated count of every triple: the one encode path of the scorer, the
        server and the client-side checks.

        ``template`` replaces the scorer's own for this call (a server's per-request limits); it is used from the
        calling thread only, so it needs no per-thread copy. A bad item raises `EncodeError` with its index.
        """
        n = _check_lengths(prompts=prompts, references=references, candidates=candidates)
        wrappers = [wrapper] * n if isinstance(wrapper, str) else list(wrapper)
        if len(wrappers) != n:
            raise ValueError(f"`wrapper` has {len(wrappers)} entries but there are {n} items; pass one per item.")
        parallel = template is None and self.encode_workers > 1 and n >= _PARALLEL_ENCODE_MIN_ITEMS

        def build(i: int):
            try:
                used = template or self._local_template()
                return used.build(prompts[i], references[i], candidates[i], wrappers[i])
            except ValueError as err:
                raise EncodeError(i, str(err)) from err

        # The first item runs alone: it settles the tokenizer's (shared) truncation/padding state before threads read
        # it concurrently. The Rust tokenizer releases the GIL, so threads encode in parallel.
        built = [build(0)] if n else []
        if parallel:
            built.extend(self._executor().map(build, range(1, n), chunksize=16))
        else:
            built.extend(build(i) for i in range(1, n))
        truncated = sum(enc.truncated for enc in built)
        used = template or self.template
        if truncated:
            logger.warning(
                "%d of %d items were truncated to max_length=%d / max_response_length=%d.",
                truncated,
                n,
                used.max_length,
                used.max_response_length,
            )
        # Items of one (prompt, reference, wrapper) may share their prefix; the plan checks the ids themselves.
        keys = [
            (flatten(p, "prompt"), flatten(r, "reference"), w)
            for p, r, w in zip(prompts, references, wrappers, strict=True)
        ]
        return Encoded([enc.input_ids for enc in built], keys, truncated)

    def score(
        self,
        prompts: Sequence[Text],
        references: Sequence[Text],
        candidates: Sequence[Text],
        wrapper: str | Sequence[str] = "sft",
        *,
        show_progress: bool | None = None,
    ) -> list[float]:
        """One reward per (prompt, reference, candidate) triple, in input order.

        Args:
            prompts, references, candidates: same-length lists of strings or message lists.
            wrapper: "sft" (default) or "pretrain", for all items or one per item.
            show_progress: override the scorer's progress-bar setting for this call.
        """
        with self._lock:
            encoded = self.encode_items(prompts, references, candidates, wrapper)
            return self.score_ids(encoded.input_ids, encoded.group_keys, show_progress=show_progress)

    def score_ids(
        self,
        input_ids: Sequence[Sequence[int]],
        group_keys: Sequence[Any] | None = None,
        *,
        show_progress: bool | None = None,
    ) -> list[float]:
        """Score already-encoded sequences (each ending with the reward token); items sharing a key may share a
        prefix. Without keys, all items form one candidate pool and only common prefixes found by ids are used."""
        n = len(input_ids)
        if n == 0:
            return []
        if group_keys is None:
            group_keys = [None] * n
        if len(group_keys) != n:
            raise ValueError(f"`group_keys` has {len(group_keys)} entries for {n} sequences; pass one per sequence.")
        empty = [i for i, ids in enumerate(input_ids) if len(ids) == 0]
        if empty:
            raise ValueError(f"Sequence(s) {empty[:10]} are empty; every input must end with the reward token.")
        with self._lock:
            return self._run(input_ids, group_keys, show_progress)

    def _run(self, input_ids, group_keys, show_progress) -> list[float]:
        plan = self.plan(input_ids, group_keys)
        kernels: collections.Counter[str] = collections.Counter()
        scores: list[float] = [0.0] * len(input_ids)
        progress = self.show_progress if show_progress is None else show_progress
        bar = _progress_bar(len(input_ids), progress)
        with torch.inference_mode():
            for mb in plan:
                if mb.kind == "row":
                    values = self._forward_row(input_ids, mb, kernels)
                else:
                    values = self._forward_plain([list(input_ids[i]) for i in mb.indices])
                for i, v in zip(mb.indices, values, strict=True):
                    scores[i] = v
                bar.update(len(mb.indices))
        bar.close()
        if kernels and not self._kernels_logged:
            self._kernels_logged = True
            logger.info("%s ran segment attention with kernel calls %s.", type(self.model).__name__, dict(kernels))
        for runs in self._observers:
            runs.append(ScoringRun(tuple(plan), dict(kernels)))
        return [float(s) for s in scores]

    # ------------------------------------------------------------------------------------------------ planning
    def plan(self, input_ids: Sequence[Sequence[int]], group_keys: Sequence[Any]) -> list[MicroBatch]:
        """Split the items into micro-batches under the token budget.

        With segment attention every micro-batch is one unpadded row: the candidates of a group share its prefix
        (a group too large for the budget is split into chunks, each with the prefix), and units are packed into
        rows largest first. Otherwise items are length-sorted into right-padded plain batches.
        """
        budget = self.max_tokens_per_batch
        if not self._segments:
            order = sorted(range(len(input_ids)), key=lambda i: len(input_ids[i]), reverse=True)
            return [
                MicroBatch("plain", tuple(chunk), length)
                for chunk, length in pack_padded(order, lambda i: len(input_ids[i]), budget)
            ]
        groups: dict[Any, list[int]] = {}
        for i, key in enumerate(group_keys):
            groups.setdefault(key, []).append(i)
        units = [
            unit
            for members in groups.values()
            for unit in group_units(
                input_ids, members, budget=budget, min_prefix=self.min_prefix_tokens, shared=self.shared_prefix
            )
        ]
        units.sort(key=lambda u: u.tokens(input_ids), reverse=True)
        plan = []
        for chosen in pack_summed(range(len(units)), lambda u: units[u].tokens(input_ids), budget):
            row = tuple(units[u] for u in chosen)
            indices = tuple(i for unit in row for i in unit.members)
            plan.append(MicroBatch("row", indices, sum(u.tokens(input_ids) for u in row), units=row))
        return plan

    # ------------------------------------------------------------------------------------------------ forwards
    def _padded(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        longest = max(len(r) for r in rows)
        batch = torch.full((len(rows), longest), self.pad_token_id, dtype=torch.long)
        for j, r in enumerate(rows):
            batch[j, : len(r)] = torch.tensor(r, dtype=torch.long)
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        return batch.to(self.device), lengths.to(self.device)

    def _forward_plain(self, rows: list[list[int]]) -> list[float]:
        ids, lengths = self._padded(rows)
        # Right pads come after every real token, so causal attention keeps them out of the real positions: no mask
        # is needed, and the default positions 0..L-1 are the right ones.
        if self._backbone is None:
            # A model without a separable backbone pools by itself; with right padding and a pad token that is not
            # the reward token, its last-non-pad pooling reads the reward token.
            return self.model(input_ids=ids).logits[:, 0].float().tolist()
        hidden = self._backbone(input_ids=ids, use_cache=False).last_hidden_state
        # Right padding: the reward token is each row's last REAL position, not position -1.
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]
        return self._head(last).float().squeeze(-1).tolist()

    def _forward_row(self, input_ids: Sequence[Sequence[int]], mb: MicroBatch, kernels: collections.Counter) -> list:
        row = lay_out(input_ids, mb.units)
        layout = SegmentLayout(row.segments, self.device, kernel=None if self.kernel == "auto" else self.kernel)
        ids = torch.tensor(row.input_ids, dtype=torch.long, device=self.device)
        try:
            hidden = segment_forward(self._backbone, ids, layout)
        except (KernelError, torch.OutOfMemoryError):
            raise  # KernelError names the kernel and the way out; OOM: lower max_tokens_per_batch
        except (TypeError, AttributeError, NotImplementedError) as err:
            raise RuntimeError(
                f"{type(self.model).__name__} failed under segment attention ({type(err).__name__}: {err}); "
                "score it with PolarScorer(..., kernel='plain')."
            ) from err
        finally:
            kernels.update(layout.kernel_calls)
        last = hidden.index_select(0, torch.tensor(row.reads, device=self.device))
        return self._head(last).float().squeeze(-1).tolist()


# ---------------------------------------------------------------------------------------------------- helpers
def _load(model_or_path: Any, template: PolarTemplate | None, dtype: torch.dtype | None) -> tuple[Any, PolarTemplate]:
    if isinstance(model_or_path, (str, os.PathLike)):
        from .modeling import load_reward_model

        overrides = template.to_dict() if template is not None else {}
        model, loaded_template = load_reward_model(model_or_path, dtype=dtype, **overrides)
        return model, template or loaded_template
    model = model_or_path
    if not isinstance(model, torch.nn.Module):
        raise ValueError(
            f"`model_or_path` must be a path, a hub name or a loaded reward model, got "
            f"{type(model).__name__}. For a remote scorer pass it to PolarReward directly."
        )
    if dtype is not None:
        model.to(dtype)
    return model, template if template is not None else PolarTemplate.from_pretrained(model)


def _check_lengths(**lists: Sequence[Any]) -> int:
    for name, value in lists.items():
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ValueError(
                f"`{name}` must be a list (one entry per item), got {type(value).__name__}. Wrap a single item "
                f"in a list: {name}=[...]."
            )
    sizes = {name: len(value) for name, value in lists.items()}
    if len(set(sizes.values())) > 1:
        detail = ", ".join(f"{name}={size}" for name, size in sizes.items())
        raise ValueError(f"The lists must have the same length, got {detail}. Pass one entry per item in each list.")
    return next(iter(sizes.values()), 0)


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="POLAR scoring", unit="item", disable=not enabled)


# ---------------------------------------------------------------------------------------------------- files
