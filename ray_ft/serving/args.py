"""Typed arguments of the serving application (the ``args:`` of a Serve config file, or ``ray-ft serve``)."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from ray_ft.config import ConfigError, format_validation_error

API_KEY_ENV = "RAY_FT_API_KEY"
"""Environment variable holding the API key when ``api_key`` is not given."""


class RequestLimits(BaseModel):
    """Bounds every request is checked against (answered with 400 when exceeded)."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(256, ge=1, le=1_000_000)
    """Largest ``max_tokens`` / ``max_completion_tokens`` a request may ask for."""
    default_max_tokens: int | None = Field(None, ge=1)
    """Tokens generated when a request does not say; default: 64 or ``max_tokens`` if lower."""
    max_prompt_chars: int = Field(8000, ge=1)
    """Longest prompt (or the sum of all chat message contents, or one classify input), in characters."""
    max_messages: int = Field(64, ge=1)
    """Most chat messages in one request."""
    max_inputs: int = Field(16, ge=1)
    """Most prompts in one completions request / texts in one classify request."""
    max_stop: int = Field(4, ge=0)
    """Most stop strings per request."""
    max_n: int = Field(4, ge=1)
    """Most choices (``n``, ``best_of``) per request."""
    max_logprobs: int = Field(5, ge=0)
    """Most log-probabilities per token (``logprobs``, ``top_logprobs``, ``prompt_logprobs``)."""
    max_body_bytes: int = Field(1 << 20, ge=1024)
    """Largest request body; larger bodies are refused (413) before they are parsed."""

    @model_validator(mode="after")
    def _default_within_bound(self) -> RequestLimits:
        if self.default_max_tokens is not None and self.default_max_tokens > self.max_tokens:
            raise ValueError("default_max_tokens must be <= max_tokens")
        return self

    def default_tokens(self) -> int:
        return self.default_max_tokens or min(64, self.max_tokens)


class EngineArgs(BaseModel):
    """vLLM engine settings (one engine per replica)."""

    model_config = ConfigDict(extra="forbid")

    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """``auto``: bf16 where the device supports it (GPUs and recent CPUs), else fp32."""
    max_model_len: int | None = Field(None, ge=16)
    """Context window; default: the model's own (capped at 4096 on CPU)."""
    kv_cache_gib: float | None = Field(None, gt=0, le=4096)
    """KV-cache size. Default: 1 GiB on CPU; on GPU vLLM's own share of device memory."""
    max_num_seqs: int = Field(64, ge=1, le=4096)
    """Most sequences decoded together (continuous batching)."""
    max_loras: int = Field(4, ge=1, le=256)
    """Most LoRA adapters active in one batch."""
    enforce_eager: bool | None = None
    """Skip graph capture/compilation; default: on for CPU (start-up dominates there), off on GPU."""
    extra: dict[str, Any] = Field(default_factory=dict)
    """Further ``vllm.AsyncEngineArgs`` fields, passed through unchanged (checked by vLLM when the replica starts)."""


class ServeArgs(BaseModel):
    """Arguments of :func:`ray_ft.serving.build_app`."""

    model_config = ConfigDict(extra="forbid")

    models: list[str] = Field(min_length=1, max_length=64)
    """Training output directories, ray-ft artifacts (``merged/``, ``export/``, ``trainable/``) or Hugging Face
    model directories. LoRA and QLoRA outputs that share a base are served as adapters of one engine."""
    model_names: list[str] | None = None
    """Ids in ``/v1/models``, one per entry of ``models``; default: each directory's name."""
    base_model_name: str | None = None
    """Id of the shared base model when adapters are served; default: its directory name."""
    api_key: SecretStr | None = None
    """Require ``Authorization: Bearer <key>`` on every route but health; default: ``$RAY_FT_API_KEY``."""
    min_replicas: int = Field(1, ge=0, le=1000)
    max_replicas: int = Field(2, ge=1, le=1000)
    target_ongoing_requests: float = Field(16.0, gt=0, allow_inf_nan=False)
    """Ongoing requests per replica the autoscaler aims for."""
    upscale_delay_s: float = Field(10.0, ge=0, le=3600, allow_inf_nan=False)
    downscale_delay_s: float = Field(60.0, ge=0, le=86400, allow_inf_nan=False)
    look_back_period_s: float = Field(30.0, gt=0, le=3600, allow_inf_nan=False)
    """Window over which the autoscaler averages the ongoing-request metric."""
    max_ongoing_requests: int = Field(1000, ge=1, le=100_000)
    """Requests one replica holds at once; the engine batches them continuously and queues the rest itself.

    High, as in Ray Serve LLM: a request holds its slot from routing on, while its body is still arriving, so a
    low bound lets slow clients take every slot (80 of them at 64 slots made a normal request wait 21× longer).
    """
    max_queued_requests: int = Field(256, ge=1, le=1_000_000)
    """Requests waiting for a replica; past this the caller gets 503 at once instead of waiting."""
    request_timeout_s: float = Field(300.0, gt=0, le=86400, allow_inf_nan=False)
    """A non-streaming request still unanswered after this gets 504 and its generation is cancelled."""
    body_timeout_s: float = Field(10.0, gt=0, le=3600, allow_inf_nan=False)
    """A client must send its whole request body within this (408 otherwise)."""
    num_cpus: float = Field(1.0, gt=0, le=1024, allow_inf_nan=False)
    """Logical CPUs reserved per replica."""
    num_gpus: float = Field(0.0, ge=0, le=8, allow_inf_nan=False)
    """GPUs per replica (0 on CPU machines); vLLM then runs on the GPU Ray assigns."""
    engine: EngineArgs = EngineArgs()
    limits: RequestLimits = RequestLimits()
    trust_remote_code: bool = False

    @field_validator("api_key")
    @classmethod
    def _non_empty_key(cls, v: SecretStr | None) -> SecretStr | None:
        return v if v is not None and v.get_secret_value() else None

    @model_validator(mode="after")
    def _consistent(self) -> ServeArgs:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        if self.model_names is not None and len(self.model_names) != len(self.models):
            raise ValueError(f"model_names has {len(self.model_names)} names for {len(self.models)} models")
        return self

    def resolved_api_key(self) -> str | None:
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        return os.environ.get(API_KEY_ENV) or None


def parse_serve_args(args: dict[str, Any] | ServeArgs, source: str = "serve args") -> ServeArgs:
    """Validate builder arguments; errors name each bad field (``ConfigError``)."""
    if isinstance(args, ServeArgs):
        return args
    try:
        return ServeArgs.model_validate(args)
    except ValidationError as err:
        raise ConfigError(format_validation_error(source, err)) from None
