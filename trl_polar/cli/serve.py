"""``trl-polar serve``: the options, read into one `ServeSettings` and passed whole to
`trl_polar.serving.server.serve`. Importing this module loads neither torch nor FastAPI."""

from __future__ import annotations

import logging
from typing import Annotated

import typer
from pydantic import ValidationError

from ..serving.settings import API_KEY_ENV, ServeSettings, one_line

logger = logging.getLogger(__name__)

_FIELDS = ServeSettings.model_fields


def _option(name: str, **kwargs) -> typer.models.OptionInfo:
    """The option of a settings field, its help the field's description."""
    return typer.Option(help=_FIELDS[name].description, **kwargs)


def serve_command(
    model: Annotated[str, typer.Option(help="A saved POLAR reward model: directory or hub name.")],
    host: Annotated[str, _option("host")] = _FIELDS["host"].default,
    port: Annotated[int, _option("port")] = _FIELDS["port"].default,
    api_key: Annotated[str | None, _option("api_key", envvar=API_KEY_ENV)] = None,
    max_tokens_per_batch: Annotated[int | None, _option("max_tokens_per_batch")] = None,
    max_queue: Annotated[int, _option("max_queue")] = _FIELDS["max_queue"].default,
    max_body_bytes: Annotated[int, _option("max_body_bytes")] = _FIELDS["max_body_bytes"].default,
    batch_window_ms: Annotated[float, _option("batch_window_ms")] = _FIELDS["batch_window_ms"].default,
    body_timeout: Annotated[float, _option("body_timeout")] = _FIELDS["body_timeout"].default,
    pooling_shape: Annotated[str, _option("pooling_shape")] = _FIELDS["pooling_shape"].default,
    device: Annotated[str | None, _option("device")] = None,
    dtype: Annotated[str | None, _option("dtype")] = None,
    log_level: Annotated[str, _option("log_level")] = _FIELDS["log_level"].default,
) -> None:
    """Serve a POLAR reward model over HTTP: /score, /pooling (lmdeploy, vLLM), /classify (SGLang), /tokenize
    (vLLM), /get_reward (OpenRLHF), /health, /metrics, /docs."""
    options = {name: value for name, value in locals().items() if name != "model"}
    try:  # before the model loads
        settings = ServeSettings(**options)
    except ValidationError as err:
        raise ValueError(one_line(err)) from None
    from ..serving.server import serve

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(model, settings)
