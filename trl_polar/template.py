"""The one POLAR input format.

This module is the only place in trl_polar that turns (prompt, reference, candidate) into model input.
The released POLAR checkpoints read::

    BOS + P + "\\n" + REF + "<|reward|>" + P + "\\n" + CAND + <reward token>

where P, REF and CAND are flattened to plain text, truncated token-wise and decoded back to text before the
whole string is tokenized once more (that decode/re-encode round trip is what the checkpoints were trained on).
"""

from __future__ import annotations

import logging
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .checks import check_positive_int

logger = logging.getLogger(__name__)

DEFAULT_SEPARATOR = "<|reward|>"
DEFAULT_REWARD_TOKEN = "[UNUSED_TOKEN_130]"
DEFAULT_MAX_LENGTH = 16384
DEFAULT_MAX_RESPONSE_LENGTH = 4096
WRAPPERS = ("sft", "pretrain")
CUT_SIDES = ("right", "left")
# Where a saved model records the template it was trained with (inside config.json).
CONFIG_KEY = "polar_template"
# Tokens the budget reserves besides the three parts: the BOS of the joined text, the two "\n" and the reward token.
RESERVED_TOKENS = 4

Text = str | Sequence[Mapping[str, Any]]


def flatten(value: Text, argument: str = "text") -> str:
    """Flatten a string or an OpenAI-style message list to the plain text POLAR reads.

    Message lists are joined by their ``content`` fields with "\\n"; roles are dropped, as the released
    checkpoints saw them.

    >>> flatten([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    'Hi\\nHello'
    >>> flatten("plain text")
    'plain text'
    """
    if isinstance(value, str):
        return check_text(value, argument)
    if value is None or isinstance(value, (bytes, int, float, bool, Mapping)) or not isinstance(value, Sequence):
        raise ValueError(
            f"`{argument}` must be a string or a list of messages like [{{'role': 'user', 'content': '...'}}], "
            f"got {type(value).__name__}: {value!r:.80}. Convert it to text before passing it."
        )
    parts = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping) or "content" not in message:
            raise ValueError(
                f"`{argument}[{i}]` must be a message dict with a 'content' key, got {message!r:.80}. "
                "Each message needs a 'content' string, e.g. {'role': 'assistant', 'content': '...'}."
            )
        text = message_text(message["content"], f"{argument}[{i}]['content']")
        if text is not None:
            parts.append(text)
    return "\n".join(parts)


def check_text(text: str, argument: str = "text") -> str:
    """`text` itself, or a ValueError naming `argument` when it holds a lone UTF-16 surrogate (``"\\ud800"``, which
    JSON's escapes allow): no tokenizer, JSON writer or HTTP body can carry one, so it is refused where text enters.

    >>> check_text("bad \\ud800", "candidate")
    Traceback (most recent call last):
    ...
    ValueError: `candidate` holds a lone UTF-16 surrogate '\\ud800' at character 4, which is not text. Replace it ...
    """
    if text.isascii():  # the common case: O(1) in CPython, which knows whether a string is ASCII
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"`{argument}` holds a lone UTF-16 surrogate {text[err.start]!r} at character {err.start}, which is not "
            "text. Replace it (e.g. text.encode('utf-8', 'replace').decode()) or drop the item."
        ) from None
    return text


def check_texts(value: Any, argument: str = "text") -> None:
    """`check_text` on every string inside `value` (a string, a message list, a content-part list), naming the
    field that fails, e.g. ``candidates[2][0]['content']``; other values are left to the formatter's own checks."""
    stack = [(argument, value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, str):
            check_text(item, where)
        elif isinstance(item, Mapping):
            stack.extend((f"{where}[{key!r}]", v) for key, v in item.items())
        elif isinstance(item, Sequence) and not isinstance(item, (bytes, bytearray)):
            stack.extend((f"{where}[{i}]", v) for i, v in enumerate(item))


_PART_NAME = re.compile(r"`(\w+)(?=[`\[])")


def rename_parts(message: str, names: Mapping[str, str]) -> str:
    """A template error with its part names (``prompt``, ``reference``, ``candidate``, as the template spells
    them) replaced by the caller's: a file's column, a list with its index.

    >>> rename_parts("`candidate[0]['content']` must be ...", {"candidate": "completions[3]"})
    "`completions[3][0]['content']` must be ..."
    """
    return _PART_NAME.sub(lambda m: f"`{names.get(m.group(1), m.group(1))}", message)


_textless = {"messages": 0}


def message_text(content: Any, argument: str = "content") -> str | None:
    """The text of a message's ``content``: a string, or the ``text`` of its text parts (chat APIs and tool-calling
    rollouts write ``[{"type": "text", "text": "..."}]``), joined as one message. Content parts without text (an
    image, a tool call) are not read; a message with no text at all gives None and is counted and logged.

    >>> message_text([{"type": "text", "text": "The answer "}, {"type": "image_url"}, {"type": "text", "text": "4"}])
    'The answer 4'
    """
    if isinstance(content, str):
        return check_text(content, argument)
    if isinstance(content, Sequence) and not isinstance(content, (bytes, Mapping)):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, Mapping) or ("text" in part and not isinstance(part["text"], str)):
                raise ValueError(
                    f"`{argument}[{j}]` must be a content part like {{'type': 'text', 'text': '...'}}, "
                    f"got {part!r:.80}."
                )
            if part.get("type", "text") == "text" and "text" in part:
                texts.append(check_text(part["text"], f"{argument}[{j}]['text']"))
        if texts:
            return "".join(texts)
        _textless["messages"] += 1
        count = _textless["messages"]
        if count & (count - 1) == 0:  # 1, 2, 4, 8, ...: counted always, logged without flooding a long run
            logger.warning("%d message(s) without any text part so far (latest: `%s`); they are not scored.", count,
                           argument)  # fmt: skip
        return None
    raise ValueError(
        f"`{argument}` must be a string or a list of content parts, got {type(content).__name__}: {content!r:.80}. "
        "Pass the message text, e.g. {'role': 'assistant', 'content': '...'}."
    )


@dataclass(frozen=True)
class PartLength:
    """Token counts of one part before and after truncation (the part's own BOS included, as upstream counts)."""

    original: int
    kept: int

    @property
    def truncated(self) -> bool:
        return self.kept < self.original


@dataclass(frozen=True)
class PolarEncoding:
    """One model input: the ids the model sees, the text they came from and what truncation removed."""

    input_ids: list[int]
    text: str  # the joined text, without the reward token
    prompt: PartLength
    reference: PartLength
    candidate: PartLength

    @property
    def truncated(self) -> bool:
        return self.prompt.truncated or self.reference.truncated or self.candidate.truncated

    def truncation_report(self) -> dict[str, dict[str, int]]:
        """The parts that lost tokens, as ``{part: {"original": n, "kept": m}}``."""
        parts = {"prompt": self.prompt, "reference": self.reference, "candidate": self.candidate}
        return {k: {"original": v.original, "kept": v.kept} for k, v in parts.items() if v.truncated}


@dataclass(frozen=True)
class PolarPairEncoding:
    """A training pair: chosen and rejected share the prompt budget, exactly as upstream's ``tokenize_ref``."""

    chosen: PolarEncoding
    rejected: PolarEncoding

    @property
    def truncated(self) -> bool:
        return self.chosen.truncated or self.rejected.truncated


@dataclass
class PolarTemplate:
    """Builds POLAR model input from (prompt, reference, candidate).

    Args:
        tokenizer: a Hugging Face tokenizer that knows the separator and the reward token
            (see `trl_polar.modeling.add_polar_tokens` for backbones that do not).
        max_length: total token budget of one sequence; 4 tokens are reserved for BOS, two "\\n" and the reward token.
        max_response_length: the most tokens the reference and the candidate may each keep.
        response_cut_side: "right" keeps the start of an over-long response, "left" keeps its end.
        separator: the text between the reference half and the candidate half.
        reward_token: the token appended last; the value head reads its hidden state.

    Example::

        template = PolarTemplate(tokenizer)
        ids = template.encode("What is 2+2?", "4", "The answer is 4.")
        assert ids[-1] == template.reward_token_id
    """

    tokenizer: Any
    max_length: int = DEFAULT_MAX_LENGTH
    max_response_length: int = DEFAULT_MAX_RESPONSE_LENGTH
    response_cut_side: Literal["right", "left"] = "right"
    separator: str = DEFAULT_SEPARATOR
    reward_token: str = DEFAULT_REWARD_TOKEN
    reward_token_id: int = field(init=False)
    _cache: OrderedDict = field(init=False, repr=False, compare=False)

    _CACHE_SIZE = 4096

    def __post_init__(self) -> None:
        if self.tokenizer is None or not hasattr(self.tokenizer, "encode"):
            raise ValueError(
                f"`tokenizer` must be a Hugging Face tokenizer, got {type(self.tokenizer).__name__}. "
                "Load one with transformers.AutoTokenizer.from_pretrained(...)."
            )
        for name in ("max_length", "max_response_length"):
            check_positive_int(name, getattr(self, name))
        if self.max_length <= RESERVED_TOKENS:
            raise ValueError(
                f"`max_length`={self.max_length} leaves no room: {RESERVED_TOKENS} tokens are reserved for BOS, "
                "two '\\n' and the reward token. Use a larger max_length (the released checkpoints use 16384)."
            )
        if self.response_cut_side not in CUT_SIDES:
            raise ValueError(
                f"`response_cut_side` must be one of {CUT_SIDES}, got {self.response_cut_side!r}: 'right' keeps the "
                "start of an over-long response (as in training), 'left' keeps its end."
            )
        self.reward_token_id = self._single_token_id(self.reward_token, "reward_token")
        self._check_separator()
        self._cache = OrderedDict()

    # ----------------------------------------------------------------------------------------------------- checks
    def _single_token_id(self, token: str, argument: str) -> int:
        if not isinstance(token, str) or not token:
            raise ValueError(f"`{argument}` must be a non-empty string, got {token!r}.")
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        unk = getattr(self.tokenizer, "unk_token_id", None)
        if token_id is None or (unk is not None and token_id == unk and token != self.tokenizer.unk_token):
            raise ValueError(
                f"The tokenizer has no token {token!r} (`{argument}`). Register it with "
                "`trl_polar.modeling.add_polar_tokens(tokenizer, model)`, or pass the name of a token the tokenizer "
                f"has as `{argument}=`."
            )
        return int(token_id)

    def _check_separator(self) -> None:
        if not isinstance(self.separator, str) or not self.separator:
            raise ValueError(f"`separator` must be a non-empty string, got {self.separator!r}.")
        if self.separator in self.tokenizer.get_vocab():
            return
        # A tokenizer without the separator as one token still works if it spells it losslessly (upstream relies on
        # the tokenizer to handle the literal text); a tokenizer that maps it to unknown tokens does not.
        ids = self.tokenizer.encode(self.separator, add_special_tokens=False)
        if self.tokenizer.decode(ids) != self.separator:
            raise ValueError(
                f"The tokenizer cannot represent the separator {self.separator!r}. Register it with "
                "`trl_polar.modeling.add_polar_tokens(tokenizer, model)` or pass another `separator=`."
            )

    @staticmethod
    def _check_wrapper(wrapper: str) -> None:
        if wrapper not in WRAPPERS:
            raise ValueError(
                f"`wrapper` must be one of {WRAPPERS}, got {wrapper!r}: 'sft' puts '\\n' between the prompt and "
                "each response (the released checkpoints' default), 'pretrain' joins them directly."
            )

    # ------------------------------------------------------------------------------------------------ the pieces
    def _tokenize_part(self, text: str) -> list[int]:
        # Parts repeat a lot (a GRPO group shares prompt and reference), so keep a small LRU of their ids.
        ids = self._cache.get(text)
        if ids is None:
            ids = self.tokenizer.encode(text, add_special_tokens=True)
            self._cache[text] = ids
            if len(self._cache) > self._CACHE_SIZE:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(text)
        return ids

    def _cut_response(self, ids: list[int]) -> list[int]:
        if len(ids) <= self.max_response_length:
            return ids
        if self.response_cut_side == "right":
            return ids[: self.max_response_length]
        return ids[-self.max_response_length :]

    def _prompt_budget(self, reference_ids: list[int], *candidate_ids: list[int]) -> int:
        budget = self.max_length - RESERVED_TOKENS
        prompt_budget = min((budget - len(reference_ids) - len(ids)) // 2 for ids in candidate_ids)
        if prompt_budget <= 0:
            raise ValueError(
                f"No room left for the prompt: max_length={self.max_length} minus {RESERVED_TOKENS} reserved tokens "
                f"minus the reference ({len(reference_ids)} tokens) and the candidate "
                f"({max(len(ids) for ids in candidate_ids)} tokens) leaves {prompt_budget} tokens for each copy of "
                f"the prompt. Raise max_length or lower max_response_length (now {self.max_response_length}) so that "
                "max_length - 4 > 2 * max_response_length."
            )
        return prompt_budget

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _join(self, prompt: str, reference: str, candidate: str, wrapper: str, client: bool) -> str:
        # Training (xtuner's tokenize_ref) drops the "\n" before an empty response; the official client's check for
        # that is always False, so it always inserts it. `client=True` reproduces the client's text.
        def half(response: str) -> str:
            if wrapper == "pretrain" or (response == "" and not client):
                return prompt + response
            return prompt + "\n" + response

        return half(reference) + self.separator + half(candidate)

    def _parts(self, prompt: Text, reference: Text, candidates: Sequence[Text], wrapper: str):
        self._check_wrapper(wrapper)
        p_ids = self._tokenize_part(flatten(prompt, "prompt"))
        r_ids = self._tokenize_part(flatten(reference, "reference"))
        if len(candidates) == 1:
            names = ["candidate"]
        elif len(candidates) == 2:
            names = ["chosen", "rejected"]
        else:
            names = [f"candidates[{i}]" for i in range(len(candidates))]
        c_ids = [self._tokenize_part(flatten(c, name)) for c, name in zip(candidates, names)]
        r_kept, c_kept = self._cut_response(r_ids), [self._cut_response(ids) for ids in c_ids]
        prompt_budget = self._prompt_budget(r_kept, *c_kept)
        p_kept = p_ids[-prompt_budget:] if len(p_ids) > prompt_budget else p_ids
        lengths = {
            "prompt": PartLength(len(p_ids), len(p_kept)),
            "reference": PartLength(len(r_ids), len(r_kept)),
            "candidates": [PartLength(len(a), len(b)) for a, b in zip(c_ids, c_kept)],
        }
        p_text = self._decode(p_kept)
        texts = (p_text, self._response_text(r_kept, p_kept, p_text, wrapper),
                 [self._response_text(ids, p_kept, p_text, wrapper) for ids in c_kept])  # fmt: skip
        return texts, lengths

    def _response_text(self, ids: list[int], prompt_ids: list[int], prompt_text: str, wrapper: str) -> str:
        if wrapper == "pretrain":
            # The response follows the prompt directly: decode it as it reads there, so that a SentencePiece-style
            # tokenizer keeps the space at the seam ("sft" puts "\n" between them, as the checkpoints read it).
            text = decode_after(self._decode, prompt_ids, ids, prompt_text)
            if text is not None:
                return text
        return self._decode(ids)

    def _encoding(self, text: str, lengths: dict, index: int) -> PolarEncoding:
        ids = self.tokenizer.encode(text, add_special_tokens=True) + [self.reward_token_id]
        return PolarEncoding(ids, text, lengths["prompt"], lengths["reference"], lengths["candidates"][index])

    # ------------------------------------------------------------------------------------------------ public API
    def format(self, prompt: Text, reference: Text, candidate: Text, wrapper: str = "sft") -> str:
        """The text the official POLAR client sends to a server, reward-token text included, byte for byte."""
        (p, r, (c,)), _ = self._parts(prompt, reference, [candidate], wrapper)
        return self._join(p, r, c, wrapper, client=True) + self.reward_token

    def build(self, prompt: Text, reference: Text, candidate: Text, wrapper: str = "sft") -> PolarEncoding:
        """Like `encode`, with the text and what truncation removed."""
        (p, r, (c,)), lengths = self._parts(prompt, reference, [candidate], wrapper)
        return self._encoding(self._join(p, r, c, wrapper, client=False), lengths, 0)

    def encode(self, prompt: Text, reference: Text, candidate: Text, wrapper: str = "sft") -> list[int]:
        """The ids the model sees: BOS first, the reward token id last (as upstream's training code builds them)."""
        return self.build(prompt, reference, candidate, wrapper).input_ids

    def build_pair(
        self, prompt: Text, reference: Text, chosen: Text, rejected: Text, wrapper: str = "sft"
    ) -> PolarPairEncoding:
        """Like `encode_pair`, with texts and truncation reports."""
        (p, r, (c, j)), lengths = self._parts(prompt, reference, [chosen, rejected], wrapper)
        return PolarPairEncoding(
            self._encoding(self._join(p, r, c, wrapper, client=False), lengths, 0),
            self._encoding(self._join(p, r, j, wrapper, client=False), lengths, 1),
        )

    def build_ranking(
        self, prompt: Text, reference: Text, candidates: Sequence[Text], wrapper: str = "sft"
    ) -> list[PolarEncoding]:
        """One encoding per candidate of a k-way ranking; like `build_pair`, all share the smallest prompt budget."""
        if isinstance(candidates, (str, Mapping)) or not isinstance(candidates, Sequence):
            raise ValueError(f"`candidates` must be a list of responses, best first, got {candidates!r:.80}.")
        if len(candidates) < 2:
            raise ValueError(
                f"`candidates` holds {len(candidates)} response(s); a ranking needs at least 2, best first. Add "
                "candidates or drop the row."
            )
        (p, r, cands), lengths = self._parts(prompt, reference, list(candidates), wrapper)
        return [self._encoding(self._join(p, r, c, wrapper, client=False), lengths, i) for i, c in enumerate(cands)]

    def encode_pair(
        self, prompt: Text, reference: Text, chosen: Text, rejected: Text, wrapper: str = "sft"
    ) -> tuple[list[int], list[int]]:
        """Chosen and rejected ids of one training record; the prompt budget is the smaller of the two."""
        pair = self.build_pair(prompt, reference, chosen, rejected, wrapper)
        return pair.chosen.input_ids, pair.rejected.input_ids

    # ----------------------------------------------------------------------------------------------- persistence
    def to_dict(self) -> dict[str, Any]:
        """The template parameters, as recorded in a saved model's config."""
        return {
            "max_length": self.max_length,
            "max_response_length": self.max_response_length,
            "response_cut_side": self.response_cut_side,
            "separator": self.separator,
            "reward_token": self.reward_token,
        }

    @classmethod
    def from_pretrained(cls, path_or_model: Any, tokenizer: Any = None, **overrides: Any) -> PolarTemplate:
        """Rebuild the template a saved model was trained with.

        Args:
            path_or_model: a directory or hub name holding config.json and a tokenizer, or a loaded model.
            tokenizer: the tokenizer to use; loaded from `path_or_model` when omitted.
            overrides: template parameters that replace the recorded ones.
        """
        # Imported here: hub brings torch and transformers in, which the format itself does not need.
        from .hub import load_tokenizer, read_config

        if isinstance(path_or_model, (str, os.PathLike)):
            config = read_config(path_or_model)
            source = str(path_or_model)
        else:
            model_config = getattr(path_or_model, "config", None)
            if model_config is None:
                raise ValueError(
                    f"`path_or_model` must be a path, a hub name or a model with a `config`, got "
                    f"{type(path_or_model).__name__}."
                )
            config = model_config.to_dict()
            source = config.get("_name_or_path") or getattr(path_or_model, "name_or_path", None)
        params = dict(config.get(CONFIG_KEY) or {})
        params.update(overrides)
        if tokenizer is None:
            if not source:
                raise ValueError("The model has no `name_or_path` to load its tokenizer from; pass `tokenizer=`.")
            tokenizer = load_tokenizer(source)
        return cls(tokenizer, **params)


def decode_after(
    decode: Callable[[list[int]], str], prefix_ids: Sequence[int], ids: Sequence[int], prefix_text: str | None = None
) -> str | None:
    """The text of `ids` as it reads right after `prefix_ids`, or None when the two do not decode apart.

    SentencePiece-style decoders (Metaspace: Llama-2, Yi, Gemma, ...) drop the space of a leading "▁" from the first
    token of every decode, so text decoded alone loses the space where it continues other text directly
    ("Hello" + decode("▁world again") gives "Helloworld again"). Decoding prefix and continuation together and
    cutting the prefix's text off keeps it; byte-level tokenizers give the same text both ways.

    `prefix_text`, when given, is ``decode(prefix_ids)`` already computed.

    >>> decode_after(lambda ids: "".join(chr(i) for i in ids), [72, 105], [32, 33])
    ' !'
    """
    prefix = decode(list(prefix_ids)) if prefix_text is None else prefix_text
    whole = decode([*prefix_ids, *ids])
    return whole[len(prefix) :] if whole.startswith(prefix) else None


def common_prefix_length(*sequences: Sequence[int]) -> int:
    """Length of the longest run of ids that all sequences start with.

    Causal attention makes the hidden states of these positions identical in every sequence, so they can be
    computed once; this holds whatever the tokenizer did at the boundary.

    >>> common_prefix_length([1, 2, 3, 4], [1, 2, 5], [1, 2, 3])
    2
    """
    if not sequences:
        return 0
    n = min(len(s) for s in sequences)
    first = sequences[0]
    for i in range(n):
        token = first[i]
        if any(s[i] != token for s in sequences[1:]):
            return i
    return n
