"""The server's settings: one frozen object, built once by ``trl-polar serve`` (or by whoever calls `serve` or
`create_app`) and passed whole to the server, the app and the service. Importing this module loads neither torch nor
FastAPI."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

API_KEY_ENV = "TRL_POLAR_API_KEY"
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
# lmdeploy's: the official POLAR client's first-documented engine, and what /pooling answered before vLLM's shape.
POOLING_SHAPES = ("lmdeploy", "vllm")


class ServeSettings(BaseModel):
    """Everything ``trl-polar serve`` can be told; each field is the option of the same name.

    Example:
        >>> ServeSettings(max_queue=64).max_queue
        64
        >>> ServeSettings(pooling_shape="tgi")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        pydantic_core._pydantic_core.ValidationError: 1 validation error for ServeSettings...
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = Field(
        "127.0.0.1", description="Address to bind. Loopback by default; anything else exposes the model."
    )
    port: int = Field(8000, ge=0, le=65535, description="TCP port.")
    api_key: str | None = Field(
        None, description=f"Require `Authorization: Bearer KEY` on every endpoint but /health (or set {API_KEY_ENV})."
    )
    max_tokens_per_batch: int | None = Field(
        None,
        gt=0,
        description="Most tokens in one forward pass (shared prefix once), and in one batch collected across "
        "requests (default 16384, as in PolarScorer). Only for a model path: a PolarScorer has its own.",
    )
    max_queue: int = Field(
        1024, gt=0, description="Most requests admitted and unanswered; more get 503 + Retry-After."
    )
    max_body_bytes: int = Field(32 * 1024 * 1024, gt=0, description="Largest request body in bytes; larger gets 413.")
    batch_window_ms: float = Field(5.0, ge=0, description="How long a batch waits for more requests after its first.")
    body_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds a request may take to send its body; slower gets 408. A request counts against "
        "max_queue only once its body is in, so slow senders cannot lock others out.",
    )
    pooling_shape: Literal[POOLING_SHAPES] = Field(
        "lmdeploy",
        description="How /pooling answers the official POLAR client, which sends the same request in its lmdeploy "
        "and vllm modes: lmdeploy (data[i].data is the score) or vllm (data[i].data is [[score]]). A request with a "
        "vLLM-only field (task, add_special_tokens, ...) always gets vLLM's shape.",
    )
    model_name: str | None = Field(
        None, description="The name /pooling answers with (default: the model's directory)."
    )
    device: str | None = Field(None, description="cuda, cuda:1, cpu (default: cuda if available).")
    dtype: str | None = Field(None, description="auto, bf16, fp16 or fp32 (default: as stored).")
    graceful_timeout: float = Field(60.0, gt=0, description="Most seconds shutdown waits for admitted requests.")
    log_level: str = Field("info", description="uvicorn log level.")

    @field_validator("api_key")
    @classmethod
    def _real_key(cls, key: str | None) -> str | None:
        # An empty key would look like protection and give none.
        if key is not None and not key.strip():
            raise ValueError(
                "empty, which would serve without authentication: pass a real key, or leave --api-key out on a "
                "loopback host"
            )
        return key

    @model_validator(mode="after")
    def _real_key_in_the_environment(self) -> ServeSettings:
        from_env = os.environ.get(API_KEY_ENV)
        if self.api_key is None and from_env is not None and not from_env.strip():
            raise ValueError(
                f"{API_KEY_ENV} is set but empty, which would serve without authentication: set it to a real key, "
                "or unset it on a loopback host"
            )
        return self

    @property
    def exposed(self) -> bool:
        """Bound beyond loopback without a key: anyone who can reach the port can use the model."""
        return self.host not in LOOPBACK_HOSTS and not self.api_key


def one_line(err: ValidationError) -> str:
    """A settings error as the one line the command prints: the option, what is wrong, the value given.

    Example:
        >>> try:
        ...     ServeSettings(max_queue=0)
        ... except ValidationError as err:
        ...     print(one_line(err))
        --max-queue: Input should be greater than 0 (got 0).
    """
    parts = []
    for error in err.errors():
        message = error["msg"].removeprefix("Value error, ")
        if error["loc"]:
            parts.append(f"--{str(error['loc'][0]).replace('_', '-')}: {message} (got {error['input']!r:.80}).")
        else:
            parts.append(f"{message}.")
    return " ".join(parts)
