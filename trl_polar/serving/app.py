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
import json
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from .. import __version__
from .errors import RequestError, body_error
from .get_reward import answer as openrlhf_answer
from .limits import Limits, error_response
from .metrics import CONTENT_TYPE
from .protocol import (
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
    ScoreRequest,
    ScoreResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from .service import PolarService
from .settings import ServeSettings

logger = logging.getLogger(__name__)

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


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON; send finite numbers (or strings)")


class _JSONRequest(Request):
    """A request whose JSON refuses NaN and Infinity (no JSON answer could carry them) and reports every fault of
    the body as FastAPI reports a syntax error (400, with line and column where there is one)."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = json.loads(body, parse_constant=_no_constant)
            except json.JSONDecodeError as err:
                raise json.JSONDecodeError(f"{err.msg} (line {err.lineno}, column {err.colno})", "", 0) from None
            except (ValueError, RecursionError) as err:  # not UTF-8, NaN, or nested deeper than the parser allows
                raise json.JSONDecodeError(f"{type(err).__name__}: {err}", "", 0) from None
        return self._json


class _Route(APIRoute):
    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            return await handler(_JSONRequest(request.scope, request.receive))

        return route


router = APIRouter(route_class=_Route)
_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <key>` when the server has --api-key.")
_x_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="The key, as `X-API-Key: <key>`.")


def _service(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    x_api_key: Annotated[str | None, Depends(_x_api_key)],
) -> PolarService:
    """The app's service, for a request with the right key (when the server has one)."""
    service: PolarService = request.app.state.polar
    service.check_key(bearer.credentials if bearer is not None else x_api_key)
    return service


Service = Annotated[PolarService, Depends(_service)]


def create_app(scorer: Any, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app serving one scorer, with ``settings`` (`ServeSettings`; the defaults when None).

    Requests that arrive within ``settings.batch_window_ms`` of the oldest waiting one are scored together, up to
    the scorer's ``max_tokens_per_batch`` tokens, in one scorer call.

    Args:
        scorer: a `PolarScorer` (anything with ``.encode_items``, ``.score_ids``, ``.template`` and
            ``.max_tokens_per_batch``).
        settings: the server's settings; here ``api_key``, ``max_queue``, ``max_body_bytes``, ``batch_window_ms``,
            ``body_timeout``, ``model_name`` and ``pooling_shape`` apply.
    """
    service = PolarService(scorer, settings or ServeSettings())
    app = FastAPI(
        title="trl-polar reward server", version=__version__, lifespan=_lifespan, separate_input_output_schemas=False
    )
    app.state.polar = service
    app.add_exception_handler(RequestError, _request_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    app.add_middleware(Limits, service=service, paths=frozenset(_BODIES))
    app.include_router(router)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI):
    service: PolarService = app.state.polar
    try:
        yield
    finally:
        # uvicorn has already waited for the admitted requests; what is still queued is scored before exit.
        await asyncio.get_running_loop().run_in_executor(None, service.stop)


async def _request_error(request: Request, err: Exception) -> Response:
    return error_response(err)


async def _validation_error(request: Request, err: Exception) -> Response:
    """A body FastAPI could not read as the route's model: the first wrong field and the fix."""
    path = request.url.path
    return error_response(body_error(_BODIES.get(path), path, list(err.errors())))


async def _http_error(request: Request, err: Exception) -> Response:
    """Starlette's own refusals (an unknown path, a wrong method, a body FastAPI cannot read) in the one envelope."""
    where = f"{request.method} {request.url.path}"
    if err.status_code == 404:
        paths = ", ".join(sorted({route.path for route in router.routes}))
        message = f"No endpoint `{where}`; the endpoints are {paths}."
    elif err.status_code == 405:
        allowed = (err.headers or {}).get("Allow", "")
        message = f"`{where}` is not allowed; `{request.url.path}` takes {allowed or 'another method'}."
    else:
        message = f"`{where}`: {err.detail}"
    return error_response(RequestError(err.status_code, message, headers=dict(err.headers or {})))


async def _internal_error(request: Request, err: Exception) -> Response:
    logger.exception("%s %s failed", request.method, request.url.path, exc_info=err)
    return error_response(RequestError(500, f"Internal error: {type(err).__name__}: {err}"))


def _scored(request: Request, items: int, truncated: int = 0) -> None:
    """What the route scored, counted in /metrics by `trl_polar.serving.limits.Limits`."""
    request.state.items, request.state.truncated = items, truncated


# The request model of each route with a body (what a validation error is read against).
_BODIES: dict[str, type] = {}


def _post(path: str, body: type, answer: Any, summary: str, engine: bool = False) -> Callable:
    """Register a POST route. Engine shapes are written field for field as the engines write them (nulls
    included); this project's answers leave out what is None."""
    _BODIES[path] = body
    omit = {"response_model_exclude_unset": True} if engine else {"response_model_exclude_none": True}
    return router.post(path, response_model=answer, responses=_ERRORS, summary=summary, **omit)


@_post("/score", ScoreRequest, ScoreResponse, "Score (prompt, reference, candidate) triples")
async def score(req: ScoreRequest, service: Service, request: Request) -> ScoreResponse:
    service.check_limits(req.options)
    encoded = await service.run(service.encode_score, req)
    scores = await service.score(encoded.input_ids, encoded.group_keys)
    _scored(request, len(scores), encoded.truncated)
    return ScoreResponse(scores=scores, truncated=encoded.truncated, id=req.id)


async def _texts(service: PolarService, request: Request, texts: list[Any], name: str, single: bool = False):
    ids, keys = await service.run(service.encode_texts, texts, name, single)
    scores = await service.score(ids, keys)
    _scored(request, len(scores))
    return scores, [len(x) for x in ids]


@_post("/pooling", PoolingRequest, PoolingResponse, "Score formatted texts (lmdeploy / vLLM shape)", engine=True)
async def pooling(req: PoolingRequest, service: Service, request: Request) -> PoolingResponse:
    scores, tokens = await _texts(service, request, req.input, "input")
    # The two engines' requests are alike (the official client sends {"input": [...]} to both): a vLLM-only field
    # marks a vLLM client; otherwise the server's --pooling-shape decides.
    shape = "vllm" if req.vllm_fields() else service.settings.pooling_shape
    # vLLM answers with its served model's name; lmdeploy echoes the request's.
    model = service.model_name if shape == "vllm" else req.model or service.model_name
    return PoolingResponse.build(shape, scores, tokens, model)


@_post(
    "/classify",
    ClassifyRequest,
    ClassifyResponse | ClassifyResult,
    "Score formatted texts (SGLang shape)",
    engine=True,
)
async def classify(req: ClassifyRequest, service: Service, request: Request) -> ClassifyResponse | ClassifyResult:
    started = time.time()
    inputs, name, single = req.inputs()
    answer = ClassifyResponse.build(*await _texts(service, request, inputs, name, single), started)
    # SGLang answers one input sent on its own with a bare object, a list with a list.
    return answer.root[0] if single else answer


def _token_ids(service: PolarService, texts: list[str], special_tokens: bool) -> list[list[int]]:
    return service.template.tokenizer(texts, add_special_tokens=special_tokens)["input_ids"]


@_post("/tokenize", TokenizeRequest, TokenizeResponse, "Tokenize a text as /pooling does (vLLM shape)", engine=True)
async def tokenize(req: TokenizeRequest, service: Service) -> TokenizeResponse:
    # On the encode thread, like every tokenization: a fast tokenizer is not to be used from two threads at once.
    (ids,) = await service.run(_token_ids, service, [req.prompt], req.add_special_tokens)
    strs = service.template.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=service.template.max_length, tokens=ids, token_strs=strs)


@_post("/v1/encode", EncodeRequest, EncodeResponse, "Tokenize texts as /pooling does (lmdeploy shape)", engine=True)
async def encode(req: EncodeRequest, service: Service) -> EncodeResponse:
    texts = [req.input] if isinstance(req.input, str) else req.input
    # The BOS the tokenizer adds is a special token; without add_bos the text is tokenized without any.
    ids = await service.run(_token_ids, service, texts, req.add_bos) if texts else []
    if isinstance(req.input, str):
        return EncodeResponse(input_ids=ids[0], length=len(ids[0]))
    return EncodeResponse(input_ids=ids, length=[len(x) for x in ids])


@_post("/get_reward", GetRewardRequest, GetRewardResponse, "OpenRLHF's remote reward model")
async def get_reward(req: GetRewardRequest, service: Service, request: Request) -> GetRewardResponse:
    samples, ok, encoded = await service.run(service.encode_get_reward, req)
    scores = await service.score(encoded.input_ids, encoded.group_keys) if ok else []
    _scored(request, len(scores), encoded.truncated)
    failures = {i: reason for i, (_, reason) in samples.failures.items()}
    if failures:
        first = min(failures)
        logger.warning(
            "/get_reward: %d of %d rollouts got no reward; first: %s", len(failures), len(req.query), failures[first]
        )
    # Raw POLAR scores: OpenRLHF normalises and clips on its side (--reward.normalize_enable, clip_range). A failed
    # rollout answers 200 with rewards None, a message in `errors` and a count in extra_logs: OpenRLHF drops the
    # body of any other status.
    return GetRewardResponse(**openrlhf_answer(samples, dict(zip(ok, scores, strict=True)), failures))


@router.get(
    "/health",
    response_model=HealthResponse,
    response_model_exclude_none=True,
    responses={503: {"model": HealthResponse}},
)
async def health(request: Request, response: Response) -> HealthResponse:
    """Liveness: 200 while serving, 503 while draining; needs no key."""
    service: PolarService = request.app.state.polar
    response.status_code = 503 if service.draining else 200
    return HealthResponse(
        status="draining" if service.draining else "ok",
        model=service.model_name,
        queue_depth=service.batcher.depth,
        in_flight=service.in_flight,
        receiving=service.receiving,
        max_queue=service.settings.max_queue,
        uptime_s=round(time.time() - service.started, 3),
    )


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text format."}, 401: _ERRORS[401]},
)
async def metrics(service: Service) -> Response:
    """Prometheus text format."""
    return Response(service.metrics.render(), media_type=CONTENT_TYPE)
