"""OpenAI-shaped error bodies, and the FastAPI handlers that answer every failure with one.

A client always gets ``{"error": {"message", "type", "param", "code"}}`` with a 4xx for what it sent wrong
and a 5xx only for a fault of the server; the body never carries a traceback.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("ray.serve")


class ApiError(Exception):
    """An error answered with an OpenAI-shaped body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        error_type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}

    def response(self):
        from fastapi.responses import JSONResponse

        return JSONResponse(self.body(), status_code=self.status)


def _param_of(loc: tuple[Any, ...]) -> str | None:
    """``("body", "messages", 0, "content", "str")`` -> ``messages[0].content`` (union tags dropped)."""
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier() and part not in ("str", "int", "float", "bool"):
            out += f".{part}" if out else part
    return out or None


async def validation_error(request, exc):
    """FastAPI's ``RequestValidationError`` (bad JSON, missing fields, wrong types) -> 400."""
    errors = exc.errors()
    # The deepest location is the most specific one (a union reports each member's error).
    first = max(errors, key=lambda e: len(e["loc"])) if errors else {"type": "invalid", "loc": (), "msg": "invalid"}
    if first["type"] == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "invalid JSON")
        return ApiError(400, f"The request body is not valid JSON: {detail}", code="invalid_json").response()
    param = _param_of(tuple(first["loc"]))
    if param is None and first["type"] == "missing":
        return ApiError(400, "The request needs a JSON object body", code="missing_body").response()
    if first["type"] in ("model_attributes_type", "dict_type") and param is None:
        return ApiError(400, "The request body must be a JSON object").response()
    message = str(first["msg"]).removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown or unsupported parameter"
    elif first["type"] == "missing":
        message = "this field is required"
    return ApiError(400, f"{param}: {message}" if param else message, param=param).response()


async def api_error(request, exc: ApiError):
    return exc.response()


async def http_error(request, exc):
    """Starlette's ``HTTPException`` (unknown route, wrong method) in the OpenAI shape."""
    codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
    message = str(exc.detail)
    if exc.status_code in (404, 405):
        message = f"{message}: {request.method} {request.url.path}"
    return ApiError(exc.status_code, message, code=codes.get(exc.status_code)).response()


async def server_fault(request, exc: Exception):
    logger.exception("ray-ft: unhandled error on %s", request.url.path)
    return ApiError(500, "The server had an error while processing the request", error_type="server_error").response()


def install_handlers(api) -> None:
    """Answer validation errors, ``ApiError``, unknown routes and faults with OpenAI-shaped bodies."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    api.add_exception_handler(RequestValidationError, validation_error)
    api.add_exception_handler(ApiError, api_error)
    api.add_exception_handler(StarletteHTTPException, http_error)
    api.add_exception_handler(Exception, server_fault)
