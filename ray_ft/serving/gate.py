"""The request gate: checks every request gets before routing, ahead of any body parsing.

In order: a single ``Authorization`` header carrying the API key (health is open), then on POST a single JSON
``Content-Type``, and a body that arrives whole within ``body_timeout_s`` and stays under ``max_body_bytes``.
An unauthenticated caller learns nothing about the request; a slow or oversized body is cut off without
holding a replica's request slot or its memory.
"""

from __future__ import annotations

import asyncio
import hmac

from ray_ft.serving.errors import ApiError

HEALTH_PATHS = ("/health", "/v1/health")
SINGLE_HEADERS = ("authorization", "content-type", "content-length", "transfer-encoding")


class RequestGate:
    """ASGI middleware (see the module docstring)."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, body_timeout_s: float):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        error, receive = await self._check(scope, receive)
        if error is not None:
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _check(self, scope, receive) -> tuple[ApiError | None, object]:
        path, root = scope.get("path", ""), scope.get("root_path", "")
        route_path = path[len(root) :] if root and path.startswith(root) else path
        headers: dict[str, list[str]] = {}
        for k, v in scope.get("headers", []):
            headers.setdefault(k.decode("latin-1").lower(), []).append(v.decode("latin-1"))
        needs_key = self.api_key is not None and route_path.rstrip("/") not in HEALTH_PATHS
        if needs_key:
            values = headers.get("authorization", [])
            if len(values) != 1 or not _authorized(values[0], self.api_key):
                message = "Missing or invalid API key: send one header 'Authorization: Bearer <key>'"
                return ApiError(401, message, code="invalid_api_key"), receive
        for name in SINGLE_HEADERS:
            if len(headers.get(name, [])) > 1:
                return ApiError(400, f"the {name} header is sent more than once", code="duplicate_header"), receive
        if scope["method"] != "POST":
            return None, receive
        content_type = headers.get("content-type", [""])[0].split(";")[0].strip().lower()
        if content_type != "application/json" and not content_type.endswith("+json"):
            message = f"Content-Type must be application/json (got {content_type or 'none'!r})"
            return ApiError(415, message, code="unsupported_media_type"), receive
        declared = headers.get("content-length", [""])[0]
        too_large = ApiError(
            413, f"The request body is larger than {self.max_body_bytes} bytes", code="request_too_large"
        )
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return too_large, receive
        try:
            async with asyncio.timeout(self.body_timeout_s):
                body = await self._read_body(receive)
        except TimeoutError:
            message = f"The request body did not arrive within {self.body_timeout_s:g} s"
            return ApiError(408, message, code="request_timeout"), receive
        if body is None:
            return too_large, receive
        return None, _replay_body(body, receive)

    async def _read_body(self, receive) -> bytes | None:
        """The whole request body, or None once it grows past ``max_body_bytes``."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _replay_body(body: bytes, receive):
    """An ASGI ``receive`` that hands the buffered body over once, then waits on the real one (disconnects)."""
    delivered = False

    async def replay():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _authorized(header: str, api_key: str) -> bool:
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())
