"""Prompt sampling for POLAR pre-training data (paper §3.3, App. D.1.1).

Most prompts are random initial segments of ordinary pre-training documents: for each document, a prefix of 1..N
tokens (N = 1024 in the paper). A small share may be human instructions, which only chat policies answer (through
their chat template). Everything is seeded per document, so the same corpus, tokenizer and seed always give the same
prompts, in the same order, whatever else changes.
"""

from __future__ import annotations

import logging
import os
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..checks import check_positive_int
from ..template import flatten
from .io import DataError, iter_json_records

logger = logging.getLogger(__name__)

KINDS = ("prefix", "instruction")
# The paper's mix (App. D.1.1): of the 3.60T pre-training tokens, 0.04T come from chat policies answering human
# instructions and 3.56T from base policies continuing prefixes. It gives no share of prompts; the token share,
# 1.1%, rounded, is the default share of instruction prompts wherever chat policies answer them.
PAPER_INSTRUCTION_SHARE = 0.01
# A token is rarely longer than this many characters; tokenizing only the start of a long document keeps sampling
# fast on book-length texts (the whole document is tokenized when the start turns out to be too short).
_CHARS_PER_TOKEN_BOUND = 16


@dataclass
class PromptConfig:
    """How prompts are sampled from a text corpus and an optional instruction set."""

    num_prompts: int | None = field(
        default=None,
        metadata={"help": "Total prompts to sample. None: one prefix per corpus document plus the instruction share."},
    )
    max_prefix_tokens: int = field(
        default=1024, metadata={"help": "The longest prefix, in tokens of the sampling tokenizer (paper: 1024)."}
    )
    min_prefix_tokens: int = field(default=1, metadata={"help": "The shortest prefix, in tokens (paper: 1)."})
    instruction_share: float | None = field(
        default=None,
        metadata={
            "help": "Share of prompts drawn from the instruction set (0..1); only chat policies answer them. None: "
            f"the paper's mix, {PAPER_INSTRUCTION_SHARE} when an instruction set is given (and, in build-data, the "
            "pool has two chat policies), else 0: base policies continue prefixes only."
        },
    )
    text_column: str = field(default="text", metadata={"help": "Corpus column holding the document text."})
    instruction_column: str = field(
        default="prompt",
        metadata={
            "help": "Instruction-set column: a string (one user turn) or a message list; trailing assistant turns "
            "are dropped so the prompt ends with the user's turn."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of document order, prefix lengths and the mix."})
    dedup: bool = field(default=True, metadata={"help": "Remove exact duplicate prompts (each removal is counted)."})

    def __post_init__(self) -> None:
        check_positive_int("num_prompts", self.num_prompts, optional=True)
        if not 1 <= self.min_prefix_tokens <= self.max_prefix_tokens:
            raise ValueError(
                f"Need 1 <= min_prefix_tokens <= max_prefix_tokens, got {self.min_prefix_tokens} and "
                f"{self.max_prefix_tokens}."
            )
        if self.instruction_share is not None and not 0.0 <= self.instruction_share <= 1.0:
            raise ValueError(f"`instruction_share` must lie in [0, 1], got {self.instruction_share!r}.")


def default_instruction_share(has_instructions: bool, num_chat_policies: int | None = None) -> float:
    """The paper's share of instruction prompts: `PAPER_INSTRUCTION_SHARE` when there are instructions to draw
    and (if the pool is known) at least two chat policies to answer them, else 0 (base policies take prefixes only).
    """
    chat_pool = num_chat_policies is None or num_chat_policies >= 2
    return PAPER_INSTRUCTION_SHARE if has_instructions and chat_pool else 0.0


@dataclass
class PromptSet:
    """Sampled prompts and what sampling skipped.

    Each row has ``prompt_id``, ``kind`` ("prefix" or "instruction"), ``prompt`` (the plain text the reward model
    reads), ``messages`` (the message list a chat policy is given; None for prefixes), ``wrapper`` ("pretrain" for
    prefixes, which continue raw text, "sft" for instructions), ``source_index`` and ``prefix_tokens``.
    """

    rows: list[dict[str, Any]]
    counts: Counter
    config: PromptConfig

    def __len__(self) -> int:
        return len(self.rows)

    def fingerprint(self) -> str:
        """A hash of every prompt, to check that a resumed run sees exactly the prompts it started with."""
        import hashlib

        digest = hashlib.sha256()
        for row in self.rows:
            digest.update(f"{row['prompt_id']}\x00{row['prompt']}\x00".encode())
        return digest.hexdigest()


def _rng(seed: int, *parts: Any) -> random.Random:
    # String seeds hash with SHA-512 inside `random`, so they do not depend on PYTHONHASHSEED or the process.
    return random.Random("/".join(str(p) for p in (seed, *parts)))


def load_corpus(source: Any, column: str, split: str = "train"):
    """A `datasets.Dataset` from a dataset object, a file (.txt/.jsonl/.json/.parquet), a list of files or a dir.

    ``.txt`` files hold one document per line (the `datasets` text builder); use .jsonl for multi-line documents.
    """
    from datasets import Dataset, DatasetDict, load_dataset

    if isinstance(source, DatasetDict):
        source = source[split]
    if isinstance(source, Dataset):
        dataset = source
    elif isinstance(source, Sequence) and not isinstance(source, str) and source and isinstance(source[0], Mapping):
        try:
            dataset = Dataset.from_list(list(source))
        except Exception as err:  # pyarrow refuses a field holding text in one record and a number in another
            raise DataError(
                f"The records do not form one table ({type(err).__name__}: {err}); every record's {column!r} must "
                "hold text (or messages, for instructions)."
            ) from None
    else:
        files = [str(source)] if isinstance(source, (str, os.PathLike)) else [str(s) for s in source]
        if len(files) == 1 and os.path.isdir(files[0]):
            dataset = load_dataset(files[0], split=split)
        else:
            builders = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
            suffixes = {os.path.splitext(f)[1].lower() for f in files}
            if len(suffixes) != 1 or next(iter(suffixes)) not in builders:
                raise DataError(
                    f"Corpus files must share one suffix among {sorted(builders)}, got {sorted(suffixes)} ({files})."
                )
            missing = [f for f in files if not os.path.isfile(f)]
            if missing:
                raise FileNotFoundError(f"Corpus file(s) {missing} do not exist (looked from {os.getcwd()}).")
            dataset = load_dataset(builders[suffixes.pop()], data_files=files, split="train")
    if column not in dataset.column_names:
        raise DataError(
            f"The dataset has no column {column!r} (it has {dataset.column_names}). Name the right one with "
            "text_column= / --text-column (corpus) or instruction_column= / --instruction-column (instructions)."
        )
    return dataset


def place(source: Any, index: int, name: str) -> str:
    """Where record ``index`` of a corpus loaded from ``source`` is, for messages: ``FILE:LINE`` (1-based) in JSON
    and text files, else ``name index N`` (a dataset, a list, Parquet).

    >>> place([{"text": "a"}, {"text": 1}], 1, "corpus")
    'corpus index 1'
    """
    files = [source] if isinstance(source, (str, os.PathLike)) else source
    if not isinstance(files, Sequence) or not files or not all(isinstance(f, (str, os.PathLike)) for f in files):
        return f"{name} index {index}"
    remaining = index
    for file in files:
        suffix = os.path.splitext(str(file))[1].lower()
        if suffix in (".json", ".jsonl"):
            lines = (line for line, _ in iter_json_records(file))
        elif suffix == ".txt":  # the text builder makes every line a document
            with open(file, encoding="utf-8", errors="replace") as f:
                lines = range(1, sum(1 for _ in f) + 1)
        else:
            break
        for line in lines:
            if remaining == 0:
                return f"{file}:{line}"
            remaining -= 1
    return f"{name} index {index}"


def _prefix(text: str, tokenizer: Any, length: int) -> tuple[str, int]:
    """The first ``length`` tokens of ``text`` as an exact substring of it (and how many tokens that is)."""
    window = text[: length * _CHARS_PER_TOKEN_BOUND]
    encoding = tokenizer(window, add_special_tokens=False, return_offsets_mapping=tokenizer.is_fast)
    ids = encoding["input_ids"]
    if len(ids) < length and len(window) < len(text):
        window = text
        encoding = tokenizer(window, add_special_tokens=False, return_offsets_mapping=tokenizer.is_fast)
        ids = encoding["input_ids"]
    n = min(length, len(ids))
    if n == 0:
        return "", 0
    if tokenizer.is_fast:
        # Cutting at a character offset keeps the prompt an exact substring of the document; decoding the ids instead
        # can split a multi-byte character (byte-level BPE) and leave a replacement character at the end.
        return window[: encoding["offset_mapping"][n - 1][1]], n
    return tokenizer.decode(ids[:n], skip_special_tokens=True), n


def _instruction_messages(value: Any, location: str) -> list[dict[str, str]] | None:
    if isinstance(value, str):
        return [{"role": "user", "content": value}] if value.strip() else None
    if isinstance(value, Sequence) and value and all(isinstance(m, Mapping) for m in value):
        messages = [dict(m) for m in value]
        for i, m in enumerate(messages):
            if not isinstance(m.get("content"), str) or "role" not in m:
                raise DataError(
                    f"{location}: message {i} needs 'role' and a string 'content', got {m!r:.80}. "
                    "Use OpenAI-style messages like {'role': 'user', 'content': '...'}."
                )
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()
        return [{"role": m["role"], "content": m["content"]} for m in messages] or None
    raise DataError(
        f"{location}: an instruction must be a string or a list of messages, got {type(value).__name__}: "
        f"{value!r:.80}. Name the right column with --instruction-column."
    )


def sample_prompts(corpus: Any, tokenizer: Any, config: PromptConfig | None = None, instructions: Any = None):
    """Sample POLAR pre-training prompts; see `PromptConfig` and `PromptSet`.

    Args:
        corpus: documents (see `load_corpus`), read from ``config.text_column``.
        tokenizer: the tokenizer that measures prefix lengths (any Hugging Face tokenizer).
        config: sampling settings; defaults as in the paper (1..1024-token prefixes; with an instruction set, 1% of
            the prompts are instructions, see `PAPER_INSTRUCTION_SHARE`).
        instructions: an optional instruction set (see `load_corpus`), read from ``config.instruction_column``.

    Documents are visited in a seeded random order; empty documents and exact duplicate prompts are skipped and
    counted (``counts``). Asking for more prompts than the corpus can give is an error.
    """
    config = config or PromptConfig()
    docs = load_corpus(corpus, config.text_column)
    instr = load_corpus(instructions, config.instruction_column) if instructions is not None else None
    if config.instruction_share is None:
        config = replace(config, instruction_share=default_instruction_share(instr is not None))
        logger.info("instruction_share: %s (the paper's mix)", config.instruction_share)
    if config.instruction_share > 0 and instr is None:
        raise DataError(
            f"instruction_share={config.instruction_share} needs an instruction set: pass instructions= "
            "(--instructions FILE)."
        )
    n_prefix, n_instr = _targets(config, len(docs), None if instr is None else len(instr))
    sampler = _Sampler(config)
    sampler.prefixes(docs, tokenizer, n_prefix, corpus)
    if n_instr:
        sampler.instructions(instr, n_instr, instructions)
    rows = sampler.rows
    _rng(config.seed, "mix").shuffle(rows)
    if sampler.counts:
        logger.info("prompt sampling skipped: %s", dict(sampler.counts))
    n_instr = sum(row["kind"] == "instruction" for row in rows)
    logger.info("sampled %d prompts (%d prefix, %d instruction)", len(rows), len(rows) - n_instr, n_instr)
    return PromptSet(rows, sampler.counts, config)


def _targets(config: PromptConfig, num_docs: int, num_instructions: int | None) -> tuple[int, int]:
    """How many prefix and instruction prompts to sample."""
    if config.num_prompts is not None:
        n_instr = round(config.num_prompts * config.instruction_share)
        return config.num_prompts - n_instr, n_instr
    share = config.instruction_share
    n_prefix = num_docs if share < 1 else 0
    n_instr = round(n_prefix * share / (1 - share)) if share < 1 else num_instructions
    if num_instructions is not None:
        n_instr = min(n_instr, num_instructions)
    return n_prefix, n_instr


class _Sampler:
    """The prompts sampled so far, the texts seen (for deduplication) and the counts of what was skipped."""

    def __init__(self, config: PromptConfig) -> None:
        self.config = config
        self.counts: Counter = Counter()
        self.seen: set[str] = set()
        self.rows: list[dict[str, Any]] = []

    def keep(self, text: str) -> bool:
        if self.config.dedup and text in self.seen:
            self.counts["duplicate_prompts"] += 1
            return False
        self.seen.add(text)
        return True

    def take(self, size: int, order_name: str, wanted: int, candidate: Any) -> int:
        """Visit indices ``0..size`` in a seeded order until ``wanted`` rows are kept; ``candidate(i)`` is a row or
        None (skipped, counted by it). Returns how many were kept."""
        order = list(range(size))
        _rng(self.config.seed, order_name).shuffle(order)
        taken = 0
        for index in order:
            if taken == wanted:
                break
            row = candidate(index)
            if row is not None and self.keep(row["prompt"]):
                self.rows.append(row)
                taken += 1
        return taken

    def prefixes(self, docs: Any, tokenizer: Any, wanted: int, source: Any = None) -> None:
        config, counts = self.config, self.counts
        column = docs[config.text_column]

        def candidate(index: int) -> dict[str, Any] | None:
            text = column[index]
            if not isinstance(text, str):
                raise DataError(
                    f"{place(source, index, 'corpus')}, field {config.text_column!r}: must hold text, got "
                    f"{type(text).__name__}: {text!r:.40}. Write documents as strings, or name the text column with "
                    "--text-column."
                )
            if not text.strip():
                counts["empty_documents"] += 1
                return None
            length = _rng(config.seed, "prefix", index).randint(config.min_prefix_tokens, config.max_prefix_tokens)
            prompt, n_tokens = _prefix(text, tokenizer, length)
            if not prompt.strip():
                counts["empty_prefixes"] += 1
                return None
            if n_tokens < length:
                # The document was shorter than the drawn length; the whole document is the prompt. Not an error.
                counts["short_documents"] += 1
            return {"prompt_id": f"prefix-{index}", "kind": "prefix", "prompt": prompt, "messages": None,
                    "wrapper": "pretrain", "source_index": index, "prefix_tokens": n_tokens}  # fmt: skip

        taken = self.take(len(docs), "doc-order", wanted, candidate)
        # Without num_prompts every usable document gives one prompt, so skipped documents are no shortfall.
        if taken < wanted and config.num_prompts is not None:
            raise DataError(
                f"The corpus gave only {taken} usable prefix prompts of the {wanted} asked for ({len(docs)} "
                f"documents; skipped: {dict(counts)}). Lower --num-prompts or add documents."
            )

    def instructions(self, instr: Any, wanted: int, source: Any = None) -> None:
        column = instr[self.config.instruction_column]

        def candidate(index: int) -> dict[str, Any] | None:
            where = f"{place(source, index, 'instructions')}, field {self.config.instruction_column!r}"
            messages = _instruction_messages(column[index], where)
            if messages is None:
                self.counts["empty_instructions"] += 1
                return None
            return {"prompt_id": f"instruction-{index}", "kind": "instruction",
                    "prompt": flatten(messages, "instruction"), "messages": messages, "wrapper": "sft",
                    "source_index": index, "prefix_tokens": None}  # fmt: skip

        taken = self.take(len(instr), "instruction-order", wanted, candidate)
        if taken < wanted and self.config.num_prompts is not None:
            raise DataError(
                f"The instruction set gave only {taken} usable prompts of the {wanted} asked for ({len(instr)} rows; "
                f"skipped: {dict(self.counts)}). Lower --instruction-share or add instructions."
            )


def config_dict(config: PromptConfig) -> dict[str, Any]:
    return asdict(config)
