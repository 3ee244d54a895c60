"""Serve a tuned model with Ray Serve behind an OpenAI-compatible HTTP API.

The application is built by :func:`build_app` from typed :class:`ServeArgs`, so the same code runs
from ``ray-ft serve MODEL_DIR``, from ``serve run serve/config.yaml`` and from ``serve deploy``.

Routes (FastAPI ingress):

* ``POST /v1/completions``       raw prompt continuation (``stream: true`` for server-sent events)
* ``POST /v1/chat/completions``  the last user turn rendered with the training prompt template
* ``POST /v1/classify``          label probabilities from a classifier artifact
* ``GET  /v1/models``            the one model this deployment serves
* ``GET  /health``, ``/v1/health``  liveness (never behind the API key)

Non-streaming generation goes through ``@serve.batch``: requests that arrive together are grouped
by their sampling parameters and each group runs as one padded ``generate`` call. Streaming requests
generate one at a time, token by token. The deployment autoscales between ``min_replicas`` and
``max_replicas`` on the number of ongoing requests per replica.

Every request is validated against typed models and deploy-time limits; invalid input is answered
with a 4xx and an OpenAI-shaped error body, never a 5xx. The model directory is fixed when the app
is built: nothing in a request names a file.
"""

import argparse
import asyncio
import copy
import functools
import hmac
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from ray_ft.config import ConfigError, format_validation_error

if TYPE_CHECKING:
    from ray.serve import Application
    from ray.serve.deployment import Deployment

# Ray Serve, FastAPI and torch are imported where they are used: `ray-ft` loads this module for its
# `serve` subcommand on every invocation, and replicas import them when they start.

logger = logging.getLogger("ray.serve")

APP_NAME = "ray-ft"
"""Serve application name used by ``ray-ft serve`` and ``serve/config.yaml``."""
API_KEY_ENV = "RAY_FT_API_KEY"
"""Environment variable holding the API key when ``api_key`` is not given."""
HEALTH_PATHS = ("/health", "/v1/health")
MAX_BODY_BYTES = 1 << 20
"""Largest request body accepted (1 MiB); larger bodies are refused before parsing."""


# --------------------------------------------------------------------------------------------
# Deploy-time arguments
# --------------------------------------------------------------------------------------------


class RequestLimits(BaseModel):
    """Bounds every request is checked against (answered with 400 when exceeded)."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(256, ge=1)
    """Largest ``max_tokens`` a request may ask for."""
    default_max_tokens: int | None = Field(None, ge=1)
    """``max_tokens`` used when a request does not set it; default: 64 or ``max_tokens`` if lower."""
    max_prompt_chars: int = Field(8000, ge=1)
    """Longest prompt (or the sum of all chat message contents, or one classify input), in characters."""
    max_messages: int = Field(64, ge=1)
    """Most chat messages in one request."""
    max_inputs: int = Field(16, ge=1)
    """Most prompts in one completions request / texts in one classify request."""
    max_stop: int = Field(4, ge=0)
    """Most stop strings per request."""

    @model_validator(mode="after")
    def _default_within_bound(self) -> "RequestLimits":
        if self.default_max_tokens is not None and self.default_max_tokens > self.max_tokens:
            raise ValueError("default_max_tokens must be <= max_tokens")
        return self

    def default_tokens(self) -> int:
        return self.default_max_tokens or min(64, self.max_tokens)


class ServeArgs(BaseModel):
    """Arguments of :func:`build_app` (the ``args:`` section of a Serve config file)."""

    model_config = ConfigDict(extra="forbid")

    model_dir: str
    """A ray-ft artifact (``OUTPUT_DIR/merged``, ``OUTPUT_DIR/export``) or a Hugging Face model directory."""
    model_name: str | None = None
    """Model id reported by ``/v1/models`` and expected in requests; default: the directory name."""
    api_key: SecretStr | None = None
    """Require ``Authorization: Bearer <key>`` on every route but health; default: ``$RAY_FT_API_KEY``."""
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(4.0, gt=0)
    """Ongoing requests per replica the autoscaler aims for."""
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)
    look_back_period_s: float = Field(30.0, gt=0)
    """Window over which the autoscaler averages the ongoing-request metric."""
    max_ongoing_requests: int = Field(32, ge=1)
    """Requests one replica accepts at once (the rest wait in the proxy)."""
    max_batch_size: int = Field(8, ge=1)
    """Most non-streaming generation requests run together in one ``generate`` call."""
    batch_wait_timeout_s: float = Field(0.02, ge=0)
    """How long a partial batch waits for more requests."""
    num_cpus: float = Field(0.5, gt=0)
    """Logical CPUs reserved per replica."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs per replica (0 on CPU machines)."""
    limits: RequestLimits = RequestLimits()
    trust_remote_code: bool = False

    @field_validator("api_key")
    @classmethod
    def _non_empty_key(cls, v: SecretStr | None) -> SecretStr | None:
        return v if v is not None and v.get_secret_value() else None

    @model_validator(mode="after")
    def _consistent(self) -> "ServeArgs":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                f"({self.max_batch_size}), or batches can never fill"
            )
        return self

    def served_model_id(self) -> str:
        return self.model_name or Path(self.model_dir).name


def parse_serve_args(args: dict[str, Any] | ServeArgs, source: str = "serve args") -> ServeArgs:
    """Validate builder arguments; errors name each bad field (``ConfigError``)."""
    if isinstance(args, ServeArgs):
        return args
    try:
        return ServeArgs.model_validate(args)
    except ValidationError as err:
        raise ConfigError(format_validation_error(source, err)) from None


# --------------------------------------------------------------------------------------------
# Request models (OpenAI field names)
# --------------------------------------------------------------------------------------------


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


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False


class ApiRequest(BaseModel):
    """Fields shared by the generation requests; unknown fields and loose types are refused."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    """0 (the default) is greedy decoding, so answers match ``ray-ft generate``."""
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    user: str | None = Field(None, max_length=256)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("n")
    @classmethod
    def _single_choice(cls, v: int | None) -> int | None:
        if v is not None and v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float | None) -> float | None:
        if v:
            raise ValueError("penalties are not supported (use 0 or leave unset)")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v:
            raise ValueError("logit_bias is not supported")
        return v

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(ApiRequest):
    """``POST /v1/completions``."""

    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: int | None) -> int | None:
        if v:
            raise ValueError("logprobs are not supported")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix is not supported")
        return v

    @field_validator("best_of")
    @classmethod
    def _single_best_of(cls, v: int | None) -> int | None:
        if v is not None and v != 1:
            raise ValueError("only best_of=1 is supported")
        return v

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class TextContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextContentPart]
    name: str | None = Field(None, max_length=64)

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(ApiRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: bool | None) -> bool | None:
        if v:
            raise ValueError("logprobs are not supported")
        return v

    @field_validator("top_logprobs")
    @classmethod
    def _no_top_logprobs(cls, v: int | None) -> int | None:
        if v:
            raise ValueError("top_logprobs are not supported")
        return v


class ClassifyRequest(BaseModel):
    """``POST /v1/classify``: one text or a list of texts."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    input: str | list[str]

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


@dataclass(frozen=True)
class SamplingParams:
    """What a generate call needs besides the prompt; requests with equal params share a batch."""

    max_new_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]


@dataclass(frozen=True)
class GenerationJob:
    prompt: str
    params: SamplingParams


def check_text(text: str, param: str, limit: int) -> None:
    """Refuse empty (whitespace-only) or over-long text with a 400 naming ``param``."""
    if not text.strip():
        raise ApiError(400, f"{param} must not be empty", param=param)
    if len(text) > limit:
        raise ApiError(400, f"{param} is {len(text)} characters long; the limit is {limit}", param=param)


def sampling_params(
    req: ApiRequest,
    limits: RequestLimits,
    max_tokens: int | None,
    extra_stop: list[str],
    max_tokens_param: str = "max_tokens",
) -> SamplingParams:
    """Resolve defaults and check the request against the deploy-time limits."""
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise ApiError(
            400, f"{max_tokens_param} is {max_tokens}; the limit is {limits.max_tokens}", param=max_tokens_param
        )
    stops = req.stop_strings()
    if len(stops) > limits.max_stop:
        raise ApiError(400, f"at most {limits.max_stop} stop strings are allowed", param="stop")
    for i, s in enumerate(stops):
        if not s or len(s) > 64:
            raise ApiError(400, "each stop string must be 1 to 64 characters long", param=f"stop[{i}]")
    return SamplingParams(
        max_new_tokens=max_tokens or limits.default_tokens(),
        temperature=req.temperature or 0.0,
        top_p=req.top_p if req.top_p is not None else 1.0,
        stop=tuple(dict.fromkeys([*extra_stop, *stops])),
    )


# --------------------------------------------------------------------------------------------
# Streaming helpers
# --------------------------------------------------------------------------------------------


class StopTextFilter:
    """Turn streamed text pieces into deltas that add up to what ``Generator.complete`` returns.

    The answer is the decoded text up to the earliest stop string, stripped of surrounding whitespace
    (``Generator.complete`` cuts the same way, unless two stop strings overlap in the text). A stream must
    never send text it would later take back, so this filter holds back any tail that could still grow
    into a stop string, and trailing whitespace.
    """

    def __init__(self, stops: tuple[str, ...] | list[str]):
        self.stops = [s for s in stops if s]
        self.raw = ""
        self.sent = 0
        self.stopped = False

    def _held_back(self) -> int:
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(self.raw)), longest, -1):
                if self.raw.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def _delta(self, visible: str) -> str:
        delta = visible[self.sent :]
        self.sent = len(visible)
        return delta

    def push(self, piece: str) -> str:
        """Add decoded text; return the part that is now safe to send (may be empty)."""
        if self.stopped:
            return ""
        self.raw += piece
        cuts = [self.raw.find(s) for s in self.stops if s in self.raw]
        if cuts:
            self.stopped = True
            return self._delta(self.raw[: min(cuts)].strip())
        return self._delta(self.raw[: len(self.raw) - self._held_back()].strip())

    def finish(self) -> str:
        """The rest of the text once generation has ended."""
        if self.stopped:
            return ""
        return self._delta(self.raw.strip())


def _text_streamer_class():
    from transformers import TextStreamer

    class QueueTextStreamer(TextStreamer):
        """Hands decoded text from the generating thread to the event loop through an asyncio queue."""

        def __init__(self, tokenizer, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.loop = loop
            self.queue = queue
            self.generated_tokens = 0
            self.last_token: int | None = None

        def put(self, value) -> None:
            if not (self.skip_prompt and self.next_tokens_are_prompt):
                flat = value.reshape(-1)
                self.generated_tokens += int(flat.numel())
                self.last_token = int(flat[-1])
            super().put(value)

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, ("text", text))

    return QueueTextStreamer


def _cancel_criteria(cancel: threading.Event):
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class CancelCriteria(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([CancelCriteria()])


@dataclass
class StreamPiece:
    text: str
    finish_reason: str | None = None
    usage: dict[str, int] | None = None


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def usage_of(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


# --------------------------------------------------------------------------------------------
# HTTP app: error bodies, API key, content type and body size
# --------------------------------------------------------------------------------------------


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


async def _validation_error(request, exc):
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
    if first["type"] == "model_attributes_type" and param is None:
        return ApiError(400, "The request body must be a JSON object").response()
    message = str(first["msg"]).removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown or unsupported parameter"
    elif first["type"] == "missing":
        message = "this field is required"
    return ApiError(400, f"{param}: {message}" if param else message, param=param).response()


async def _api_error(request, exc: ApiError):
    return exc.response()


async def _http_error(request, exc):
    """Starlette's ``HTTPException`` (unknown route, wrong method) in the OpenAI shape."""
    codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
    message = str(exc.detail)
    if exc.status_code in (404, 405):
        message = f"{message}: {request.method} {request.url.path}"
    return ApiError(exc.status_code, message, code=codes.get(exc.status_code)).response()


async def _server_fault(request, exc: Exception):
    logger.exception("ray-ft: unhandled error on %s", request.url.path)
    return ApiError(500, "The server had an error while processing the request", error_type="server_error").response()


class RequestGate:
    """ASGI middleware run before routing: the API key, then on POST the JSON content type and body size.

    It runs ahead of body parsing, so an unauthenticated caller learns nothing about the request, and a
    body over ``MAX_BODY_BYTES`` is refused without being held in memory.
    """

    def __init__(self, app, api_key: str | None):
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, root = scope.get("path", ""), scope.get("root_path", "")
        route_path = path[len(root) :] if root and path.startswith(root) else path
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        needs_key = self.api_key is not None and route_path.rstrip("/") not in HEALTH_PATHS
        if needs_key and not _authorized(headers.get("authorization", ""), self.api_key):
            error = ApiError(
                401,
                "Missing or invalid API key: send the header 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )
            await error.response()(scope, receive, send)
            return
        if scope["method"] == "POST":
            content_type = headers.get("content-type", "").split(";")[0].strip().lower()
            if content_type != "application/json" and not content_type.endswith("+json"):
                error = ApiError(
                    415,
                    f"Content-Type must be application/json (got {content_type or 'none'!r})",
                    code="unsupported_media_type",
                )
                await error.response()(scope, receive, send)
                return
            declared = headers.get("content-length", "")
            body = None if declared.isdigit() and int(declared) > MAX_BODY_BYTES else await _read_body(receive)
            if body is None:
                error = ApiError(
                    413, f"The request body is larger than {MAX_BODY_BYTES} bytes", code="request_too_large"
                )
                await error.response()(scope, receive, send)
                return
            receive = _replay_body(body, receive)
        await self.app(scope, receive, send)


async def _read_body(receive) -> bytes | None:
    """The whole request body, or None once it grows past ``MAX_BODY_BYTES``."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
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


def _sse_response(chunks: AsyncIterator[str]):
    from fastapi.responses import StreamingResponse

    async def guarded() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield chunk
        except Exception:
            logger.exception("ray-ft: stream failed")
            error = ApiError(500, "The server had an error while generating", error_type="server_error")
            yield sse(error.body())
            yield sse("[DONE]")

    return StreamingResponse(guarded(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _context_length(model) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _load_classifier(model_dir: Path, meta: dict[str, Any]):
    """The method's classifier (``.predict(texts) -> [{"label", "probabilities"}]``), or None."""
    from ray_ft.methods import get_method

    try:
        method = get_method(meta.get("method", ""))
    except ValueError:
        return None
    loader = getattr(method, "load_classifier", None)
    return loader(model_dir, meta) if loader is not None else None


# --------------------------------------------------------------------------------------------
# The deployment
# --------------------------------------------------------------------------------------------


class ModelServer:
    """One replica: the model, a single model thread, and the OpenAI-compatible routes.

    Serve builds the FastAPI app on the replica, after ``__init__``, with ``__serve_build_asgi_app__``
    (:func:`build_api`); :func:`model_server_deployment` wraps the class with ``@serve.ingress`` and
    ``@serve.deployment``.
    """

    def __init__(self, args: ServeArgs):
        from ray_ft.export import read_metadata

        self.args = args
        self.limits = args.limits
        self.api_key = args.api_key.get_secret_value() if args.api_key else None
        self.model_id = args.served_model_id()
        self.meta = read_metadata(args.model_dir)
        self.task = self.meta.get("task", "generation")
        self.created = int(time.time())
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ray-ft-model")
        self.generator = None
        self.classifier = None
        if self.task == "classification":
            self.classifier = _load_classifier(Path(args.model_dir), self.meta)
        else:
            from ray_ft.inference import Generator

            self.generator = Generator.load(args.model_dir, trust_remote_code=args.trust_remote_code)
            self.generator.prompts([[{"role": "user", "content": "ping"}]])  # the prompt format renders, or fail now
            # A private copy for counting prompt tokens on the event loop; the model thread owns the other.
            self.count_tokenizer = copy.deepcopy(self.generator.tokenizer)
            self.context_length = _context_length(self.generator.model)
        from ray import serve

        self.generate_batch = serve.batch(
            max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_timeout_s
        )(self._generate_batch)
        logger.info("ray-ft: serving %s (%s) from %s", self.model_id, self.task, args.model_dir)

    def __serve_build_asgi_app__(self):
        return build_api(self)

    # ---- routes (registered by build_api) -------------------------------------------------

    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.model_id, "task": self.task}

    async def models(self) -> dict[str, Any]:
        card = {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "ray-ft"}
        return {"object": "list", "data": [card]}

    async def completions(self, body: CompletionRequest):
        self._check_model(body.model)
        generator = self._require_generator()
        prompts = body.prompts()
        if not prompts:
            raise ApiError(400, "prompt must not be an empty list", param="prompt")
        if len(prompts) > self.limits.max_inputs:
            raise ApiError(400, f"at most {self.limits.max_inputs} prompts per request", param="prompt")
        if body.stream and len(prompts) > 1:
            raise ApiError(400, "stream supports a single prompt", param="prompt")
        for i, prompt in enumerate(prompts):
            check_text(
                prompt, "prompt" if isinstance(body.prompt, str) else f"prompt[{i}]", self.limits.max_prompt_chars
            )
        params = sampling_params(body, self.limits, body.max_tokens, [])
        prompt_tokens = [self._check_context(p, params) for p in prompts]
        request_id = f"cmpl-{uuid.uuid4().hex[:24]}"
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            pieces = self._stream_text(generator, prompts[0], params, prompt_tokens[0])
            return _sse_response(self._completion_chunks(request_id, pieces, include_usage))
        results = await asyncio.gather(*(self.generate_batch(GenerationJob(p, params)) for p in prompts))
        choices = [
            {"text": r["text"], "index": i, "logprobs": None, "finish_reason": r["finish_reason"]}
            for i, r in enumerate(results)
        ]
        return {
            "id": request_id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_id,
            "choices": choices,
            "usage": usage_of(sum(r["prompt_tokens"] for r in results), sum(r["completion_tokens"] for r in results)),
        }

    async def chat_completions(self, body: ChatCompletionRequest):
        self._check_model(body.model)
        generator = self._require_generator()
        if len(body.messages) > self.limits.max_messages:
            raise ApiError(400, f"at most {self.limits.max_messages} messages per request", param="messages")
        total_chars = sum(len(m.text()) for m in body.messages)
        if total_chars > self.limits.max_prompt_chars:
            raise ApiError(
                400,
                f"the messages hold {total_chars} characters; the limit is {self.limits.max_prompt_chars}",
                param="messages",
            )
        user_turns = [i for i, m in enumerate(body.messages) if m.role == "user"]
        if not user_turns:
            raise ApiError(400, "messages must contain a user message", param="messages")
        last_user = user_turns[-1]
        check_text(body.messages[last_user].text(), f"messages[{last_user}].content", self.limits.max_prompt_chars)
        conversation = [{"role": m.role, "content": m.text()} for m in body.messages]
        # The training template: the last user turn as the question (or the whole chat with a chat template).
        from jinja2 import TemplateError

        try:
            prompt = generator.prompts([conversation])[0]
        except TemplateError as e:  # a chat template refusing the conversation (roles, order)
            raise ApiError(400, f"the model's chat template rejects these messages: {e}", param="messages") from None
        template_stop = generator.stop_text()
        if body.max_completion_tokens is not None:
            max_tokens, max_tokens_param = body.max_completion_tokens, "max_completion_tokens"
        else:
            max_tokens, max_tokens_param = body.max_tokens, "max_tokens"
        params = sampling_params(
            body, self.limits, max_tokens, [template_stop] if template_stop else [], max_tokens_param
        )
        prompt_tokens = self._check_context(prompt, params)
        request_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            pieces = self._stream_text(generator, prompt, params, prompt_tokens)
            return _sse_response(self._chat_chunks(request_id, pieces, include_usage))
        result = await self.generate_batch(GenerationJob(prompt, params))
        return {
            "id": request_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_id,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result["text"]},
                    "logprobs": None,
                    "finish_reason": result["finish_reason"],
                }
            ],
            "usage": usage_of(result["prompt_tokens"], result["completion_tokens"]),
        }

    async def classify(self, body: ClassifyRequest):
        self._check_model(body.model)
        if self.classifier is None:
            reason = "it generates text" if self.task != "classification" else "its method has no classifier loader"
            raise ApiError(400, f"model {self.model_id!r} is not a classifier ({reason})", code="not_a_classifier")
        texts = body.texts()
        if not texts:
            raise ApiError(400, "input must not be an empty list", param="input")
        if len(texts) > self.limits.max_inputs:
            raise ApiError(400, f"at most {self.limits.max_inputs} inputs per request", param="input")
        for i, text in enumerate(texts):
            check_text(text, "input" if isinstance(body.input, str) else f"input[{i}]", self.limits.max_prompt_chars)
        loop = asyncio.get_running_loop()
        predictions = await loop.run_in_executor(self.model_thread, self.classifier.predict, texts)
        data = [
            {"index": i, "label": p["label"], "probabilities": p.get("probabilities", {})}
            for i, p in enumerate(predictions)
        ]
        return {"object": "list", "model": self.model_id, "data": data}

    # ---- generation -----------------------------------------------------------------------

    async def _generate_batch(self, jobs: list[GenerationJob]) -> list[dict[str, Any]]:
        """Run the requests that arrived together (``self.generate_batch`` is this under ``serve.batch``).

        One ``generate`` call per distinct :class:`SamplingParams`, on the model thread.
        """
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.model_thread, self._run_jobs, jobs)

    def _run_jobs(self, jobs: list[GenerationJob]) -> list[dict[str, Any]]:
        groups: dict[SamplingParams, list[int]] = {}
        for index, job in enumerate(jobs):
            groups.setdefault(job.params, []).append(index)
        results: list[dict[str, Any]] = [{} for _ in jobs]
        for params, indices in groups.items():
            outputs = self.generator.complete(
                [jobs[i].prompt for i in indices],
                max_new_tokens=params.max_new_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                batch_size=len(indices),
                stop=list(params.stop) or None,
            )
            for index, output in zip(indices, outputs, strict=True):
                results[index] = output
        return results

    def _generate_streaming(self, prompt: str, params: SamplingParams, streamer, cancel: threading.Event) -> None:
        """Model-thread half of a streaming request (mirrors ``Generator.complete`` for one prompt)."""
        generator = self.generator
        tok = generator.tokenizer
        try:
            enc = tok([prompt], return_tensors="pt", add_special_tokens=not generator.fmt.use_chat_template)
            device = next(generator.model.parameters()).device
            enc = {k: v.to(device) for k, v in enc.items()}
            if params.temperature > 0:
                sampling = {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p}
            else:
                sampling = {"do_sample": False}
            import torch

            with torch.inference_mode():
                generator.model.generate(
                    **enc,
                    max_new_tokens=params.max_new_tokens,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id,
                    streamer=streamer,
                    stopping_criteria=_cancel_criteria(cancel),
                    **sampling,
                )
        except Exception as exc:  # reported to the client as a server error event
            logger.exception("ray-ft: streaming generation failed")
            streamer.loop.call_soon_threadsafe(streamer.queue.put_nowait, ("error", exc))
        finally:
            streamer.loop.call_soon_threadsafe(streamer.queue.put_nowait, ("done", None))

    async def _stream_text(
        self, generator, prompt: str, params: SamplingParams, prompt_tokens: int
    ) -> AsyncIterator[StreamPiece]:
        """Text deltas as they are generated, then one piece with the finish reason and usage."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        streamer = _text_streamer_class()(generator.tokenizer, loop, queue)
        stop_filter = StopTextFilter(params.stop)
        loop.run_in_executor(self.model_thread, self._generate_streaming, prompt, params, streamer, cancel)
        try:
            while True:
                kind, value = await queue.get()
                if kind == "error":
                    raise RuntimeError("generation failed") from value
                if kind == "done":
                    break
                delta = stop_filter.push(value)
                if delta:
                    yield StreamPiece(delta)
                if stop_filter.stopped:
                    cancel.set()
                    break
            tail = stop_filter.finish()
            if tail:
                yield StreamPiece(tail)
            eos = streamer.last_token is not None and streamer.last_token == generator.tokenizer.eos_token_id
            finished = stop_filter.stopped or eos or streamer.generated_tokens < params.max_new_tokens
            completion_tokens = streamer.generated_tokens - (1 if eos else 0)
            yield StreamPiece("", "stop" if finished else "length", usage_of(prompt_tokens, completion_tokens))
        finally:
            cancel.set()  # the client went away or we are done: stop generating

    async def _chat_chunks(self, request_id: str, pieces: AsyncIterator[StreamPiece], include_usage: bool):
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
            return {
                "id": request_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model_id,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
            }

        yield sse(chunk({"role": "assistant", "content": ""}, None))
        async for piece in pieces:
            if piece.finish_reason is None:
                yield sse(chunk({"content": piece.text}, None))
                continue
            yield sse(chunk({}, piece.finish_reason))
            if include_usage:
                usage_chunk = {**chunk({}, None), "choices": [], "usage": piece.usage}
                yield sse(usage_chunk)
        yield sse("[DONE]")

    async def _completion_chunks(self, request_id: str, pieces: AsyncIterator[StreamPiece], include_usage: bool):
        created = int(time.time())

        def chunk(text: str, finish_reason: str | None) -> dict[str, Any]:
            return {
                "id": request_id,
                "object": "text_completion",
                "created": created,
                "model": self.model_id,
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}],
            }

        async for piece in pieces:
            yield sse(chunk(piece.text, piece.finish_reason))
            if piece.finish_reason is not None and include_usage:
                yield sse({**chunk("", None), "choices": [], "usage": piece.usage})
        yield sse("[DONE]")

    # ---- checks ---------------------------------------------------------------------------

    def _check_model(self, requested: str | None) -> None:
        if requested is not None and requested != self.model_id:
            raise ApiError(
                404,
                f"The model {requested!r} does not exist; this server serves {self.model_id!r}",
                param="model",
                code="model_not_found",
            )

    def _require_generator(self):
        if self.generator is None:
            raise ApiError(400, f"model {self.model_id!r} is a classifier: use POST /v1/classify", param="model")
        return self.generator

    def _check_context(self, prompt: str, params: SamplingParams) -> int:
        """Prompt tokens; 400 when prompt + completion would not fit the model's context window."""
        use_chat_template = self.generator.fmt.use_chat_template
        n_prompt = len(self.count_tokenizer(prompt, add_special_tokens=not use_chat_template)["input_ids"])
        if self.context_length and n_prompt + params.max_new_tokens > self.context_length:
            raise ApiError(
                400,
                f"This model's maximum context length is {self.context_length} tokens; the request needs "
                f"{n_prompt + params.max_new_tokens} ({n_prompt} in the prompt, {params.max_new_tokens} to generate)",
                param="messages" if use_chat_template else "prompt",
                code="context_length_exceeded",
            )
        return n_prompt


def build_api(server: ModelServer):
    """The FastAPI app of one replica: routes bound to ``server``, OpenAI-shaped errors, the request gate."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    api = FastAPI(title="ray-ft", description="OpenAI-compatible API for a model tuned with ray-ft")
    api.add_exception_handler(RequestValidationError, _validation_error)
    api.add_exception_handler(ApiError, _api_error)
    api.add_exception_handler(StarletteHTTPException, _http_error)
    api.add_exception_handler(Exception, _server_fault)
    api.add_middleware(RequestGate, api_key=server.api_key)

    @api.get("/health")
    @api.get("/v1/health")
    async def health() -> dict[str, Any]:
        return await server.health()

    @api.get("/v1/models")
    async def models() -> dict[str, Any]:
        return await server.models()

    @api.post("/v1/completions")
    async def completions(body: CompletionRequest):
        return await server.completions(body)

    @api.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        return await server.chat_completions(body)

    @api.post("/v1/classify")
    async def classify(body: ClassifyRequest):
        return await server.classify(body)

    return api


@functools.cache
def model_server_deployment() -> "Deployment":
    """``ModelServer`` behind its FastAPI ingress, as a Serve deployment (built once per process)."""
    from ray import serve

    ingress = serve.ingress()(ModelServer)  # the app comes from ModelServer.__serve_build_asgi_app__
    return serve.deployment(ingress, name="ModelServer", max_constructor_retry_count=3, graceful_shutdown_timeout_s=10)


# --------------------------------------------------------------------------------------------
# Application builder
# --------------------------------------------------------------------------------------------


def build_app(args: dict[str, Any] | ServeArgs) -> "Application":
    """Build the Serve application (``import_path: ray_ft.serving:build_app`` in a Serve config).

    Args:
        args: :class:`ServeArgs` or a mapping of its fields (the config file's ``args:``).

    Returns:
        The bound ``ModelServer`` deployment with autoscaling and per-replica resources set.

    Raises:
        ConfigError: an argument is missing or out of range (each message names the field).
        ArtifactError: ``model_dir`` is not a servable model directory.
    """
    from ray_ft.export import read_metadata

    settings = parse_serve_args(args)
    model_dir = Path(settings.model_dir).expanduser().resolve()
    read_metadata(model_dir)  # fail here, not in every replica, when the directory is not a model
    api_key = settings.api_key or (SecretStr(os.environ[API_KEY_ENV]) if os.environ.get(API_KEY_ENV) else None)
    settings = settings.model_copy(update={"model_dir": str(model_dir), "api_key": api_key})
    autoscaling = {
        "min_replicas": settings.min_replicas,
        "max_replicas": settings.max_replicas,
        "initial_replicas": max(settings.min_replicas, 1),
        "target_ongoing_requests": settings.target_ongoing_requests,
        "upscale_delay_s": settings.upscale_delay_s,
        "downscale_delay_s": settings.downscale_delay_s,
        "look_back_period_s": settings.look_back_period_s,
    }
    actor_options: dict[str, Any] = {"num_cpus": settings.num_cpus}
    if settings.num_gpus:
        actor_options["num_gpus"] = settings.num_gpus
    deployment = model_server_deployment().options(
        autoscaling_config=autoscaling,
        max_ongoing_requests=settings.max_ongoing_requests,
        ray_actor_options=actor_options,
    )
    return deployment.bind(settings)


# --------------------------------------------------------------------------------------------
# `ray-ft serve`
# --------------------------------------------------------------------------------------------


def parse_replicas(text: str) -> tuple[int, int]:
    """``"1:2"`` -> ``(1, 2)``; ``"2"`` -> ``(2, 2)``."""
    low, sep, high = text.partition(":")
    try:
        bounds = (int(low), int(high)) if sep else (int(low), int(low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX or N, got {text!r}") from None
    if bounds[0] < 0 or bounds[1] < 1 or bounds[0] > bounds[1]:
        raise argparse.ArgumentTypeError(f"need 0 <= MIN <= MAX and MAX >= 1, got {text!r}")
    return bounds


def check_port_free(host: str, port: int) -> None:
    """Raise ``ValueError`` naming ``--port`` when ``host:port`` cannot be listened on."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            raise ValueError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror})") from None


def cmd_serve(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    min_replicas, max_replicas = args.replicas
    fields: dict[str, Any] = {
        "model_dir": args.model_dir,
        "model_name": args.model_name,
        "api_key": args.api_key,
        "min_replicas": min_replicas,
        "max_replicas": max_replicas,
        "max_batch_size": args.max_batch_size,
        "max_ongoing_requests": max(32, args.max_batch_size),
        "num_cpus": args.num_cpus,
    }
    app = build_app(parse_serve_args(fields, source="ray-ft serve"))
    check_port_free(args.host, args.port)

    address = os.environ.get("RAY_ADDRESS")
    own_cluster = not address
    print(f"[ray-ft] starting Ray ({'connecting to ' + address if address else 'local'})", flush=True)
    if own_cluster:
        need = max_replicas * args.num_cpus
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(need + 0.999)), log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)

    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    started = time.time()
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        print(f"[ray-ft] deploying {args.model_dir} ({min_replicas}..{max_replicas} replicas)", flush=True)
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        model_id = parse_serve_args(fields).served_model_id()
        print(f"[ray-ft] serving model {model_id!r} at http://{args.host}:{args.port}/v1", flush=True)
        print(f"[ray-ft] health: http://{args.host}:{args.port}/health   (Ctrl-C or SIGTERM to stop)", flush=True)
        while not stop.wait(0.5):
            pass
        print("[ray-ft] stopping", flush=True)
    finally:
        if own_cluster:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
        ray.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"[ray-ft] stopped after {time.time() - started:.0f}s", flush=True)
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``ray-ft serve``."""
    p = subparsers.add_parser(
        "serve",
        help="serve a tuned model over an OpenAI-compatible HTTP API (Ray Serve)",
        description="Serve MODEL_DIR until SIGINT/SIGTERM. The API key defaults to $RAY_FT_API_KEY.",
    )
    p.add_argument("model_dir", help="a ray-ft artifact (OUTPUT_DIR/merged, OUTPUT_DIR/export) or HF model dir")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $RAY_FT_API_KEY)")
    p.add_argument("--model-name", default=None, help="model id in the API (default: the directory name)")
    p.add_argument(
        "--replicas", type=parse_replicas, default=(1, 2), metavar="MIN:MAX", help="autoscaling bounds (default 1:2)"
    )
    p.add_argument("--max-batch-size", type=int, default=8, help="requests batched into one generate call")
    p.add_argument("--num-cpus", type=float, default=0.5, help="logical CPUs per replica")
    p.set_defaults(func=cmd_serve)
