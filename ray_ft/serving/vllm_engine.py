"""The vLLM engine of a replica: continuous batching, streaming, LoRA adapters and the OpenAI serving layer.

One ``AsyncLLM`` per replica loads the base model once; each LoRA adapter of the endpoint is registered under
its own model id, so a request's ``model`` field picks it and requests for different adapters share batches.
vLLM's own OpenAI serving objects (``OpenAIServingCompletion``, ``OpenAIServingChat``, ``OpenAIServingModels``)
turn requests into engine calls and responses; ray-ft adds what a public endpoint needs on top (see
:mod:`ray_ft.serving.api`): limits, the training prompt format of each model for chat, and request checks.
"""

from __future__ import annotations

import logging
from typing import Any

from ray_ft.serving.args import ServeArgs
from ray_ft.serving.catalog import ServingPlan

logger = logging.getLogger("ray.serve")

CPU_KV_CACHE_GIB = 1.0
CPU_MAX_MODEL_LEN = 4096


def engine_cli_args(plan: ServingPlan, args: ServeArgs, dtype: str, on_gpu: bool) -> list[str]:
    """The ``vllm serve`` arguments for this plan (parsed by vLLM's own argument parser)."""
    engine = args.engine
    argv = [
        "--model", plan.base.path,
        "--served-model-name", plan.base.name,
        "--dtype", dtype,
        "--max-num-seqs", str(engine.max_num_seqs),
        # ray-ft sets each request's chat template itself (the model's training format); clients cannot.
        "--trust-request-chat-template",
        "--disable-log-stats",
        "--disable-fastapi-docs",
    ]  # fmt: skip
    if engine.enforce_eager if engine.enforce_eager is not None else not on_gpu:
        argv.append("--enforce-eager")
    kv_gib = engine.kv_cache_gib if engine.kv_cache_gib is not None else (None if on_gpu else CPU_KV_CACHE_GIB)
    if kv_gib is not None:
        argv += ["--kv-cache-memory-bytes", str(int(kv_gib * (1 << 30)))]
    if engine.max_model_len is not None:
        argv += ["--max-model-len", str(engine.max_model_len)]
    elif not on_gpu:
        argv += ["--max-model-len", str(_cpu_context(plan.base.path))]
    if not on_gpu:
        argv += ["--distributed-executor-backend", "mp"]
    if plan.adapters:
        rank = max(a.lora_rank for a in plan.adapters)
        rank = next(r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= rank)  # vLLM's supported ranks
        argv += ["--enable-lora", "--max-lora-rank", str(rank), "--max-loras", str(args.engine.max_loras)]
        argv += ["--lora-modules", *(f"{a.name}={a.path}" for a in plan.adapters)]
    if args.trust_remote_code:
        argv.append("--trust-remote-code")
    return argv


def _cpu_context(model_dir: str) -> int:
    """The model's context window, capped on CPU (the KV cache must hold at least one full sequence)."""
    import json
    from pathlib import Path

    config = json.loads((Path(model_dir) / "config.json").read_text())
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = config.get(name)
        if isinstance(value, int) and value > 0:
            return min(value, CPU_MAX_MODEL_LEN)
    return 2048


def parse_engine_args(argv: list[str], extra: dict[str, Any]):
    """vLLM's ``Namespace`` for ``argv``, with ``extra`` fields set on it (unknown ones refused)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    namespace = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    for key, value in extra.items():
        if not hasattr(namespace, key):
            raise ValueError(f"engine.extra.{key}: not a vLLM engine argument")
        setattr(namespace, key, value)
    validate_parsed_serve_args(namespace)
    return namespace


class VLLMEngine:
    """An ``AsyncLLM`` and vLLM's OpenAI serving state, started inside the replica."""

    def __init__(self, client, state, namespace):
        self.client = client
        self.state = state
        self.namespace = namespace

    @classmethod
    async def start(cls, plan: ServingPlan, args: ServeArgs) -> VLLMEngine:
        from starlette.datastructures import State
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        from ray_ft.device import select_device

        placement = select_device(prefer_gpu=args.num_gpus > 0, dtype=args.engine.dtype)
        dtype = str(placement.dtype).removeprefix("torch.")
        namespace = parse_engine_args(engine_cli_args(plan, args, dtype, placement.on_gpu), args.engine.extra)
        engine_args = AsyncEngineArgs.from_cli_args(namespace)
        logger.info("ray-ft: starting vLLM on %s for %s", placement.describe(), [m.name for m in plan.models])
        client = AsyncLLM.from_engine_args(engine_args, usage_context=UsageContext.OPENAI_API_SERVER)
        try:
            state = State()
            await init_app_state(client, state, namespace, await client.get_supported_tasks())
        except BaseException:
            client.shutdown()
            raise
        return cls(client, state, namespace)

    @property
    def completion(self):
        return self.state.openai_serving_completion

    @property
    def chat(self):
        return self.state.openai_serving_chat

    @property
    def tokenizer(self):
        return self.client.renderer.tokenizer

    async def models(self) -> dict[str, Any]:
        listed = await self.state.openai_serving_models.show_available_models()
        return listed.model_dump()

    def in_flight(self) -> int:
        """Requests the engine holds (queued or generating)."""
        return self.client.get_num_unfinished_requests()

    async def check_health(self) -> None:
        await self.client.check_health()

    def shutdown(self) -> None:
        self.client.shutdown()
