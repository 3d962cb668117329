"""The limits every POST passes below the routes, as ASGI middleware: the whole body within ``max_body_bytes``
(413) and within ``body_timeout`` seconds of the headers (408), then admission against ``max_queue`` (503), and the
request counted in /metrics whatever its answer.

A request counts against ``max_queue`` only once its body is in, so clients that stall mid-body hold no place.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import RequestError

_FIX_SIZE = "send fewer items per request (PolarClient(chunk_size=...)) or raise --max-body-bytes"


def error_response(err: RequestError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


class Limits:
    """Reads the body of a POST to one of ``paths``, admits it, and hands the app the body it read."""

    def __init__(self, app: ASGIApp, service: Any, paths: frozenset[str]) -> None:
        self.app = app
        self.service = service
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        service, started, status = self.service, time.perf_counter(), 500
        # The route counts what it scored here (request.state), for /metrics.
        state = scope.setdefault("state", {})

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        admitted = False
        try:
            try:
                service.check_open()
                body = await self._read(scope, receive)
                service.admit()
            except RequestError as err:
                return await error_response(err)(scope, receive, send_status)
            service.in_flight += 1
            admitted = True
            await self.app(scope, _replay(body, receive), send_status)
        finally:
            if admitted:
                service.in_flight -= 1
            seconds = time.perf_counter() - started
            service.metrics.request(scope["path"], status, seconds, state.get("items", 0), state.get("truncated", 0))

    async def _read(self, scope: Scope, receive: Receive) -> bytes:
        limit, timeout = self.service.settings.max_body_bytes, self.service.settings.body_timeout
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                raise RequestError(400, f"Content-Length {declared.decode()!r} is not an integer.", "Content-Length")
            if int(declared) > limit:
                raise RequestError(
                    413, f"The body has {int(declared)} bytes, over the limit of {limit}; {_FIX_SIZE}.", "body"
                )
        self.service.receiving += 1
        try:
            async with asyncio.timeout(timeout):
                return await _body(receive, limit)
        except TimeoutError:
            # The rest of the body may still come; closing the connection keeps it from being read as a request.
            message = f"The body did not arrive within {timeout:g} s; send it at once (or raise --body-timeout)."
            raise RequestError(408, message, "body", {"Connection": "close"}) from None
        finally:
            self.service.receiving -= 1


async def _body(receive: Receive, limit: int) -> bytes:
    # Content-Length can be absent (chunked uploads) or wrong: count what actually arrives.
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk, more = message.get("body", b""), message.get("more_body", False)
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"The body exceeds the limit of {limit} bytes; {_FIX_SIZE}.", "body")
        chunks.append(chunk)
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives the body already read, then waits on the connection (for a disconnect)."""
    given = False

    async def replay() -> Message:
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
