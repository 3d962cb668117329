"""The wire format: pydantic models of every endpoint of the server and of every engine shape the client reads.

The server's routes take their bodies as these models and answer with them; the client reads the answers of its
backends (this project's server, vLLM, SGLang, lmdeploy) with them; ``/openapi.json`` is generated from them. A
refusal is always the one envelope `ErrorEnvelope`: ``{"error": {"message", "type", "code", "field"}}``, where
``field`` is the path of the offending value (``items[3].prompt``); `trl_polar.serving.errors` writes it.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    RootModel,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from ..template import CUT_SIDES, WRAPPERS, flatten

Wrapper = Literal[WRAPPERS]

# One request body per endpoint, published in /openapi.json and quoted when a body is not a JSON object.
_FORMATTED = "<prompt>\n<reference><separator><candidate>[UNUSED_TOKEN_130]"
EXAMPLES: dict[str, dict[str, Any]] = {
    "/score": {
        "id": 1,
        "items": [{"prompt": "What is 2 + 2?", "reference": "4", "candidate": "2 + 2 = 4"}],
        "options": {"wrapper": "sft"},
    },
    "/pooling": {"model": "polar", "input": [_FORMATTED]},
    "/classify": {"model": "polar", "text": [_FORMATTED]},
    "/tokenize": {"prompt": _FORMATTED},
    "/v1/encode": {"input": [_FORMATTED]},
    "/get_reward": {"query": ["<s>What is 2 + 2? 2 + 2 = 4</s>"], "prompts": ["What is 2 + 2?"], "labels": ["4"]},
}


# ---------------------------------------------------------------------------------------------------- value types
# A string parsed from JSON holds a UTF-16 surrogate only where an escape left it unpaired.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _surrogate_at(value: Any, at: str = "") -> str | None:
    """The path below ``value`` of its first string (or key) that is not text (a lone UTF-16 surrogate, which JSON
    escapes can carry and no tokenizer or JSON answer can); None if every one is text.

    Example:
        >>> _surrogate_at([{"role": "user", "content": "ok"}, {"content": "a\\udfff"}])
        '[1].content'
    """
    if isinstance(value, str):
        return at if _SURROGATE.search(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{at}.{key}"
            if _surrogate_at(key) is not None:
                return where.encode("utf-8", "backslashreplace").decode()
            if (found := _surrogate_at(item, where)) is not None:
                return found
    if isinstance(value, list):
        return next(
            (found for i, x in enumerate(value) if (found := _surrogate_at(x, f"{at}[{i}]")) is not None), None
        )
    return None


def unicode_only(value: Any) -> Any:
    """Refuse a value holding a lone surrogate, naming where (`trl_polar.serving.errors` adds the field's path)."""
    at = _surrogate_at(value)
    if at is not None:
        raise PydanticCustomError(
            "lone_surrogate", "holds a lone UTF-16 surrogate (an unpaired \\uD800-\\uDFFF escape), which is not text; "
            "send valid Unicode", {"at": at},
        )  # fmt: skip
    return value


# Strings the server reads or echoes: pydantic takes a lone surrogate as a str, which no tokenizer or answer can.
Str = Annotated[str, AfterValidator(unicode_only)]
Unicode = Annotated[Any, AfterValidator(unicode_only)]


def _text(value: Any, info: Any) -> Any:
    unicode_only(value)
    flatten(value, info.field_name or "text")  # raises ValueError naming what is wrong and the fix
    return value


_CONTENT_PART_SCHEMA = {
    "type": "object",
    "properties": {"type": {"type": "string"}, "text": {"type": "string"}},
}
_MESSAGE_SCHEMA = {
    "type": "object",
    "properties": {
        "role": {"type": "string"},
        # A string, or content parts whose text parts are read (`trl_polar.template.message_text`).
        "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": _CONTENT_PART_SCHEMA}]},
    },
    "required": ["content"],
}
Text = Annotated[
    Any,
    PlainValidator(_text),
    WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "array", "items": _MESSAGE_SCHEMA}]}),
]


def _request_id(value: Any) -> Any:
    unicode_only(value)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"must be a string or a number (it is echoed back to match answers), got {value!r:.80}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value}")
    return value


RequestId = Annotated[
    Any,
    PlainValidator(_request_id),
    WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "number"}], "description": "Echoed back in the answer."}),
]
Score = Annotated[float, Field(allow_inf_nan=False)]


# ---------------------------------------------------------------------------------------------------- errors
class ErrorBody(BaseModel):
    message: str = Field(description="What is wrong and how to fix it.")
    type: str = Field(description="invalid_request, unauthorized, not_found, payload_too_large, unavailable, ...")
    code: int = Field(description="The HTTP status code.")
    field: str | None = Field(None, description="The path of the offending value, e.g. `items[3].prompt`.")


class ErrorEnvelope(BaseModel):
    """Every refusal of the server, whatever the endpoint or the status."""

    error: ErrorBody


# ---------------------------------------------------------------------------------------------------- /score
def _candidate_or_output(schema: dict) -> None:
    schema["properties"]["output"] = {
        **schema["properties"]["candidate"],
        "title": "Output",
        "description": "`candidate`'s other name.",
    }
    schema["required"] = [name for name in schema["required"] if name != "candidate"]
    schema["anyOf"] = [{"required": ["candidate"]}, {"required": ["output"]}]


class ScoreItem(BaseModel):
    model_config = ConfigDict(json_schema_extra=_candidate_or_output)

    prompt: Text = Field(description="The prompt: a string or a list of messages.")
    reference: Text = Field(description="The reference answer the candidate is compared with.")
    candidate: Text = Field(description="The answer to score (`output`, the official client's name, works too).")
    wrapper: Wrapper | None = Field(None, description="sft or pretrain; default: `options.wrapper`.")

    @model_validator(mode="before")
    @classmethod
    def _output_is_candidate(cls, data: Any) -> Any:
        if isinstance(data, dict) and "candidate" not in data and "output" in data:
            return {**data, "candidate": data["output"]}
        return data


class ScoreOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    wrapper: Wrapper = Field("sft", description="The wrapper of items that name none.")
    max_length: int | None = Field(None, gt=0, description="A lower total token budget for this request.")
    max_response_length: int | None = Field(None, gt=0, description="A lower per-response budget for this request.")
    response_cut_side: Literal[CUT_SIDES] | None = Field(None, description="Which end of a long response is kept.")

    def above(self, limits: dict[str, int]) -> tuple[str, str] | None:
        """(field, message naming the fix) of the first of the server's ``limits`` this request would raise (a
        request may lower them, not raise them); None when it raises none.

        Example:
            >>> ScoreOptions(max_length=9000).above({"max_length": 8192})[0]
            'options.max_length'
        """
        for name, limit in limits.items():
            value = getattr(self, name)
            if value is not None and limit is not None and value > limit:
                return (
                    f"options.{name}",
                    f"`options.{name}`: {value} is over the server's {name}={limit}; a request may lower the limit, "
                    f"not raise it (send at most {limit}, or start the server with a larger template limit).",
                )
        return None

    def template_overrides(self) -> tuple[tuple[str, Any], ...]:
        """The template settings this request changes, as a hashable key (empty: the server's own template)."""
        return tuple(sorted((k, v) for k, v in self.model_dump(exclude={"wrapper"}).items() if v is not None))


class ScoreRequest(BaseModel):
    """``POST /score``: this project's schema."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [EXAMPLES["/score"]]})

    items: list[ScoreItem] = Field(description="The (prompt, reference, candidate) triples to score.")
    options: ScoreOptions | None = Field(None, description="wrapper and template limits for this request.")
    id: RequestId | None = Field(None, description="Echoed back, to match answers to requests.")


class ScoreResponse(BaseModel):
    scores: list[Score] = Field(description="One score per item, in order.")
    truncated: int = Field(0, description="Items the template had to cut to fit its limits.")
    id: RequestId | None = Field(None, description="The request's `id`, when it had one.")


# ---------------------------------------------------------------------------------------------------- /pooling
# The engine shapes below follow the engines' own servers, read at vLLM 020638a6 (vllm/entrypoints/pooling/),
# lmdeploy 1263d5cd (lmdeploy/serve/openai/endpoints/auxiliary.py, protocol.py) and SGLang's http_server.py
# /classify with its tokenizer manager's embedding output.
# Request fields vLLM's pooling request has and lmdeploy's has not: a request that sends one comes from a vLLM
# client, and is answered in vLLM's shape whatever the server's default shape.
VLLM_ONLY_POOLING_FIELDS = (
    "task", "add_special_tokens", "truncate_prompt_tokens", "truncation_side", "padding", "request_id", "priority",
    "use_activation", "embed_dtype", "endianness", "cache_salt", "mm_processor_kwargs",
)  # fmt: skip


def _as_input_list(value: Any) -> Any:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        return [value]  # one sequence of token ids
    return value


def _pooling_input(value: Any) -> Any:
    unicode_only(value)
    ids = isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    if not (isinstance(value, str) or ids):
        raise ValueError(f"must be a string or a non-empty list of token ids, got {value!r:.80}")
    return value


_INPUT_SCHEMA = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "integer"}, "minItems": 1}]}
PoolingInput = Annotated[Any, PlainValidator(_pooling_input), WithJsonSchema(_INPUT_SCHEMA)]
InputList = Annotated[
    list[PoolingInput],
    BeforeValidator(_as_input_list),
    WithJsonSchema({"anyOf": [*_INPUT_SCHEMA["anyOf"], {"type": "array", "items": _INPUT_SCHEMA}]}),
]


class PoolingRequest(BaseModel):
    """``POST /pooling``: lmdeploy's and vLLM's pooling request (what the official POLAR client sends to both).

    Fields of either engine that would change the score this server cannot honour are refused, never ignored;
    other fields (vLLM's ``request_id``, ``priority``, ...) are accepted and mark the request as vLLM's."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [EXAMPLES["/pooling"]]})

    input: InputList = Field(
        description="Texts built by PolarTemplate.format (reward-token text included), or token-id lists."
    )
    model: Str | None = Field(None, description="The model name the answer carries (lmdeploy echoes it).")
    encoding_format: Literal["float"] = Field("float", description="Only float: scores are JSON numbers.")
    dimensions: None = Field(None, description="Not supported (a reward model has one value).")
    add_special_tokens: Literal[True] = Field(True, description="vLLM's; texts get BOS, as the model was trained.")
    truncate_prompt_tokens: None = Field(None, description="vLLM's; not supported: PolarTemplate.format truncates.")
    use_activation: Literal[False] | None = Field(None, description="vLLM's; the score is the raw head output.")

    @field_validator("dimensions", "add_special_tokens", "truncate_prompt_tokens", "use_activation", mode="before")
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        fixes = {
            "dimensions": (None, "a reward model has one value: leave `dimensions` out"),
            "add_special_tokens": (True, "the model reads BOS first, as it was trained: leave it out (or true)"),
            "truncate_prompt_tokens": (None, "cutting tokens would cut the reward token: build the text with "
                                       "PolarTemplate.format, which truncates the parts"),
            "use_activation": (False, "this server returns the raw score: leave it out (or false) and apply a "
                               "sigmoid on your side if you want one"),
        }  # fmt: skip
        allowed, fix = fixes[info.field_name]
        if value is not None and value != allowed:
            raise ValueError(f"{value!r} is not supported; {fix}")
        return value

    def vllm_fields(self) -> list[str]:
        """The vLLM-only fields this request sent (empty for lmdeploy's and the official client's requests)."""
        sent = set(self.model_fields_set) | set(self.model_extra or {})
        return sorted(sent & set(VLLM_ONLY_POOLING_FIELDS))


class PoolingData(BaseModel):
    index: int | None = Field(None, description="The input's position (answers may come back out of order).")
    object: str = "pooling"
    data: Score | list[Score] | list[list[Score]] = Field(
        description="The score (lmdeploy), or per-token values ``[[v], ...]`` whose last one is the score (vLLM)."
    )


class PoolingUsage(BaseModel):
    prompt_tokens: int = 0
    total_tokens: int = 0
    completion_tokens: int | None = 0
    prompt_tokens_details: dict[str, Any] | None = None
    completion_tokens_details: dict[str, Any] | None = None


class PoolingResponse(BaseModel):
    """The answer to ``/pooling`` in lmdeploy's and vLLM's shape: ``data[i].data`` holds the score."""

    id: str | None = None
    object: str = "list"
    created: int | None = None
    model: str | None = None
    data: list[PoolingData]
    usage: PoolingUsage | None = None

    @classmethod
    def build(cls, shape: str, scores: list[float], tokens: list[int], model: str) -> PoolingResponse:
        """The answer an engine of ``shape`` gives for these scores (``tokens``: each input's token count).

        - lmdeploy: ``data[i].data`` is the score; ``usage`` as lmdeploy's ``UsageInfo.build`` fills it.
        - vllm: ``data[i].data`` is ``[[score]]``: vLLM's reward models pool every token (``[[v1], ..., [vn]]``) and
          the score is the last row; this server computes the reward token's row only, so that is the one row it
          sends (the token count is in ``usage``).
        """
        total = sum(tokens)
        usage = PoolingUsage(prompt_tokens=total, total_tokens=total, completion_tokens=0, prompt_tokens_details=None)
        if shape == "vllm":
            data = [PoolingData(index=i, object="pooling", data=[[s]]) for i, s in enumerate(scores)]
            request_id = f"pooling-{uuid.uuid4().hex}"
        else:
            data = [PoolingData(index=i, object="pooling", data=s) for i, s in enumerate(scores)]
            usage.prompt_tokens_details, usage.completion_tokens_details = {"cached_tokens": 0}, None
            request_id = f"pool-{uuid.uuid4().hex}"
        created = int(time.time())
        return cls(id=request_id, object="list", created=created, model=model, data=data, usage=usage)


# ---------------------------------------------------------------------------------------------------- /classify
_IDS_SCHEMA = {"type": "array", "items": {"type": "integer"}, "minItems": 1}


class ClassifyRequest(BaseModel):
    """SGLang's ``POST /classify`` (its ``EmbeddingReqInput``): formatted texts, or token ids, in."""

    model_config = ConfigDict(json_schema_extra={"examples": [EXAMPLES["/classify"]]})

    model: Str | None = Field(None, description="The served model's name (SGLang's OpenAI routes need it).")
    text: Str | list[Str] | None = Field(None, description="Texts built by PolarTemplate.format.")
    input_ids: Annotated[
        list[int] | list[list[int]] | None,
        WithJsonSchema({"anyOf": [_IDS_SCHEMA, {"type": "array", "items": _IDS_SCHEMA}, {"type": "null"}]}),
    ] = Field(None, description="Token ids instead of text: one list, or one list per input.")

    @model_validator(mode="after")
    def _text_or_ids(self) -> ClassifyRequest:
        if (self.text is None) == (self.input_ids is None):
            raise ValueError(
                "send either `text` (texts built by PolarTemplate.format) or `input_ids`, not both and not neither"
            )
        return self

    def inputs(self) -> tuple[list[Any], str, bool]:
        """(the inputs, the field they came from, whether the request sent one input rather than a list): SGLang
        answers one input with a bare object, a list with a list."""
        if self.text is not None:
            return ([self.text], "text", True) if isinstance(self.text, str) else (self.text, "text", False)
        ids = self.input_ids
        single = bool(ids) and all(isinstance(t, int) for t in ids)
        return ([ids] if single else ids), "input_ids", single


class ClassifyResult(BaseModel):
    index: int | None = Field(None, description="Not sent by SGLang; read when a server sends it.")
    embedding: list[Score] = Field(min_length=1, description="The score is `embedding[0]`.")
    meta_info: dict[str, Any] | None = None


class ClassifyResponse(RootModel[list[ClassifyResult]]):
    """SGLang's answer: one result per text, in order (one text sent as a string comes back as a bare object)."""

    @classmethod
    def build(cls, scores: list[float], tokens: list[int], started: float) -> ClassifyResponse:
        """One result per input as SGLang's tokenizer manager writes an embedding output: ``embedding`` (the head's
        one value) and ``meta_info`` (the request id, SGLang's finish reason of a pooling pass, the prompt's token
        count, the weight version, the latency)."""
        latency = time.time() - started
        meta = {"finish_reason": {"type": "length", "length": 0}, "weight_version": "default", "e2e_latency": latency}
        return cls(
            [
                ClassifyResult(embedding=[s], meta_info={"id": uuid.uuid4().hex, "prompt_tokens": n, **meta})
                for s, n in zip(scores, tokens, strict=True)
            ]
        )


# ---------------------------------------------------------------------------------------------------- /tokenize
class TokenizeRequest(BaseModel):
    """vLLM's ``POST /tokenize`` (its completion form): how the server tokenizes a text it is sent."""

    model_config = ConfigDict(json_schema_extra={"examples": [EXAMPLES["/tokenize"]]})

    model: Str | None = None
    prompt: Str = Field(description="A text, e.g. one built by PolarTemplate.format.")
    add_special_tokens: bool = Field(True, description="Add BOS (as /pooling and /classify do).")
    return_token_strs: bool | None = Field(False, description="Also return each token's string.")


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int = Field(description="The template's max_length.")
    tokens: list[int]
    token_strs: list[str] | None = None


class EncodeRequest(BaseModel):
    """lmdeploy's ``POST /v1/encode``: how the server tokenizes texts."""

    model_config = ConfigDict(json_schema_extra={"examples": [EXAMPLES["/v1/encode"]]})

    input: Str | list[Str] = Field(description="A text, or several.")
    do_preprocess: Literal[False] = Field(False, description="lmdeploy's chat template: not applied here.")
    add_bos: bool = Field(True, description="Add BOS (as /pooling and /classify do).")


class EncodeResponse(BaseModel):
    input_ids: list[int] | list[list[int]]
    length: int | list[int]


# ---------------------------------------------------------------------------------------------------- /get_reward
class GetRewardRequest(BaseModel):
    """``POST /get_reward``: OpenRLHF's remote reward-model protocol."""

    model_config = ConfigDict(json_schema_extra={"examples": [EXAMPLES["/get_reward"]]})

    query: list[Str] = Field(description="Prompt + response texts, decoded with special tokens kept.")
    prompts: list[Str] = Field(description="The prompt of each query, to cut the response out of it.")
    labels: list[Unicode] = Field(
        description="The reference answers (or {'reference', 'prompt'} objects); run OpenRLHF with "
        "--data.label_key (older: --label_key) naming them."
    )


class GetRewardError(BaseModel):
    index: int = Field(description="The rollout's position in the request.")
    field: str = Field(description="The request field at fault, e.g. `labels[0]` or `query[0]`.")
    message: str


class GetRewardResponse(BaseModel):
    rewards: list[Score | None] | None = Field(
        description="Raw POLAR scores (OpenRLHF normalises and clips on its side); a rollout that failed gets the "
        "finite TRL_POLAR_FAILURE_REWARD (default -10.0), since OpenRLHF has no missing-reward state."
    )
    scores: list[Score | None] | None = Field(description="The same values (OpenRLHF's dynamic filtering reads them).")
    extra_logs: dict[str, list[Score]] = Field(
        default_factory=dict, description="`polar_failed`: 1 for a rollout without a reward, else 0."
    )
    errors: list[GetRewardError] = Field(default_factory=list, description="Why each failed rollout got no reward.")


# ---------------------------------------------------------------------------------------------------- /health
class HealthResponse(BaseModel):
    status: Literal["ok", "draining"]
    model: str
    queue_depth: int = Field(description="Requests waiting for the batch worker.")
    in_flight: int = Field(description="Requests admitted and not yet answered.")
    receiving: int = Field(0, description="Requests whose body is still arriving (they hold no place in the queue).")
    max_queue: int
    uptime_s: float


REQUEST_MODELS = (ScoreRequest, PoolingRequest, ClassifyRequest, GetRewardRequest, TokenizeRequest, EncodeRequest)
RESPONSE_MODELS = (
    ScoreResponse,
    PoolingResponse,
    ClassifyResponse,
    GetRewardResponse,
    TokenizeResponse,
    EncodeResponse,
    HealthResponse,
    ErrorEnvelope,
)
