"""`serve`: one `PolarScorer` behind uvicorn until SIGINT/SIGTERM.

Shutdown refuses new requests with 503 from the moment the signal arrives, lets the admitted ones finish (up to
``graceful_timeout``), scores what is still queued, then exits.
"""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

# The server's defaults, here where the command reads them without importing FastAPI.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_QUEUE = 1024
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
DEFAULT_BATCH_WINDOW_MS = 5.0
DEFAULT_BODY_TIMEOUT_S = 10.0
# lmdeploy's: the official POLAR client's first-documented engine, and what /pooling answered before vLLM's shape.
DEFAULT_POOLING_SHAPE = "lmdeploy"
API_KEY_ENV = "TRL_POLAR_API_KEY"
DEFAULT_GRACEFUL_TIMEOUT_S = 60.0
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


def check_api_key(api_key: str | None) -> None:
    """Refuse an empty key before anything starts: it would look like protection and give none."""
    if api_key is not None and not api_key.strip():
        raise ValueError(
            "--api-key is empty, which would serve without authentication: pass a real key, or leave --api-key "
            "out on a loopback host."
        )
    from_env = os.environ.get(API_KEY_ENV)
    if api_key is None and from_env is not None and not from_env.strip():
        raise ValueError(
            f"{API_KEY_ENV} is set but empty, which would serve without authentication: set it to a real key, or "
            "unset it on a loopback host."
        )


def serve(
    model: Any,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    api_key: str | None = None,
    max_tokens_per_batch: int | None = None,
    max_queue: int = DEFAULT_MAX_QUEUE,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    batch_window_ms: float = DEFAULT_BATCH_WINDOW_MS,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    pooling_shape: str = DEFAULT_POOLING_SHAPE,
    device: str | None = None,
    dtype: str | None = None,
    graceful_timeout: float = DEFAULT_GRACEFUL_TIMEOUT_S,
    log_level: str = "info",
) -> None:
    """Serve a POLAR reward model over HTTP until SIGINT/SIGTERM (then admitted requests finish, new ones get 503).

    ``max_queue``, ``max_body_bytes``, ``batch_window_ms`` and ``body_timeout_s`` are
    `trl_polar.serving.app.create_app`'s.

    Args:
        model: a saved POLAR reward model directory (or hub name), or a `PolarScorer`.
        host: the address to bind; loopback by default. Binding anything else exposes the model: pass an api_key.
        api_key: require ``Authorization: Bearer <key>`` on every endpoint but /health. An empty key (or an empty
            ``TRL_POLAR_API_KEY``) is refused: it would serve without authentication.
        port: the TCP port.
        max_tokens_per_batch: the most tokens one forward pass runs, which is also what the server collects across
            requests into one scorer call (default: `PolarScorer`'s). Only for a path: a scorer has its own.
        pooling_shape: how /pooling answers ("lmdeploy": ``data[i].data`` is the score; "vllm": ``[[score]]``);
            see `trl_polar.serving.app.create_app`.
        device, dtype: passed to `PolarScorer` when ``model`` is a path.
        graceful_timeout: the most seconds shutdown waits for admitted requests.
    """
    check_api_key(api_key)
    from .protocol import POOLING_SHAPES

    if pooling_shape not in POOLING_SHAPES:  # before the model loads
        raise ValueError(f"--pooling-shape must be one of {', '.join(POOLING_SHAPES)}, got {pooling_shape!r}.")
    from ..scorer import DEFAULT_MAX_TOKENS_PER_BATCH, PolarScorer
    from .app import create_app

    if hasattr(model, "score_ids"):
        if max_tokens_per_batch is not None and max_tokens_per_batch != model.max_tokens_per_batch:
            raise ValueError("`max_tokens_per_batch` is the scorer's own setting: pass it to PolarScorer instead.")
        scorer = model
    else:
        budget = max_tokens_per_batch or DEFAULT_MAX_TOKENS_PER_BATCH
        scorer = PolarScorer(model, max_tokens_per_batch=budget, device=device, dtype=dtype)
    if host not in LOOPBACK_HOSTS and not api_key:
        logger.warning("Serving on %s without an API key: anyone who can reach this port can use the model.", host)
    app = create_app(
        scorer,
        api_key=api_key,
        max_queue=max_queue,
        max_body_bytes=max_body_bytes,
        batch_window_ms=batch_window_ms,
        body_timeout_s=body_timeout_s,
        pooling_shape=pooling_shape,
    )
    _run(app, host, port, graceful_timeout, log_level)


def _run(app: Any, host: str, port: int, graceful_timeout: float, log_level: str) -> None:
    import uvicorn

    service = app.state.polar

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # noqa: ANN001 - uvicorn's signature
            # Refuse new requests from the moment the signal arrives, before uvicorn closes the listener.
            service.draining = True
            super().handle_exit(sig, frame)

    # The body limit and the body timeout are ours to enforce (413, 408); uvicorn's header and keep-alive defaults
    # are fine.
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=graceful_timeout, access_log=False
    )
    _Server(config).run()
