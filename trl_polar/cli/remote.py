"""Scoring with a trl-polar server from the command line: the key, and a refused request as one line."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer

from .errors import CLIError

API_KEY_ENV = "TRL_POLAR_API_KEY"

ApiKey = Annotated[
    str | None,
    typer.Option(
        envvar=API_KEY_ENV,
        show_envvar=True,
        help="With --url: the server's key (`trl-polar serve --api-key`), sent as `Authorization: Bearer KEY`.",
    ),
]


def server_client(url: str, api_key: str | None) -> Any:
    """The client of one trl-polar server (``--url``), with its key."""
    from ..serving.client import PolarClient

    return PolarClient(url=url, api_key=api_key or None)


@contextmanager
def server_errors(url: str | None) -> Iterator[None]:
    """Turn a request the server refused or could not answer into one line that says what to do."""
    if url is None:
        yield
        return
    from ..serving.client import PolarClientError

    try:
        yield
    except PolarClientError as err:
        if err.status in (401, 403):
            raise CLIError(
                f"{url} refused the request (HTTP {err.status}): it needs its key; pass --api-key KEY or set "
                f"{API_KEY_ENV} to the key the server was started with."
            ) from None
        raise CLIError(" ".join(str(err).split())) from None
