"""Errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with honest statuses.

Every failure a client can cause is a 4xx here: bad JSON, wrong types and out-of-range values are
400 (never FastAPI's 422), a missing or wrong key 401, an unknown model or route 404, a huge body
413; a full waiting queue is 503 with Retry-After. Only bugs are 500s.
"""
from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvport.core.async_engine import EngineDeadError, EngineInternalError
from kvport.core.engine import EngineOverloadedError
from kvport.core.sampling_params import InvalidRequestError

logger = logging.getLogger(__name__)

# OpenAI files every client error, 401 and 404 included, under "invalid_request_error".
_TYPES = {500: "server_error", 503: "server_error"}

# Union members and validators show up in pydantic's error locations; they are not fields.
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "function-after"}


class APIError(Exception):
    """Raise anywhere in a route to answer with this status and an OpenAI-shaped body."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """A 400 from pydantic's error list: the first error's field becomes `param`."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", first["msg"])
        return APIError(400, f"the request body is not valid JSON: {detail}", code="invalid_json")
    # FastAPI prefixes locations with "body"/"query"; union members add type names. Drop both.
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")
           and not (isinstance(part, str) and ("[" in part or part in _TYPE_TAGS))]
    param = ".".join(loc) or None
    message = f"{param}: {first['msg']}" if param else first["msg"]
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return APIError(400, message, param=param, code="invalid_value")


def engine_error(exc: BaseException, retry_after: int) -> APIError:
    """Map the engine's exceptions to statuses (shared by JSON responses and SSE streams)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc), param=exc.param, code="invalid_value")
    if isinstance(exc, EngineOverloadedError):
        return APIError(503, str(exc), code="engine_overloaded",
                        headers={"Retry-After": str(retry_after)})
    if isinstance(exc, EngineDeadError):
        return APIError(503, f"the engine is not running: {exc}", code="engine_dead")
    if isinstance(exc, EngineInternalError):
        return APIError(500, f"the engine failed on this request: {exc}", code="internal_error")
    logger.exception("unhandled error", exc_info=exc)
    return APIError(500, f"internal server error: {type(exc).__name__}", code="internal_error")


def sse_error(exc: BaseException, retry_after: int = 1) -> str:
    """An error after a stream started: a data event the openai SDK raises as APIError."""
    return f"data: {json.dumps(engine_error(exc, retry_after).body())}\n\n"


def install_error_handlers(app: FastAPI, retry_after: int = 1) -> None:
    """Answer every failure in OpenAI's shape."""

    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(list(exc.errors())).response()

    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
        return APIError(exc.status_code, str(exc.detail), code=code.get(exc.status_code),
                        headers=getattr(exc, "headers", None)).response()

    async def on_engine(request: Request, exc: Exception) -> JSONResponse:
        return engine_error(exc, retry_after).response()

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    for exc_class in (InvalidRequestError, EngineOverloadedError, EngineDeadError,
                      EngineInternalError, Exception):
        app.add_exception_handler(exc_class, on_engine)
