"""The routes of the reward server. Each one reads its body into its wire model (`trl_polar.serving.protocol`),
hands it to the service and answers from a wire model; the OpenAPI schema at ``/openapi.json`` (browsable at
``/docs``) is generated from the same models.

- ``POST /score``       this project's schema: triples in, ``{"scores", "truncated", "id"}`` out;
- ``POST /pooling``     lmdeploy's and vLLM's pooling API (what the official POLAR client sends to both): formatted
                        texts in; ``data[i].data`` is the score (lmdeploy) or ``[[score]]`` (vLLM), chosen by
                        ``pooling_shape`` or by a vLLM-only field in the request;
- ``POST /classify``    SGLang's shape: ``{"text": [...]}`` in, ``[{"embedding": [score], "meta_info": {...}}, ...]``
                        out;
- ``POST /tokenize``    vLLM's: how a text is tokenized (``{"prompt"}`` in, ``{"tokens", "count", ...}`` out), and
  ``POST /v1/encode``   lmdeploy's (``{"input"}`` in, ``{"input_ids", "length"}`` out);
- ``POST /get_reward``  OpenRLHF's remote reward-model protocol: ``{"query", "prompts", "labels"}`` in,
                        ``{"rewards", "scores", "extra_logs", "errors"}`` out; the label is the reference;
- ``GET /health``, ``GET /metrics`` (Prometheus text format).

This module imports FastAPI, so it is imported only when a server is built (``pip install trl-polar[serve]``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from .get_reward import answer as openrlhf_answer
from .protocol import (
    REQUEST_MODELS,
    RESPONSE_MODELS,
    ClassifyRequest,
    ClassifyResponse,
    ClassifyResult,
    EncodeRequest,
    EncodeResponse,
    ErrorEnvelope,
    GetRewardRequest,
    GetRewardResponse,
    HealthResponse,
    PoolingRequest,
    PoolingResponse,
    RequestError,
    ScoreRequest,
    ScoreResponse,
    TokenizeRequest,
    TokenizeResponse,
    classify_answer,
    dumps,
    error_body,
    parse_json,
    pooling_answer,
    validate,
)
from .server import (
    DEFAULT_BATCH_WINDOW_MS,
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_QUEUE,
    DEFAULT_POOLING_SHAPE,
    check_api_key,
)
from .service import PolarService

logger = logging.getLogger(__name__)

# What a route's work returns: the answer, the number of items scored, the number the template truncated.
Work = Callable[[PolarService, Any], Awaitable[tuple[BaseModel, int, int]]]
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorEnvelope, "description": description}
    for status, description in (
        (400, "The body is not JSON."),
        (401, "Missing or wrong API key."),
        (408, "The body did not arrive within --body-timeout."),
        (413, "The body is over --max-body-bytes."),
        (422, "The body does not match the schema; `field` names the offending value."),
        (503, "The queue is full or the server is shutting down (Retry-After)."),
    )
}
router = APIRouter()
# The routes that answer in another engine's shape.
ENGINE_ENDPOINTS = ("/pooling", "/classify", "/tokenize", "/v1/encode")


def create_app(
    scorer: Any,
    *,
    api_key: str | None = None,
    max_queue: int = DEFAULT_MAX_QUEUE,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    batch_window_ms: float = DEFAULT_BATCH_WINDOW_MS,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    model_name: str | None = None,
    pooling_shape: str = DEFAULT_POOLING_SHAPE,
) -> FastAPI:
    """The FastAPI app serving one scorer.

    Requests that arrive within ``batch_window_ms`` of the oldest waiting one are scored together, up to the
    scorer's ``max_tokens_per_batch`` tokens, in one scorer call.

    Args:
        scorer: a `PolarScorer` (anything with ``.encode_items``, ``.score_ids``, ``.template`` and
            ``.max_tokens_per_batch``).
        api_key: when set, every endpoint but /health needs ``Authorization: Bearer <key>`` (or ``X-API-Key``).
        max_queue: the most requests admitted and not yet answered; beyond it a request gets 503 + Retry-After.
        max_body_bytes: the largest request body; beyond it 413.
        batch_window_ms: how long the worker waits for more requests after the first one of a batch arrives.
        body_timeout_s: how long a request may take to send its body after its headers; beyond it 408. A request
            counts against ``max_queue`` only once its body is in, so slow senders cannot lock others out.
        model_name: the name /pooling answers with (default: the model directory's name).
        pooling_shape: how /pooling answers a request that could be lmdeploy's or vLLM's (the official POLAR client
            sends the same request to both): ``"lmdeploy"`` (``data[i].data`` is the score) or ``"vllm"``
            (``data[i].data`` is ``[[score]]``). A request with a vLLM-only field is answered in vLLM's shape.
    """
    check_api_key(api_key)
    if model_name is None:
        source = getattr(getattr(scorer, "model", None), "name_or_path", None) or "polar"
        model_name = os.path.basename(str(source).rstrip("/")) or "polar"
    service = PolarService(
        scorer,
        api_key=api_key,
        max_queue=max_queue,
        max_body_bytes=max_body_bytes,
        batch_window_ms=batch_window_ms,
        body_timeout_s=body_timeout_s,
        model_name=model_name,
        pooling_shape=pooling_shape,
    )
    app = FastAPI(title="trl-polar reward server", version=__version__, lifespan=_lifespan)
    app.state.polar = service
    app.add_exception_handler(RequestError, _request_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    app.include_router(router)
    app.openapi = lambda: _openapi(app)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI):
    service: PolarService = app.state.polar
    service.start()
    try:
        yield
    finally:
        # uvicorn has already waited for the admitted requests; what is still queued is scored before exit.
        await asyncio.get_running_loop().run_in_executor(None, service.stop)


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema of the routes, plus the request bodies (read by the routes themselves) and engine shapes."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, routes=app.routes, separate_input_output_schemas=False
        )
        models = [(model, "validation") for model in (*REQUEST_MODELS, *RESPONSE_MODELS)]
        _, defs = models_json_schema(models, ref_template="#/components/schemas/{model}")
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
        app.openapi_schema = schema
    return app.openapi_schema


def _error_response(err: RequestError) -> Response:
    return JSONResponse(error_body(err), status_code=err.status, headers=err.headers)


async def _request_error(request: Request, err: Exception) -> Response:
    return _error_response(err)


async def _http_error(request: Request, err: Exception) -> Response:
    """Starlette's own refusals (an unknown path, a wrong method) in the one envelope."""
    where = f"{request.method} {request.url.path}"
    if err.status_code == 404:
        paths = ", ".join(sorted({route.path for route in router.routes}))
        message = f"No endpoint `{where}`; the endpoints are {paths}."
    elif err.status_code == 405:
        allowed = (err.headers or {}).get("Allow", "")
        message = f"`{where}` is not allowed; `{request.url.path}` takes {allowed or 'another method'}."
    else:
        message = f"`{where}`: {err.detail}"
    return _error_response(RequestError(err.status_code, message, headers=dict(err.headers or {})))


async def _internal_error(request: Request, err: Exception) -> Response:
    logger.exception("%s %s failed", request.method, request.url.path, exc_info=err)
    return _error_response(RequestError(500, f"Internal error: {type(err).__name__}: {err}"))


def _body(model: type[BaseModel]) -> dict:
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


async def _answer(request: Request, endpoint: str, model: type[BaseModel], work: Work) -> Response:
    """Authenticate, read the body, admit, validate, do the work, answer; count it in /metrics either way."""
    service: PolarService = request.app.state.polar
    started = time.perf_counter()
    status, items, truncated = 500, 0, 0
    admitted = False
    try:
        service.check_key(request.headers.get("authorization"), request.headers.get("x-api-key"))
        service.check_open()
        raw = await service.read_body(request)
        service.admit()
        service.in_flight += 1
        admitted = True
        body = validate(model, parse_json(raw), endpoint, service.limits)
        answer, items, truncated = await work(service, body)
        status = 200
        # Engine shapes are written field for field as the engines write them (nulls included).
        return Response(dumps(answer, as_set=endpoint in ENGINE_ENDPOINTS), media_type="application/json")
    except RequestError as err:
        status = err.status
        return _error_response(err)
    except Exception as err:  # a bug or a model failure: answer 500 and keep serving
        logger.exception("%s failed", endpoint)
        return _error_response(RequestError(500, f"Internal error while scoring: {type(err).__name__}: {err}"))
    finally:
        if admitted:
            service.in_flight -= 1
        service.metrics.request(endpoint, status, time.perf_counter() - started, items, truncated)


async def _score(service: PolarService, req: ScoreRequest) -> tuple[BaseModel, int, int]:
    encoded = await service.run(service.encode_score, req)
    scores = await service.score(encoded.input_ids, encoded.group_keys)
    return ScoreResponse(scores=scores, truncated=encoded.truncated, id=req.id), len(scores), encoded.truncated


async def _texts(service: PolarService, texts: list[Any], name: str, single: bool = False):
    ids, keys = await service.run(service.encode_texts, texts, name, single)
    return await service.score(ids, keys), [len(x) for x in ids]


async def _pooling(service: PolarService, req: PoolingRequest) -> tuple[BaseModel, int, int]:
    scores, tokens = await _texts(service, req.input, "input")
    # The two engines' requests are alike (the official client sends {"input": [...]} to both): a vLLM-only field
    # marks a vLLM client; otherwise the server's --pooling-shape decides.
    shape = "vllm" if req.vllm_fields() else service.pooling_shape
    # vLLM answers with its served model's name; lmdeploy echoes the request's.
    model = service.model_name if shape == "vllm" else req.model or service.model_name
    return pooling_answer(shape, scores, tokens, model), len(scores), 0


async def _classify(service: PolarService, req: ClassifyRequest) -> tuple[BaseModel, int, int]:
    started = time.time()
    inputs, name, single = req.inputs()
    scores, tokens = await _texts(service, inputs, name, single)
    results = classify_answer(scores, tokens, started)
    # SGLang answers one input sent on its own with a bare object, a list with a list.
    return (results[0] if single else ClassifyResponse(results)), len(scores), 0


def _token_ids(service: PolarService, texts: list[str], special_tokens: bool) -> list[list[int]]:
    return service.template.tokenizer(texts, add_special_tokens=special_tokens)["input_ids"]


async def _tokenize(service: PolarService, req: TokenizeRequest) -> tuple[BaseModel, int, int]:
    # On the encode thread, like every tokenization: a fast tokenizer is not to be used from two threads at once.
    (ids,) = await service.run(_token_ids, service, [req.prompt], req.add_special_tokens)
    strs = service.template.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
    answer = TokenizeResponse(count=len(ids), max_model_len=service.template.max_length, tokens=ids, token_strs=strs)
    return answer, 0, 0


async def _get_reward(service: PolarService, req: GetRewardRequest) -> tuple[BaseModel, int, int]:
    samples, ok, encoded = await service.run(service.encode_get_reward, req)
    scores = await service.score(encoded.input_ids, encoded.group_keys) if ok else []
    failures = {i: reason for i, (_, reason) in samples.failures.items()}
    if failures:
        first = min(failures)
        logger.warning(
            "/get_reward: %d of %d rollouts got no reward; first: %s", len(failures), len(req.query), failures[first]
        )
    # Raw POLAR scores: OpenRLHF normalises and clips on its side (--reward.normalize_enable, clip_range). A failed
    # rollout answers 200 with rewards None, a message in `errors` and a count in extra_logs: OpenRLHF drops the
    # body of any other status.
    body = openrlhf_answer(samples, dict(zip(ok, scores, strict=True)), failures)
    return GetRewardResponse(**body), len(scores), encoded.truncated


async def _encode(service: PolarService, req: EncodeRequest) -> tuple[BaseModel, int, int]:
    texts = [req.input] if isinstance(req.input, str) else req.input
    # The BOS the tokenizer adds is a special token; without add_bos the text is tokenized without any.
    ids = await service.run(_token_ids, service, texts, req.add_bos) if texts else []
    if isinstance(req.input, str):
        return EncodeResponse(input_ids=ids[0], length=len(ids[0])), 0, 0
    return EncodeResponse(input_ids=ids, length=[len(x) for x in ids]), 0, 0


def _post(path: str, request_model: type[BaseModel], response_model: Any, work: Work, summary: str) -> None:
    async def route(request: Request) -> Response:
        return await _answer(request, path, request_model, work)

    route.__name__ = path.strip("/")
    router.add_api_route(
        path,
        route,
        methods=["POST"],
        summary=summary,
        response_model=response_model,
        responses=_ERRORS,
        openapi_extra=_body(request_model),
    )


_post("/score", ScoreRequest, ScoreResponse, _score, "Score (prompt, reference, candidate) triples")
_post("/pooling", PoolingRequest, PoolingResponse, _pooling, "Score formatted texts (lmdeploy / vLLM shape)")
_post(
    "/classify", ClassifyRequest, ClassifyResponse | ClassifyResult, _classify, "Score formatted texts (SGLang shape)"
)
_post("/tokenize", TokenizeRequest, TokenizeResponse, _tokenize, "Tokenize a text as /pooling does (vLLM shape)")
_post("/v1/encode", EncodeRequest, EncodeResponse, _encode, "Tokenize texts as /pooling does (lmdeploy shape)")
_post("/get_reward", GetRewardRequest, GetRewardResponse, _get_reward, "OpenRLHF's remote reward model")


@router.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
async def health(request: Request) -> Response:
    """Liveness: 200 while serving, 503 while draining; needs no key."""
    service: PolarService = request.app.state.polar
    answer = HealthResponse(
        status="draining" if service.draining else "ok",
        model=service.model_name,
        queue_depth=service.batcher.depth,
        in_flight=service.in_flight,
        max_queue=service.max_queue,
        uptime_s=round(time.time() - service.started, 3),
    )
    return Response(dumps(answer), status_code=503 if service.draining else 200, media_type="application/json")


@router.get("/metrics", response_class=PlainTextResponse, responses={401: _ERRORS[401]})
async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    service: PolarService = request.app.state.polar
    service.check_key(request.headers.get("authorization"), request.headers.get("x-api-key"))
    return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")
