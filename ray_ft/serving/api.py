"""The replica: one engine (vLLM or transformers) behind the OpenAI-compatible routes.

Routes:

* ``POST /v1/completions``       raw prompt continuation (``stream: true`` for server-sent events)
* ``POST /v1/chat/completions``  a conversation rendered with the requested model's training prompt format
* ``POST /v1/classify``          label probabilities from a classifier artifact
* ``GET  /v1/models``            every model id this endpoint serves (base and adapters)
* ``GET  /health``, ``/v1/health``  liveness and requests in flight (never behind the API key)

Every request passes the :class:`~ray_ft.serving.gate.RequestGate` first, then the checks of
:mod:`ray_ft.serving.requests`; invalid input gets a 4xx with an OpenAI-shaped body, never a 5xx.
"""

import asyncio
import logging
import time
from typing import Any

from pydantic import BaseModel, ConfigDict

from ray_ft.serving import requests as checks
from ray_ft.serving.args import ServeArgs
from ray_ft.serving.catalog import ServedModel, ServingPlan
from ray_ft.serving.errors import ApiError, install_handlers
from ray_ft.serving.gate import RequestGate
from ray_ft.text import parse_json

logger = logging.getLogger("ray.serve")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorBody(BaseModel):
    """What every error response holds (the OpenAI shape)."""

    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (400, 401, 404, 408, 413, 415, 422, 500, 503, 504)
}


class ClassifyRequest(BaseModel):
    """``POST /v1/classify``: one text or a list of texts."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    input: str | list[str]


class ModelServer:
    """One replica. Serve builds its FastAPI app after ``__init__`` with ``__serve_build_asgi_app__``.

    (This module has no ``from __future__ import annotations``: FastAPI reads the route annotations of
    :func:`build_api`, whose request models are imported inside it.)
    """

    async def __init__(self, args: ServeArgs, plan: ServingPlan):
        self.args = args
        self.plan = plan
        self.limits = args.limits
        self.api_key = args.resolved_api_key()
        self.created = int(time.time())
        self.templates: dict[str, str | None] = {}
        if plan.engine == "vllm":
            from ray_ft.serving.vllm_engine import VLLMEngine

            self.engine = await VLLMEngine.start(plan, args)
            self.templates = {m.name: _chat_template(m, self.engine.tokenizer) for m in plan.models}
        else:
            from ray_ft.serving.transformers_engine import TransformersEngine

            self.engine = TransformersEngine(plan, args)
        logger.info("ray-ft: serving %s with %s", [m.name for m in plan.models], plan.engine)

    def __serve_build_asgi_app__(self):
        return build_api(self)

    async def check_health(self) -> None:
        """Serve's replica health check: a dead engine gets the replica replaced."""
        await self.engine.check_health()

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()

    # ---- routes -------------------------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "engine": self.plan.engine,
            "models": [m.name for m in self.plan.models],
            "requests_in_flight": self.engine.in_flight(),
        }

    async def models(self) -> dict[str, Any]:
        if self.plan.engine == "vllm":
            return await self.engine.models()
        card = {"id": self.plan.base.name, "object": "model", "created": self.created, "owned_by": "ray-ft"}
        return {"object": "list", "data": [card]}

    async def completions(self, body, raw_request):
        raw_request.state.validated = True
        model = await self._checked(body, raw_request, checks.COMPLETION_FIELDS, checks.check_prompts)
        if self.plan.engine != "vllm":
            return await self._deadline(self.engine.complete(body, model.name))
        return await self._vllm(self.engine.completion.create_completion(body, raw_request), body.stream)

    async def chat_completions(self, body, raw_request):
        raw_request.state.validated = True
        model = await self._checked(body, raw_request, checks.CHAT_FIELDS, checks.check_messages)
        if self.plan.engine != "vllm":
            return await self._deadline(self.engine.chat(body, model.name))
        body.chat_template = self.templates[model.name]  # the model's training format (None: its tokenizer's)
        return await self._vllm(self.engine.chat.create_chat_completion(body, raw_request), body.stream)

    async def classify(self, body: ClassifyRequest) -> dict[str, Any]:
        model = self._model(body.model)
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        if not texts:
            raise ApiError(400, "input must not be an empty list", param="input")
        if len(texts) > self.limits.max_inputs:
            raise ApiError(400, f"at most {self.limits.max_inputs} inputs per request", param="input")
        problem = checks.find_invalid_text(texts)
        if problem:
            raise ApiError(400, f"invalid text: {problem}", param="input", code="invalid_text")
        for i, text in enumerate(texts):
            param = "input" if isinstance(body.input, str) else f"input[{i}]"
            if not text.strip():
                raise ApiError(400, f"{param} must not be empty", param=param)
            if len(text) > self.limits.max_prompt_chars:
                raise ApiError(400, f"{param} is too long; the limit is {self.limits.max_prompt_chars}", param=param)
        if self.plan.engine != "transformers" or self.plan.task != "classification":
            raise ApiError(
                400, f"model {model.name!r} is not a classifier (it generates text)", code="not_a_classifier"
            )
        predictions = await self._deadline(self.engine.classify(texts))
        data = [
            {"index": i, "label": p["label"], "probabilities": p.get("probabilities", {})}
            for i, p in enumerate(predictions)
        ]
        return {"object": "list", "model": model.name, "data": data}

    # ---- helpers ------------------------------------------------------------------------------

    async def _checked(self, body, raw_request, vllm_fields: frozenset[str], check_input) -> ServedModel:
        """Every check a generation request gets before an engine sees it; the model it asks for."""
        vllm = self.plan.engine == "vllm"
        checks.check_fields(body, vllm_fields if vllm else checks.TEXT_ONLY_FIELDS, self._engine_name())
        model = self._model(body.model)
        checks.check_text(body)
        check_input(body, self.limits)
        checks.check_sampling(body, self.limits, await _sent_fields(raw_request))
        return model

    def _engine_name(self) -> str:
        return "this endpoint" if self.plan.engine == "vllm" else f"model {self.plan.base.name!r} (transformers engine)"

    def _model(self, requested: str | None) -> ServedModel:
        model = self.plan.get(requested)
        if model is None:
            served = [m.name for m in self.plan.models]
            message = f"The model {requested!r} does not exist; this endpoint serves {served}"
            raise ApiError(404, message, param="model", code="model_not_found")
        return model

    async def _deadline(self, coro):
        try:
            async with asyncio.timeout(self.args.request_timeout_s):
                return await coro
        except TimeoutError:
            message = f"The request did not finish within {self.args.request_timeout_s:g} s"
            raise ApiError(504, message, code="timeout", error_type="timeout_error") from None

    async def _vllm(self, coro, stream: bool | None):
        """vLLM's result as a response: its error (status kept), its JSON, or its event stream."""
        from fastapi.responses import JSONResponse, StreamingResponse
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse

        result = await self._deadline(coro)
        if isinstance(result, ErrorResponse):
            status = result.error.code if 400 <= int(result.error.code) < 600 else 500
            return JSONResponse(result.model_dump(), status_code=status)
        if not stream:
            return JSONResponse(result.model_dump())
        return StreamingResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _vllm_client_error(request, exc):
    """vLLM's serving layer refusing what the client asked for (it checks some values itself): 400."""
    parameter = getattr(exc, "parameter", None)
    message = str(exc.args[0]) if exc.args else "invalid request"
    return ApiError(400, message, param=parameter if isinstance(parameter, str) else None).response()


async def _sent_fields(raw_request) -> set[str]:
    """The top-level fields of the request's JSON body, parsed again strictly (:func:`ray_ft.text.parse_json`).

    FastAPI's parse takes the last of duplicated keys and accepts ``NaN``/``Infinity``; data files and configs
    refuse both, and so does a request: 400 naming the field. The body is already read (Starlette keeps it).
    """
    body, problem = parse_json((await raw_request.body()).decode("utf-8", errors="replace"))
    if problem:
        field = problem.split(":", 1)[0]
        raise ApiError(400, problem, param=None if field in ("invalid JSON", "<root>") else field)
    return set(body) if isinstance(body, dict) else set()


def _chat_template(model: ServedModel, tokenizer) -> str | None:
    """The Jinja template rendering ``model``'s chats as it was trained (None: the tokenizer's own)."""
    from ray_ft.chat import PromptFormat

    fmt = PromptFormat(**model.prompt_format) if model.prompt_format else PromptFormat()
    return fmt.chat_template(tokenizer)


def _client_error_route():
    """An ``APIRoute`` answering 400 for any exception raised while FastAPI builds the request model.

    vLLM's request models run validators that can fail on malformed input with errors other than ``ValueError``
    (a ``TypeError`` for a ``null`` system message, say); those escape pydantic's error wrapping and would be
    500s. Once a route function starts (``request.state.validated``), exceptions are the server's again.
    """
    from fastapi.exceptions import RequestValidationError
    from fastapi.routing import APIRoute
    from starlette.exceptions import HTTPException

    class ClientErrorRoute(APIRoute):
        def get_route_handler(self):
            handler = super().get_route_handler()

            async def route(request):
                try:
                    return await handler(request)
                except (ApiError, HTTPException, RequestValidationError):
                    raise
                except Exception as e:
                    if getattr(request.state, "validated", False):
                        raise
                    parameter = getattr(e, "parameter", None)
                    message = f"the request is not valid: {e}"
                    return ApiError(400, message, param=parameter if isinstance(parameter, str) else None).response()

            return route

    return ClientErrorRoute


def build_api(server: ModelServer):
    """The FastAPI app of one replica: routes bound to ``server``, OpenAI-shaped errors, the request gate."""
    from fastapi import FastAPI, Request
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.exceptions import VLLMClientError

    api = FastAPI(title="ray-ft", description="OpenAI-compatible API for models tuned with ray-ft", version="1")
    install_handlers(api)
    api.add_exception_handler(VLLMClientError, _vllm_client_error)
    api.router.route_class = _client_error_route()
    api.add_middleware(
        RequestGate,
        api_key=server.api_key,
        max_body_bytes=server.limits.max_body_bytes,
        body_timeout_s=server.args.body_timeout_s,
    )

    @api.get("/health")
    @api.get("/v1/health")
    async def health() -> dict[str, Any]:
        return await server.health()

    @api.get("/v1/models", responses=ERROR_RESPONSES)
    async def models() -> dict[str, Any]:
        return await server.models()

    @api.post(
        "/v1/completions",
        responses={200: {"content": {"text/event-stream": {}}}, **ERROR_RESPONSES},
    )
    async def completions(body: CompletionRequest, raw_request: Request):
        return await server.completions(body, raw_request)

    @api.post(
        "/v1/chat/completions",
        responses={200: {"content": {"text/event-stream": {}}}, **ERROR_RESPONSES},
    )
    async def chat_completions(body: ChatCompletionRequest, raw_request: Request):
        return await server.chat_completions(body, raw_request)

    @api.post("/v1/classify", responses=ERROR_RESPONSES)
    async def classify(body: ClassifyRequest) -> dict[str, Any]:
        return await server.classify(body)

    return api
