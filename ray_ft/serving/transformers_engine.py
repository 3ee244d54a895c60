"""The transformers engine: artifacts vLLM cannot serve, on the device :func:`ray_ft.device.select_device` picks.

- Prompt-tuning exports (soft prompts are not a vLLM feature): completions and chat through
  :class:`ray_ft.inference.Generator`, one request at a time on the replica's model thread. ``stream: true``
  is answered as server-sent events holding the whole answer in one chunk.
- Classifiers (``linear_probe``): ``POST /v1/classify``.

bf16 where the device computes in it natively (GPUs, recent CPUs), else fp32.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ray_ft.serving.args import ServeArgs
from ray_ft.serving.catalog import ServingPlan
from ray_ft.serving.errors import ApiError


class TransformersEngine:
    """A Hugging Face model (or classifier) behind one model thread."""

    def __init__(self, plan: ServingPlan, args: ServeArgs):
        self.plan = plan
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ray-ft-model")
        self.generator = None
        self.classifier = None
        path = Path(plan.base.path)
        if plan.task == "classification":
            from ray_ft.export import read_metadata
            from ray_ft.methods import get_method

            meta = read_metadata(path)
            self.classifier = get_method(meta["method"]).load_classifier(path, meta)
        else:
            from ray_ft.inference import Generator

            self.generator = Generator.load(
                path, trust_remote_code=args.trust_remote_code, prefer_gpu=args.num_gpus > 0
            )
            self.generator.prompts([[{"role": "user", "content": "ping"}]])  # the prompt format renders, or fail now

    async def _run(self, fn, *fn_args):
        return await asyncio.get_running_loop().run_in_executor(self.model_thread, fn, *fn_args)

    def _require_generator(self):
        if self.generator is None:
            raise ApiError(400, f"model {self.plan.base.name!r} is a classifier: use POST /v1/classify", param="model")
        return self.generator

    async def classify(self, texts: list[str]) -> list[dict[str, Any]]:
        if self.classifier is None:
            raise ApiError(400, f"model {self.plan.base.name!r} is not a classifier", code="not_a_classifier")
        return await self._run(self.classifier.predict, texts)

    async def complete(self, body, model_name: str):
        generator = self._require_generator()
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not all(isinstance(p, str) for p in prompts):
            raise ApiError(400, "prompt: token ids are not supported by this model", param="prompt")
        results = await self._generate(generator, prompts, body, [])
        choices = [
            {"index": i, "text": r["text"], "logprobs": None, "finish_reason": r["finish_reason"]}
            for i, r in enumerate(results)
        ]
        return self._respond(body, model_name, "text_completion", "cmpl", choices, results)

    async def chat(self, body, model_name: str):
        generator = self._require_generator()
        conversation = [{"role": m["role"], "content": _text(m)} for m in body.messages]
        from jinja2 import TemplateError

        try:
            prompt = generator.prompts([conversation])[0]
        except (TemplateError, ValueError) as e:
            raise ApiError(400, f"the model's prompt format rejects these messages: {e}", param="messages") from None
        stop = generator.stop_text()
        results = await self._generate(generator, [prompt], body, [stop] if stop else [])
        choices = [
            {
                "index": 0,
                "message": {"role": "assistant", "content": results[0]["text"]},
                "logprobs": None,
                "finish_reason": results[0]["finish_reason"],
            }
        ]
        return self._respond(body, model_name, "chat.completion", "chatcmpl", choices, results)

    async def _generate(self, generator, prompts: list[str], body, extra_stop: list[str]) -> list[dict[str, Any]]:
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens

        def run() -> list[dict[str, Any]]:
            return generator.complete(
                prompts,
                max_new_tokens=max_tokens,
                temperature=body.temperature or 0.0,
                top_p=body.top_p if body.top_p is not None else 1.0,
                batch_size=len(prompts),
                stop=[*extra_stop, *stops] or None,
            )

        return await self._run(run)

    def _respond(self, body, model_name: str, kind: str, prefix: str, choices: list, results: list):
        usage = {
            "prompt_tokens": sum(r["prompt_tokens"] for r in results),
            "completion_tokens": sum(r["completion_tokens"] for r in results),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        response = {
            "id": f"{prefix}-{uuid.uuid4().hex[:24]}",
            "object": kind,
            "created": int(time.time()),
            "model": model_name,
            "choices": choices,
            "usage": usage,
        }
        if not body.stream:
            return response
        return _one_chunk_stream(
            response, include_usage=bool(body.stream_options and body.stream_options.include_usage)
        )

    async def check_health(self) -> None:
        return None

    def in_flight(self) -> int:
        return 0

    def shutdown(self) -> None:
        self.model_thread.shutdown(wait=False, cancel_futures=True)


def _text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    return "".join(str(part.get("text", "")) for part in content or [] if isinstance(part, dict))


def _one_chunk_stream(response: dict[str, Any], include_usage: bool):
    """The whole answer as server-sent events in the OpenAI chunk format, ending with ``[DONE]``."""
    from fastapi.responses import StreamingResponse

    chat = response["object"] == "chat.completion"
    chunk_kind = "chat.completion.chunk" if chat else "text_completion"
    head = {k: response[k] for k in ("id", "created", "model")}

    def events():
        for choice in response["choices"]:
            index, reason = choice["index"], choice["finish_reason"]
            if chat:
                first = {"delta": {"role": "assistant", "content": choice["message"]["content"]}}
                last = {"delta": {}}
            else:
                first, last = {"text": choice["text"]}, {"text": ""}
            body = [{"index": index, **first, "logprobs": None, "finish_reason": None}]
            end = [{"index": index, **last, "logprobs": None, "finish_reason": reason}]
            yield _sse({**head, "object": chunk_kind, "choices": body})
            yield _sse({**head, "object": chunk_kind, "choices": end})
        if include_usage:
            yield _sse({**head, "object": chunk_kind, "choices": [], "usage": response["usage"]})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
