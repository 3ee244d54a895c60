"""Request checks shared by both engines: the fields a request may set, deploy-time limits, valid text.

The request and response models themselves are vLLM's (``vllm.entrypoints.openai``): the same schema for
every model an endpoint serves. A request may only set the fields listed here; everything else vLLM's models
know (multimodal payloads, KV-transfer parameters, prompt embeddings, ...) is refused with 400, so a public
endpoint exposes exactly the API documented in ``docs/serving.md``.
"""

from __future__ import annotations

from typing import Any

from ray_ft.serving.args import RequestLimits
from ray_ft.serving.errors import ApiError
from ray_ft.text import find_invalid_text

SAMPLING_FIELDS = frozenset(
    {
        "model",
        "frequency_penalty",
        "presence_penalty",
        "max_tokens",
        "n",
        "seed",
        "stop",
        "stream",
        "stream_options",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "repetition_penalty",
        "min_tokens",
        "user",
        "logprobs",
        "prompt_logprobs",
    }
)
COMPLETION_FIELDS = SAMPLING_FIELDS | {"prompt", "echo"}
CHAT_FIELDS = SAMPLING_FIELDS | {"messages", "max_completion_tokens", "top_logprobs"}
TEXT_ONLY_FIELDS = frozenset(
    {
        "model",
        "max_tokens",
        "max_completion_tokens",
        "n",
        "stop",
        "stream",
        "stream_options",
        "temperature",
        "top_p",
        "user",
        "seed",
        "prompt",
        "messages",
    }
)
"""What the transformers engine (prompt tuning) supports: plain sampling, no log-probabilities."""


def check_fields(body, allowed: frozenset[str], engine: str = "this endpoint") -> None:
    """400 for any field the client set that ``allowed`` does not list (unknown fields included)."""
    extra = sorted((body.model_extra or {}).keys())
    if extra:
        raise ApiError(400, f"{extra[0]}: unknown parameter", param=extra[0])
    for name in sorted(body.model_fields_set - allowed):
        if getattr(body, name, None) in (None, False, [], {}):
            continue  # an explicit default (`"logit_bias": null`) asks for nothing
        raise ApiError(400, f"{name}: not supported by {engine}", param=name)


def check_text(body) -> None:
    """400 when any string of the request is not valid Unicode (a lone surrogate cannot be tokenised)."""
    problem = find_invalid_text(body.model_dump(exclude_unset=True, mode="python"))
    if problem:
        raise ApiError(400, f"invalid text: {problem}", code="invalid_text")


def _bound(value: Any, limit: int, param: str, low: int = 1) -> None:
    if isinstance(value, int) and not isinstance(value, bool) and not low <= value <= limit:
        raise ApiError(400, f"{param} is {value}; it must be between {low} and {limit}", param=param)


def check_sampling(body, limits: RequestLimits, sent: set[str]) -> None:
    """Limits common to completions and chat; fills in ``max_tokens`` (and greedy decoding) when the request
    leaves them out. ``sent``: the fields the client's JSON holds (vLLM's models mark some defaults as set)."""
    for param in ("max_tokens", "max_completion_tokens"):
        _bound(getattr(body, param, None), limits.max_tokens, param)
    if body.temperature is None:
        body.temperature = 0.0  # greedy unless asked: answers match `ray-ft generate` and evaluation
    unset = body.max_tokens is None or "max_tokens" not in sent
    if unset and getattr(body, "max_completion_tokens", None) is None:
        body.max_tokens = limits.default_tokens()
    _bound(body.n, limits.max_n, "n")
    for param in ("top_logprobs", "prompt_logprobs"):
        _bound(getattr(body, param, None), limits.max_logprobs, param, low=0)
    if not isinstance(body.logprobs, bool):
        _bound(body.logprobs, limits.max_logprobs, "logprobs", low=0)
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > limits.max_stop:
        raise ApiError(400, f"at most {limits.max_stop} stop strings are allowed", param="stop")
    for i, s in enumerate(stops):
        if not s or len(s) > 64:
            raise ApiError(400, "each stop string must be 1 to 64 characters long", param=f"stop[{i}]")


def check_prompts(body, limits: RequestLimits) -> None:
    """Completions: how many prompts, and how long each is."""
    prompt = body.prompt
    if prompt is None:
        raise ApiError(400, "prompt: this field is required", param="prompt")
    prompts = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)
    if not prompts:
        raise ApiError(400, "prompt must not be empty", param="prompt")
    if len(prompts) > limits.max_inputs:
        raise ApiError(400, f"at most {limits.max_inputs} prompts per request", param="prompt")
    for i, p in enumerate(prompts):
        param = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        if len(p) == 0 or (isinstance(p, str) and not p.strip()):
            raise ApiError(400, f"{param} must not be empty", param=param)
        if len(p) > limits.max_prompt_chars:
            raise ApiError(400, f"{param} is {len(p)} long; the limit is {limits.max_prompt_chars}", param=param)


def message_text(message: Any) -> str:
    """The text of one chat message (string content or text parts)."""
    content = message.get("content") if isinstance(message, dict) else getattr(message, "content", None)
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(str(p.get("text", "")) if isinstance(p, dict) else str(getattr(p, "text", "")) for p in content)


def check_messages(body, limits: RequestLimits) -> None:
    """Chat: how many messages, their total length, and at least one user turn."""
    messages = body.messages
    if not messages:
        raise ApiError(400, "messages must not be empty", param="messages")
    if len(messages) > limits.max_messages:
        raise ApiError(400, f"at most {limits.max_messages} messages per request", param="messages")
    total = sum(len(message_text(m)) for m in messages)
    if total > limits.max_prompt_chars:
        message = f"the messages hold {total} characters; the limit is {limits.max_prompt_chars}"
        raise ApiError(400, message, param="messages")
    roles = [m.get("role") if isinstance(m, dict) else getattr(m, "role", None) for m in messages]
    if "user" not in roles:
        raise ApiError(400, "messages must contain a user message", param="messages")
