"""The OpenAI-compatible FastAPI app: `build_app(engine, tokenizer, settings)`.

The caller (the CLI, or a test) starts the engine and serves the app with uvicorn; the app's
lifespan binds the engine to uvicorn's event loop. Routes:

    POST /v1/chat/completions   POST /v1/completions   GET /v1/models[/{id}]
    POST /tokenize   POST /detokenize   GET /health   GET /version   GET /metrics

With an API key set, /v1/*, /tokenize and /detokenize need `Authorization: Bearer <key>`;
/health, /version and /metrics stay open for probes and scrapers (as in vLLM).
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from kvport import __version__
from kvport.api.errors import APIError, install_error_handlers
from kvport.api.metrics import ServerMetrics
from kvport.api.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                 DetokenizeResponse, ModelCard, ModelList, TokenizeRequest,
                                 TokenizeResponse, parse_request)
from kvport.api.serving_chat import ChatServing, render_chat
from kvport.api.serving_completions import CompletionServing


@dataclasses.dataclass
class ServerSettings:
    """HTTP-side options; None means "derive from the engine" (see `build_app`)."""
    served_model_name: str | None = None   # default: the engine's model name
    api_key: str | None = None             # None: no authentication
    # Large enough for a full-context prompt as token ids (~7 bytes per id at 128k tokens
    # is ~1 MB), small enough that a stray upload cannot eat the server's memory.
    max_request_body_bytes: int = 4 * 2**20
    model_root: str | None = None          # /v1/models "root"; default: the model's path
    retry_after_seconds: int = 1           # Retry-After on 503s (waiting queue full)


def build_app(engine, tokenizer, settings: ServerSettings | None = None) -> FastAPI:
    """The app for a started engine client (kvport.core.engine_client) and the tokenizer."""
    settings = dataclasses.replace(
        settings or ServerSettings(),
        served_model_name=(settings and settings.served_model_name) or engine.info.model_name,
        model_root=(settings and settings.model_root) or engine.info.model_path)
    metrics = ServerMetrics(engine, settings.served_model_name)
    app = FastAPI(title="kvport", version=__version__, lifespan=_lifespan(engine))
    app.state.settings, app.state.metrics = settings, metrics
    install_error_handlers(app, settings.retry_after_seconds)
    completions = CompletionServing(engine, tokenizer, settings, metrics)
    chat = ChatServing(engine, tokenizer, settings, metrics)
    protected = APIRouter(dependencies=[Depends(_api_key_checker(settings.api_key))])
    _openai_routes(protected, completions, chat)
    _tokenizer_routes(protected, completions)
    app.include_router(protected)
    _ops_routes(app, engine, metrics)
    return app


def _lifespan(engine):
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.attach_loop(asyncio.get_running_loop())   # outputs are delivered on this loop
        yield
    return lifespan


def _api_key_checker(api_key: str | None):
    expected = api_key.encode() if api_key else None

    async def check_api_key(request: Request) -> None:
        if expected is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "Missing API key: send `Authorization: Bearer <key>`.",
                           code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), expected):   # constant time
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
    return check_api_key


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or a 413 as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():   # chunked uploads have no Content-Length
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body exceeds {limit} bytes", code="request_too_large")


def _openai_routes(router: APIRouter, completions: CompletionServing,
                   chat: ChatServing) -> None:
    settings, engine = completions.settings, completions.engine
    limit = settings.max_request_body_bytes

    @router.post("/v1/chat/completions")
    async def create_chat_completion(raw: Request) -> Response:
        request = parse_request(ChatCompletionRequest, await read_body(raw, limit))
        return await chat.create(request, raw)

    @router.post("/v1/completions")
    async def create_completion(raw: Request) -> Response:
        request = parse_request(CompletionRequest, await read_body(raw, limit))
        return await completions.create(request, raw)

    def model_card() -> ModelCard:
        return ModelCard(id=settings.served_model_name, root=settings.model_root,
                         max_model_len=engine.info.max_model_len)

    @router.get("/v1/models")
    async def list_models() -> ModelList:
        return ModelList(data=[model_card()])

    @router.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> ModelCard:
        completions.check_model(model_id)
        return model_card()


def _tokenizer_routes(router: APIRouter, serving: CompletionServing) -> None:
    """vLLM's /tokenize and /detokenize: see exactly what the model will be given."""
    engine, tokenizer = serving.engine, serving.tokenizer
    limit = serving.settings.max_request_body_bytes

    @router.post("/tokenize")
    async def tokenize(raw: Request) -> TokenizeResponse:
        request = parse_request(TokenizeRequest, await read_body(raw, limit))
        serving.check_model(request.model)
        if (request.prompt is None) == (request.messages is None):
            raise APIError(400, "send exactly one of `prompt` and `messages`", param="prompt")
        if request.messages is not None:
            tokens = render_chat(tokenizer, request.messages,
                                 request.add_generation_prompt is not False)
        else:
            tokens = list(tokenizer.encode(request.prompt,
                                           add_special_tokens=request.add_special_tokens
                                           is not False))
        strs = tokenizer.convert_ids_to_tokens(tokens) if request.return_token_strs else None
        return TokenizeResponse(count=len(tokens), max_model_len=engine.info.max_model_len,
                                tokens=tokens, token_strs=strs)

    @router.post("/detokenize")
    async def detokenize(raw: Request) -> DetokenizeResponse:
        request = parse_request(DetokenizeRequest, await read_body(raw, limit))
        serving.check_model(request.model)
        if request.tokens:
            serving.tokenize_prompt(request.tokens, param="tokens")   # range check only
        return DetokenizeResponse(prompt=tokenizer.decode(request.tokens))


def _ops_routes(app: FastAPI, engine, metrics: ServerMetrics) -> None:
    @app.get("/health")
    async def health() -> Response:
        """200 while requests can be served ("degraded" when some replicas have failed)."""
        if not engine.is_alive:
            raise APIError(503, f"the engine is not running: {engine.dead_reason or 'stopped'}",
                           code="engine_dead")
        replicas = engine.replica_status()
        status = "ok" if all(replica.alive for replica in replicas) else "degraded"
        return JSONResponse({"status": status,
                             "replicas": [dataclasses.asdict(r) for r in replicas]})

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": __version__})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
