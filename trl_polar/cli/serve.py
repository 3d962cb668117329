"""``trl-polar serve``: the options, passed to `trl_polar.serving.server.serve`. Importing this module loads
neither torch nor FastAPI."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from ..serving.server import (
    API_KEY_ENV,
    DEFAULT_BATCH_WINDOW_MS,
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_HOST,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_QUEUE,
    DEFAULT_POOLING_SHAPE,
    DEFAULT_PORT,
)

logger = logging.getLogger(__name__)


def _budget(max_tokens_per_batch: int | None, max_batch_tokens: int | None) -> int | None:
    """--max-tokens-per-batch, or the deprecated --max-batch-tokens that now means the same."""
    if max_batch_tokens is None:
        return max_tokens_per_batch
    if max_tokens_per_batch is not None and max_tokens_per_batch != max_batch_tokens:
        raise typer.BadParameter(
            "--max-batch-tokens is the old name of --max-tokens-per-batch; pass only --max-tokens-per-batch."
        )
    logger.warning("--max-batch-tokens is deprecated: it is now --max-tokens-per-batch (%d).", max_batch_tokens)
    return max_batch_tokens


def serve_command(
    model: Annotated[str, typer.Option(help="A saved POLAR reward model: directory or hub name.")],
    host: Annotated[
        str, typer.Option(help="Address to bind. Loopback by default; anything else exposes the model (use a key).")
    ] = DEFAULT_HOST,
    port: Annotated[int, typer.Option(help="TCP port.")] = DEFAULT_PORT,
    api_key: Annotated[
        str | None,
        typer.Option(envvar=API_KEY_ENV, help=f"Require `Authorization: Bearer KEY` (or set {API_KEY_ENV})."),
    ] = None,
    max_tokens_per_batch: Annotated[
        int | None,
        typer.Option(
            help="Most tokens in one forward pass (shared prefix once), and in one batch collected across requests "
            "(default 16384, as in PolarScorer)."
        ),
    ] = None,
    max_batch_tokens: Annotated[
        int | None, typer.Option(hidden=True, help="Deprecated: --max-tokens-per-batch.")
    ] = None,
    max_queue: Annotated[
        int, typer.Option(help="Most requests admitted and unanswered; more get 503 + Retry-After.")
    ] = DEFAULT_MAX_QUEUE,
    max_body_bytes: Annotated[
        int, typer.Option(help="Largest request body in bytes; larger gets 413.")
    ] = DEFAULT_MAX_BODY_BYTES,
    batch_window_ms: Annotated[
        float, typer.Option(help="How long a batch waits for more requests after its first.")
    ] = DEFAULT_BATCH_WINDOW_MS,
    body_timeout: Annotated[
        float, typer.Option(help="Seconds a request may take to send its body; slower gets 408.")
    ] = DEFAULT_BODY_TIMEOUT_S,
    pooling_shape: Annotated[
        str,
        typer.Option(
            help="How /pooling answers the official POLAR client, which sends the same request in its lmdeploy and "
            "vllm modes: lmdeploy (data[i].data is the score) or vllm (data[i].data is [[score]]). A request with a "
            "vLLM-only field (task, add_special_tokens, ...) always gets vLLM's shape."
        ),
    ] = DEFAULT_POOLING_SHAPE,
    device: Annotated[str | None, typer.Option(help="cuda, cuda:1, cpu (default: cuda if available).")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto, bf16, fp16 or fp32 (default: as stored).")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve a POLAR reward model over HTTP: /score, /pooling (lmdeploy, vLLM), /classify (SGLang), /tokenize
    (vLLM), /get_reward (OpenRLHF), /health, /metrics, /docs."""
    from ..serving.server import serve

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(
        model,
        host=host,
        port=port,
        api_key=api_key,
        max_tokens_per_batch=_budget(max_tokens_per_batch, max_batch_tokens),
        max_queue=max_queue,
        max_body_bytes=max_body_bytes,
        batch_window_ms=batch_window_ms,
        body_timeout_s=body_timeout,
        pooling_shape=pooling_shape,
        device=device,
        dtype=dtype,
        log_level=log_level,
    )
