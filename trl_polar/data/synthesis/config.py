"""The settings of a synthesis run: the policy pool, sampling and the output."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ...checks import check_positive_int

POLICY_KINDS = ("base", "chat")
BACKENDS = ("transformers", "vllm")
OUTPUT_FORMATS = ("parquet", "jsonl")
INCOMPLETE_ENDINGS = ("trim", "keep", "drop")


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
    def parse(cls, spec: str, trust_remote_code: bool = False) -> Policy:
        """Parse ``[NAME=]PATH[:base|:chat]``; without a kind, a tokenizer with a chat template means chat.

        ``trust_remote_code`` lets a tokenizer that ships as code run it (to read its chat template); without it
        such a tokenizer is refused with an error, never an interactive question.

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
            kind = _detect_kind(path, trust_remote_code)
        return cls(name or path.rstrip("/").replace("\\", "/"), path, kind)


def _detect_kind(path: str, trust_remote_code: bool) -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
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
        if self.top_k < 0:
            raise ValueError(f"`top_k` must be >= 0 (0 turns it off), got {self.top_k!r}.")
        check_positive_int("max_new_tokens", self.max_new_tokens)
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
    token_tokenizer: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer that counts each triple's tokens for the manifest (the sizes `trl-polar scaling` and "
            "`--recipe polar-pretrain` take); default: the first policy's."
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Run the code a policy's repository ships (e.g. InternLM2's tokenizer and model). Off: such a "
            "policy is refused with an error; transformers is never left to ask, which would hang under "
            "accelerate launch."
        },
    )
    sampling: SamplingConfig = field(default_factory=SamplingConfig, metadata={"help": "Sampling settings."})

    def __post_init__(self) -> None:
        if isinstance(self.sampling, Mapping):
            self.sampling = SamplingConfig(**self.sampling)
        if self.output_format not in OUTPUT_FORMATS:
            raise ValueError(f"`output_format` must be one of {OUTPUT_FORMATS}, got {self.output_format!r}.")
        if self.backend not in BACKENDS:
            raise ValueError(f"`backend` must be one of {BACKENDS}, got {self.backend!r}.")
        for name in ("shard_size", "batch_size", "max_loaded_policies"):
            check_positive_int(name, getattr(self, name))
        if len(self.policies) < 2:
            raise ValueError(f"The pool needs at least two policies (A and B differ), got {len(self.policies)}.")
