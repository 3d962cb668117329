"""POLAR pre-training data synthesis from a policy pool (paper §3.3, Eq. 7, App. D.1.1).

For each prompt two different policies A and B are drawn at random; A writes two trajectories (the *reference* and
the *chosen*), B writes one (the *rejected*). No labels are involved: "same policy" is what the reward model learns
to prefer. Sampling follows the paper (temperature 1.0, top-p 0.9, top-k 50, at most 4096 new tokens).

Output is a directory of shards plus a manifest (see `store`). A shard's content depends only on the seed, the shard
index and the settings, never on which process made it or when, so a run killed at any moment (even ``kill -9``)
and started again regenerates exactly the missing shards: no triple is lost and none is duplicated. Under
``accelerate launch`` rank r makes shards r, r + world, ...
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from ...template import decode_after, flatten
from ..io import DataError, read_rows
from ..prompts import PromptSet
from ..trimming import trim_incomplete_ending, trim_loop
from .backends import Generation, GenerationBackend, Request, derive_seed, make_backend
from .config import Policy, SynthesisConfig
from .store import FORMAT_VERSION, MANIFEST_FILE, RUN_FILE, RunStore, read_manifest

logger = logging.getLogger(__name__)

ROLES = ("reference", "chosen", "rejected")


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
            raise DataError(f"prompts[{i}]: needs a 'prompt' field (text or message list), got {row!r:.80}.")
        value = row["prompt"]
        messages = row.get("messages")
        if messages is None and not isinstance(value, str):
            messages = [dict(m) for m in value]
        kind = row.get("kind") or ("instruction" if messages is not None else "prefix")
        if kind not in ("prefix", "instruction"):
            raise DataError(f"prompts[{i}], field 'kind': must be 'prefix' or 'instruction', got {kind!r}.")
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


def _unique_prompts(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """The rows without exact duplicate prompts (which would give duplicate-looking triples), and how many went."""
    kept, seen = [], set()
    for row in rows:
        key = (row["prompt"], row["kind"])
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return kept, len(rows) - len(kept)


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


class Synthesizer:
    """Runs the policy-pool synthesis; see the module docstring. Use `synthesize` for a one-call run."""

    def __init__(self, config: SynthesisConfig, backend: GenerationBackend | None = None) -> None:
        import torch
        from accelerate import PartialState

        self.config = config
        # cpu=True on a CPU-only box: otherwise PartialState reports one process of one under accelerate launch and
        # every rank would make every shard (feasibility.md §1).
        self.state = PartialState(cpu=not torch.cuda.is_available())
        self.policies = [
            p if isinstance(p, Policy) else Policy.parse(p, config.trust_remote_code) for p in config.policies
        ]
        names = Counter(p.name for p in self.policies)
        if any(v > 1 for v in names.values()):
            raise DataError(f"Policy names must be unique, got {dict(names)}; name them with NAME=PATH.")
        self.backend = backend or make_backend(config, device=self.state.device)
        self._token_tokenizer: Any = None

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
        config, state = self.config, self.state
        rows, duplicate_prompts = _unique_prompts(prompt_rows(prompts))
        self._check_pool(rows)
        fingerprint = PromptSet(rows, Counter(), None).fingerprint()
        store = RunStore(config.out_dir, config.output_format)
        self._open(store, _run_settings(config, self.policies, rows, fingerprint))
        num_shards = (len(rows) + config.shard_size - 1) // config.shard_size
        mine = list(range(state.process_index, num_shards, state.num_processes))
        # Left by a run killed while writing one of this rank's shards; the shard is made again.
        store.remove_stray(name for k in mine for name in store.shard_names(k))
        todo = [k for k in mine if not store.is_complete(k)]
        if len(todo) < len(mine):
            logger.info("rank %d: %d of its %d shards are already complete", state.process_index,
                        len(mine) - len(todo), len(mine))  # fmt: skip
        self._make_shards(store, rows, todo, len(mine), num_shards, duplicate_prompts)
        logger.info("rank %d of %d made shards %s", state.process_index, state.num_processes, todo)
        state.wait_for_everyone()
        if state.is_main_process:
            store.write_manifest(num_shards)
        state.wait_for_everyone()
        manifest = read_manifest(store.directory)
        if state.is_main_process:
            logger.info("synthesis totals: %s", manifest["totals"])
        files = [store.directory / s["file"] for s in manifest["shards"]]
        return SynthesisResult(store.directory, files, manifest["totals"], manifest["complete"])

    def _check_pool(self, rows: list[dict]) -> None:
        for kind in sorted({r["kind"] for r in rows}):
            pool = self.eligible(kind)
            if len(pool) < 2:
                who = "chat" if kind == "instruction" else "base (or chat with chat_on_prefixes)"
                raise DataError(
                    f"{kind} prompts need at least two {who} policies, the pool has {[p.name for p in pool]}. Add "
                    "policies tagged ':base' / ':chat', or change the prompt mix."
                )

    def _open(self, store: RunStore, settings: dict) -> None:
        """Start or resume the run on every rank; the main process writes the settings, the others check them."""
        if self.state.is_main_process:
            store.directory.mkdir(parents=True, exist_ok=True)
            # Only the main process writes these two, and not yet: a temporary copy is a killed run's partial write.
            store.remove_stray([RUN_FILE, MANIFEST_FILE])
            store.open(settings)
        self.state.wait_for_everyone()
        if not self.state.is_main_process:
            store.open(settings)  # every rank fails alike when the settings differ

    def _make_shards(self, store: RunStore, rows: list[dict], todo: list[int], mine: int, num_shards: int,
                     duplicate_prompts: int) -> None:  # fmt: skip
        from tqdm.auto import tqdm

        config, state = self.config, self.state
        bar = tqdm(total=mine, initial=mine - len(todo), desc=f"shards (rank {state.process_index})",
                   disable=not config.progress, position=state.process_index)  # fmt: skip
        for k in todo:
            shard_rows, counts = self._make_shard(k, rows[k * config.shard_size : (k + 1) * config.shard_size])
            if k == 0:
                counts["duplicate_prompts"] += duplicate_prompts
            store.write_shard(k, shard_rows, counts)
            bar.update(1)
            bar.set_postfix(triples=counts["triples"])
            if state.num_processes == 1:
                store.write_manifest(num_shards)
        bar.close()

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
                texts[(i, role)], flags[(i, role)] = self._clean(policy, generation, counts, rows[i]["kind"])

        out = []
        for i, (row, (a, b)) in enumerate(zip(rows, plan)):
            triple = {role: texts[(i, role)] for role in ROLES}
            states = {role: flags[(i, role)] for role in ROLES}
            # Dropping empty trajectories and chosen == rejected is ours, not the paper's (counted and logged).
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
            out.append(self._triple_row(index, row, triple, states, a, b))
        counts["triples"] = len(out)
        self._count_tokens(out, counts)
        return out, counts

    def _count_tokens(self, rows: list[dict[str, Any]], counts: Counter) -> None:
        """Add each part's tokens to the shard's counts; the manifest turns them into the run's sizes."""
        if self._token_tokenizer is None:
            from transformers import AutoTokenizer

            name = self.config.token_tokenizer or self.policies[0].path
            self._token_tokenizer = AutoTokenizer.from_pretrained(
                name, trust_remote_code=self.config.trust_remote_code
            )
        for part in ("prompt", *ROLES):
            texts = [row[part] if isinstance(row[part], str) else flatten(row[part]) for row in rows]
            lengths = self._token_tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
            counts[f"tokens_{part}"] += sum(len(ids) for ids in lengths)
        counts["token_counted_triples"] += len(rows)

    def _triple_row(self, index: int, row: dict, triple: dict, states: dict, a: Policy, b: Policy) -> dict[str, Any]:
        sampling = self.config.sampling
        return {
            "prompt": row["prompt"],
            **triple,
            "policy_a": a.name,
            "policy_b": b.name,
            "prompt_id": row["prompt_id"],
            "kind": row["kind"],
            "wrapper": row["wrapper"],
            "loop_trimmed": ",".join(r for r in ROLES if "loop" in states[r]),
            "ending_trimmed": ",".join(r for r in ROLES if "ending" in states[r]),
            "seed": self.config.seed,
            "shard": index,
            "backend": self.backend.name,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k,
            "max_new_tokens": sampling.max_new_tokens,
        }

    def _clean(self, policy: Policy, generation: Generation, counts: Counter, kind: str) -> tuple[str, str]:
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
        text = self._decode(policy, generation, ids, kind, counts)
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

    def _decode(self, policy: Policy, generation: Generation, ids: list[int], kind: str, counts: Counter) -> str:
        """The trajectory's text. A prefix prompt's continuation is decoded after the prompt's ids: decoded alone, a
        SentencePiece-style policy drops the space at the seam ("Hello" + "▁world" reads "Helloworld"), and the
        'pretrain' wrapper joins prompt and continuation with nothing between them."""
        decode = partial(self.backend.decode, policy)
        if kind != "prefix" or generation.prompt_token_ids is None:
            return decode(ids)  # an instruction's answer starts its own text (after the chat template)
        text = decode_after(decode, generation.prompt_token_ids, ids)
        if text is None:
            # The prompt's text changed when decoded together with the continuation (a tokenizer that merges text
            # across the seam): keep the continuation decoded alone, and count it.
            counts["seam_decoded_alone"] += 1
            return decode(ids)
        return text


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
