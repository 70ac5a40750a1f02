"""The FastAPI app: OpenAI routes and vLLM's tokenizer routes over one AsyncEngine, behind RequestGuard (API key,
body size and timeout), with model-name and request checks and OpenAI-style errors; the periodic stats line."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager, suppress

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from microscale.serve.async_engine import AsyncEngine, EngineDeadError, EngineOverloadedError
from microscale.serve.chat import create_chat_completion
from microscale.serve.completions import create_completion
from microscale.serve.errors import APIError, error_response, install_error_handlers
from microscale.serve.guard import RequestGuard
from microscale.serve.limits import ServeLimits
from microscale.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from microscale.serve.response_store import ResponseStore
from microscale.serve.responses import create_response, not_found
from microscale.serve.responses_protocol import DeletedResponse, ResponsesRequest
from microscale.serve.stats_log import StatsLogger, log_stats_every
from microscale.serve.tokenization import detokenize, tokenize, tokenizer_info
from microscale.serve.tool_parsers import tool_family
from microscale.serve.validation import check_request
from microscale.version import __version__

RETRY_AFTER_S = 1
_DISCONNECT_POLL_S = 0.25
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the response


async def _unless_disconnected(request: Request, work: Awaitable[Response]) -> Response:
    """Run a handler, but cancel it if the client goes away first: a non-streamed generation would otherwise run
    to its end for nobody (cancelling aborts its requests and frees their KV blocks). Streamed responses are
    returned at once; Starlette cancels their body when the client leaves."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
            return Response(status_code=CLIENT_CLOSED_REQUEST)


def build_app(
    engine: AsyncEngine, api_key: str | None = None, limits: ServeLimits | None = None,
    tool_call_parser: str | None = None, log_stats_interval: float | None = None,
) -> FastAPI:
    """Over a started engine, which stops (aborting what is in flight) when the server shuts down; the model is
    served as engine.served_model_name. `tool_call_parser`: the model's tool-call format (PARSER_NAMES), else the
    one its chat template writes. `log_stats_interval`: seconds between stats lines (None: none)."""
    limits = limits or ServeLimits()
    tools_format = tool_family(engine.inputs.tokenizer, tool_call_parser)
    served_model_name = engine.served_model_name

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        stats = None
        if log_stats_interval is not None:
            stats = asyncio.create_task(log_stats_every(log_stats_interval, StatsLogger(engine.metrics)))
        try:
            yield
        finally:
            if stats is not None:
                stats.cancel()
            engine.shutdown()

    app = FastAPI(title="microscale", version=__version__, lifespan=lifespan)
    app.state.engine = engine
    app.state.responses = store = ResponseStore(limits.max_stored_responses, limits.max_stored_response_bytes)
    install_error_handlers(app)
    app.add_middleware(RequestGuard, limits=limits, api_key=api_key)

    @app.exception_handler(EngineOverloadedError)
    async def overloaded(_: Request, exc: EngineOverloadedError) -> JSONResponse:
        return error_response(APIError(503, str(exc), headers={"Retry-After": str(RETRY_AFTER_S)}))

    @app.exception_handler(EngineDeadError)
    async def dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        # Its message says what state the engine is in; the engine's own error stays in the server's log.
        return error_response(APIError(503, str(exc), headers={"Retry-After": str(RETRY_AFTER_S)}))

    def check_model(model: str | None) -> None:
        if model is not None and model != served_model_name:
            raise APIError(404, f"The model {model!r} does not exist; this server serves {served_model_name!r}.",
                           "model", "model_not_found")

    @app.get("/health")
    async def health() -> JSONResponse:
        # "ok" (200); 503: "restarting" (after an engine fault), "failed" (restarts used up), "stopping"
        return JSONResponse({"status": engine.state}, status_code=200 if engine.state == "ok" else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        # Unauthenticated, as Prometheus scrapers expect; it reveals load, not content.
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    def model_card() -> ModelCard:
        return ModelCard(id=served_model_name, max_model_len=engine.inputs.max_model_len)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[model_card()])

    @app.get("/v1/models/{model_id:path}")  # hub-style names hold a slash
    async def model(model_id: str) -> ModelCard:
        check_model(model_id)
        return model_card()

    @app.post("/v1/embeddings")
    async def embeddings() -> Response:
        raise APIError(404, f"This server does not serve embeddings: {served_model_name!r} is a generative model "
                       "(use /v1/completions or /v1/chat/completions).")

    @app.post("/tokenize")
    async def tokenize_route(body: TokenizeRequest) -> TokenizeResponse:
        check_model(body.model)
        return await tokenize(engine.inputs, body, limits, tools_format)

    @app.post("/detokenize")
    async def detokenize_route(body: DetokenizeRequest) -> DetokenizeResponse:
        check_model(body.model)
        return await detokenize(engine.inputs, body)

    @app.get("/tokenizer_info")
    async def tokenizer_info_route() -> dict:
        return tokenizer_info(engine.inputs.tokenizer)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model)
        check_request(body, limits)
        return await _unless_disconnected(request, create_completion(engine, served_model_name, body))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        check_model(body.model)
        check_request(body, limits)
        return await _unless_disconnected(request, create_chat_completion(engine, served_model_name, body,
                                                                                 tools_format))

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, request: Request) -> Response:
        check_model(body.model)
        return await _unless_disconnected(request, create_response(engine, served_model_name, body, store, limits,
                                                                          tools_format))

    @app.get("/v1/responses/{response_id}")
    async def retrieve_response(response_id: str) -> Response:
        stored = store.get(response_id)
        if stored is None:
            raise not_found(response_id, "response_id")
        return Response(stored.response_json, media_type="application/json")

    @app.post("/v1/responses/{response_id}/cancel")
    async def cancel_response(response_id: str) -> Response:
        if store.get(response_id) is None:
            raise not_found(response_id, "response_id")
        # Every response here runs in its request (no background mode): by the time it can be named, it is over.
        raise APIError(400, "Only responses created with background=true can be cancelled.", "response_id")

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str) -> DeletedResponse:
        if not store.delete(response_id):
            raise not_found(response_id, "response_id")
        return DeletedResponse(id=response_id)

    return app
