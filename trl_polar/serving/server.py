"""`serve`: one `PolarScorer` behind uvicorn until SIGINT/SIGTERM.

Shutdown refuses new requests with 503 from the moment the signal arrives, lets the admitted ones finish (up to
``graceful_timeout``), scores what is still queued, then exits.
"""

from __future__ import annotations

import logging
from typing import Any

from .settings import API_KEY_ENV, ServeSettings

__all__ = ["API_KEY_ENV", "serve"]

logger = logging.getLogger(__name__)


def serve(model: Any, settings: ServeSettings | None = None) -> None:
    """Serve a POLAR reward model over HTTP until SIGINT/SIGTERM (then admitted requests finish, new ones get 503).

    Args:
        model: a saved POLAR reward model directory (or hub name), or a `PolarScorer`.
        settings: the server's `ServeSettings` (the defaults when None): the address, the key, the limits, and for
            a path the scorer's ``max_tokens_per_batch``, ``device`` and ``dtype``.

    Example::

        serve("path/to/polar-rm", ServeSettings(host="0.0.0.0", api_key="...", max_queue=256))
    """
    settings = settings or ServeSettings()
    from ..scorer import DEFAULT_MAX_TOKENS_PER_BATCH, PolarScorer
    from .app import create_app

    if hasattr(model, "score_ids"):
        budget = settings.max_tokens_per_batch
        if budget is not None and budget != model.max_tokens_per_batch:
            raise ValueError("`max_tokens_per_batch` is the scorer's own setting: pass it to PolarScorer instead.")
        scorer = model
    else:
        budget = settings.max_tokens_per_batch or DEFAULT_MAX_TOKENS_PER_BATCH
        scorer = PolarScorer(model, max_tokens_per_batch=budget, device=settings.device, dtype=settings.dtype)
    if settings.exposed:
        logger.warning(
            "Serving on %s without an API key: anyone who can reach this port can use the model.", settings.host
        )
    _run(create_app(scorer, settings), settings)


def _run(app: Any, settings: ServeSettings) -> None:
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
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=settings.graceful_timeout,
        access_log=False,
    )
    _Server(config).run()
