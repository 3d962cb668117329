"""The server's refusals: `RequestError`, the one envelope it is written in, and pydantic's validation errors read
as the field path and the fix a user needs. Imports neither FastAPI nor torch (the client reads engines' answers with
`first_error` too)."""

from __future__ import annotations

import json
import typing
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from .protocol import EXAMPLES, ErrorBody, ErrorEnvelope

ERROR_TYPES = {
    400: "invalid_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    422: "invalid_request",
    500: "internal_error",
    503: "unavailable",
}


class RequestError(Exception):
    """A request the server refuses: HTTP status, a message that names the field and the fix, the field."""

    def __init__(self, status: int, message: str, field: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.headers = headers or {}

    def body(self) -> dict:
        """The envelope, as JSON-ready data (text that is not Unicode, such as an echoed surrogate, escaped)."""
        message, field = (_printable(x) for x in (self.message, self.field))
        error = ErrorBody(message=message, type=ERROR_TYPES.get(self.status, "error"), code=self.status, field=field)
        return ErrorEnvelope(error=error).model_dump(exclude_none=True)


def _printable(text: str | None) -> str | None:
    return None if text is None else text.encode("utf-8", "backslashreplace").decode()


def _walk(model: type[BaseModel] | None, loc: Sequence[Any], kind: str) -> tuple[str, Any, Any]:
    """(the field path of ``loc``, the model holding its last field, that field's info).

    ``loc`` is pydantic's: field names, list indices, and the tags it gives the member of a union it tried
    (``str``, ``list[int]``); a name is a field when the model it is read from has it, so tags drop out.

    Example:
        >>> from trl_polar.serving.protocol import ScoreRequest
        >>> _walk(ScoreRequest, ("items", 3, "prompt"), "missing")[0]
        'items[3].prompt'
    """
    path, holder, info = "", model, None
    for at, part in enumerate(loc):
        fields = getattr(model, "model_fields", None) or {}
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in fields or (kind == "extra_forbidden" and at == len(loc) - 1):
            path += f".{part}" if path else str(part)
            holder, info = model, fields.get(part)
            inner = [] if info is None else [info.annotation, *_args(info.annotation)]
            model = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return path, holder, info


def _args(annotation: Any) -> list[Any]:
    args = list(typing.get_args(annotation))
    return args + [inner for arg in args for inner in typing.get_args(arg)]


def first_error(model: type[BaseModel] | None, errors: list[dict], whole: str = "The body") -> tuple[str, str]:
    """(field path, message) of the error to report among pydantic's ``errors`` of ``model``, ``whole`` naming what
    was read; an unknown field comes first, as it usually explains the rest (a misspelt name)."""
    error = sorted(errors, key=lambda e: e["type"] != "extra_forbidden")[0]
    kind, value = error["type"], error.get("input")
    where, holder, info = _walk(model, error["loc"], kind)
    if kind == "lone_surrogate":
        where += error["ctx"]["at"]
    subject = f"`{where}`" if where else whole
    if kind == "extra_forbidden":
        known = ", ".join(holder.model_fields) if holder else ""
        message = f"Unknown field `{where}`" + (f"; the fields are {known}." if known else ".")
    elif kind == "missing":
        is_list = info is not None and typing.get_origin(info.annotation) is list
        message = f"{whole} has no `{where}`{' list' if is_list else ''}."
    elif kind in ("float_type", "float_parsing", "int_type", "int_parsing"):
        message = f"{subject} is {value!r:.80}, not a number."
    elif kind == "finite_number":
        message = f"{subject} is {value}, not a finite number."
    else:
        message = f"{subject}: {error['msg'].removeprefix('Value error, ').rstrip('.')}."
    hint = info.description if info is not None and kind in ("missing", "list_type") else None
    return where or "body", f"{message} {hint}" if hint else message


def body_error(model: type[BaseModel] | None, endpoint: str, errors: list[dict]) -> RequestError:
    """The refusal of a request body that FastAPI could not read as ``model`` (its ``RequestValidationError``)."""
    error = errors[0]
    loc = tuple(error["loc"])[1:] if error["loc"] and error["loc"][0] == "body" else tuple(error["loc"])
    kind = error["type"]
    if kind == "json_invalid":
        return RequestError(
            400, f"The body is not valid JSON: {error.get('ctx', {}).get('error', error['msg'])}.", "body"
        )
    if not loc and kind == "missing":
        return RequestError(400, "The request body is empty; send a JSON object (Content-Type: application/json).")
    if not loc and kind in ("model_type", "model_attributes_type", "dict_type"):
        got = error.get("input")
        got = (
            "a body that is not JSON (send Content-Type: application/json)"
            if isinstance(got, bytes)
            else type(got).__name__
        )
        example = json.dumps(EXAMPLES.get(endpoint, {}))
        return RequestError(422, f"The body of {endpoint} must be a JSON object like {example}, got {got}.", "body")
    body_errors = [{**e, "loc": tuple(e["loc"])[1:]} for e in errors if e["loc"] and e["loc"][0] == "body"]
    where, message = first_error(model, body_errors or errors)
    return RequestError(422, message, where)
