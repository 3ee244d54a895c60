"""Serving throughput and time to first token: vLLM in Ray Serve vs plain transformers ``generate``.

Same model, same prompts, same machine, one run. Each request asks for exactly ``--max-tokens`` tokens
(``min_tokens`` = ``max_tokens``), so every setting generates the same work.

- vLLM: ``ray_ft.serving.build_app`` on a local Ray (one replica), streamed ``/v1/completions`` over HTTP on
  127.0.0.1. Time to first token (TTFT) is when the first text chunk arrives.
- vLLM's own server (``--vllm-server``): ``python -m vllm.entrypoints.openai.api_server`` on the same model and
  engine settings, with no Ray: the ceiling of the engine on this machine, to show what ray-ft's layer costs.
- transformers: ``model.generate`` in this process, the best a hand-written server can do with it: the requests
  in flight run as one padded batch (static batching). Without streaming, TTFT is when the batch returns.

At each concurrency C (default 1, 16, 64) it sends ``C * --rounds`` requests, C at a time, and prints completion
tokens/s and TTFT p50/p95. The last line is machine-readable:

    tokens_per_s_c16=<vLLM tok/s at 16> scaling_c16_vs_c1=<vLLM 16 / vLLM 1> vs_transformers_c16=<vLLM / HF at 16>

``--slow-clients N`` also measures ray-ft's endpoint (its default replica settings) under N clients that each send
a request body one byte every 3 s, reconnecting when cut off: the median latency of a normal request while they
are connected over its median unloaded, in one run. It adds ``latency_ratio_under_slow_clients=<x>`` to the line.

    .venv/bin/python bench/serve_latency.py                                  # the embedded SmolLM2-135M
    .venv/bin/python bench/serve_latency.py --model-dir outputs/demo/merged --concurrency 1,16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import time

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, server: subprocess.Popen | None = None, timeout_s: float | None = None) -> None:
    """Poll ``url``'s ``/health`` until it answers 200 (the engine has started).

    With ``server``, stop if that process exits first; with ``timeout_s``, stop after that long."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        if server is not None and server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}: {' '.join(server.args)}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if deadline is not None and time.monotonic() > deadline:
            raise SystemExit(f"{url} did not answer /health within {timeout_s:.0f} s")
        time.sleep(2)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def prompts(n: int) -> list[str]:
    topics = ["LoRA", "QLoRA", "prompt tuning", "DeepSpeed ZeRO", "Ray Train", "a linear probe", "MLflow", "vLLM"]
    return [f"Human: Question {i}: what is {topics[i % len(topics)]}? Assistant:" for i in range(n)]


async def vllm_round(url: str, concurrency: int, requests: int, max_tokens: int) -> dict[str, float]:
    ttfts: list[float] = []
    tokens = 0
    errors = 0
    semaphore = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def one(client: httpx.AsyncClient, prompt: str) -> None:
        nonlocal tokens, errors
        body = {"prompt": prompt, "max_tokens": max_tokens, "min_tokens": max_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
        async with semaphore:
            start = time.perf_counter()
            first = None
            async with client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    errors += 1
                    return
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if first is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                        first = time.perf_counter() - start
                    if chunk.get("usage"):
                        tokens += chunk["usage"]["completion_tokens"]
            ttfts.append(first if first is not None else time.perf_counter() - start)

    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0), limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(one(client, p) for p in prompts(requests)))
        wall = time.perf_counter() - start
    return {"tokens_per_s": tokens / wall, "ttft_p50": statistics.median(ttfts), "ttft_p95": percentile(ttfts, 95),
            "errors": errors}  # fmt: skip


SLOW_BODY_BYTES = 2048
"""What a slow client announces as its ``Content-Length``; it never sends that much."""


async def slow_client(host: str, port: int, stop: asyncio.Event, cut: list[int]) -> None:
    """Send a completion request's headers, then its body a byte every 3 s, until ``stop``; reconnect when the
    server closes the connection (``cut`` counts those)."""
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {SLOW_BODY_BYTES}\r\n\r\n"
    ).encode()
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            await asyncio.sleep(0.5)
            continue
        try:
            writer.write(head)
            await writer.drain()
            while not stop.is_set():
                writer.write(b" ")
                await writer.drain()
                try:
                    if await asyncio.wait_for(reader.read(1), timeout=3.0) == b"":
                        break
                    cut[0] += 1  # the server answered (408) before the body was complete
                    break
                except TimeoutError:
                    continue
        except OSError:
            pass
        finally:
            writer.close()


async def normal_latencies(url: str, n: int) -> list[float]:
    """Seconds for each of ``n`` sequential 8-token completions."""
    out = []
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0)) as client:
        for prompt in prompts(n):
            start = time.perf_counter()
            response = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 8, "temperature": 0})
            response.raise_for_status()
            out.append(time.perf_counter() - start)
    return out


async def slow_clients_ratio(url: str, host: str, port: int, clients: int, requests: int = 8) -> dict[str, float]:
    """Median latency of a normal request with ``clients`` slow clients connected, over its median without."""
    unloaded = statistics.median(await normal_latencies(url, requests))
    stop, cut = asyncio.Event(), [0]
    tasks = [asyncio.create_task(slow_client(host, port, stop, cut)) for _ in range(clients)]
    await asyncio.sleep(5)  # every slow client connected and trickling
    loaded = statistics.median(await normal_latencies(url, requests))
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    after = statistics.median(await normal_latencies(url, requests))
    return {"unloaded_s": unloaded, "loaded_s": loaded, "after_s": after, "ratio": loaded / unloaded,
            "slow_cut": cut[0]}  # fmt: skip


def transformers_round(model, tokenizer, concurrency: int, requests: int, max_tokens: int) -> dict[str, float]:
    import torch

    tokenizer.padding_side = "left"
    ttfts: list[float] = []
    tokens = 0
    batch_prompts = prompts(requests)
    start = time.perf_counter()
    for i in range(0, requests, concurrency):
        chunk = batch_prompts[i : i + concurrency]
        t0 = time.perf_counter()
        enc = tokenizer(chunk, return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        tokens += (out.shape[1] - enc["input_ids"].shape[1]) * len(chunk)
        ttfts += [time.perf_counter() - t0] * len(chunk)
    wall = time.perf_counter() - start
    return {"tokens_per_s": tokens / wall, "ttft_p50": statistics.median(ttfts), "ttft_p95": percentile(ttfts, 95),
            "errors": 0}  # fmt: skip


def vllm_server_rounds(model_dir: str, dtype: str, on_gpu: bool, levels: list[int], args) -> dict[int, dict]:
    """The same rounds against vLLM's own OpenAI server in a subprocess (the same engine settings as the replica)."""
    import sys

    from ray_ft.serving.vllm_engine import CPU_KV_CACHE_GIB

    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--dtype", dtype,
           "--host", "127.0.0.1", "--port", str(port), "--max-num-seqs", str(max(levels))]  # fmt: skip
    if not on_gpu:
        cmd += ["--enforce-eager", "--kv-cache-memory-bytes", str(int(CPU_KV_CACHE_GIB * 2**30))]
    log = open(os.devnull, "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, server, timeout_s=600)
        asyncio.run(vllm_round(url, 2, 2, 8))  # warm-up
        return {c: asyncio.run(vllm_round(url, c, c * args.rounds, args.max_tokens)) for c in levels}
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=None, help="model to serve (default: the embedded SmolLM2-135M)")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--rounds", type=int, default=2, help="requests per setting = concurrency * rounds")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--vllm-server", action="store_true", help="also measure vLLM's own OpenAI server")
    parser.add_argument("--vllm-dtype", default="auto", help="vLLM's dtype (auto: as ray_ft.device.select_device)")
    parser.add_argument("--slow-clients", type=int, default=0, help="also measure latency under N slow clients")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    import ray
    from ray import serve

    from ray_ft.config import ModelConfig
    from ray_ft.device import select_device
    from ray_ft.models import resolve_model_dir
    from ray_ft.serving import build_app

    model_dir = args.model_dir or resolve_model_dir(ModelConfig(name_or_path="embedded:smollm2-135m-instruct"))
    placement = select_device(prefer_gpu=None, dtype="auto")
    print(f"model {model_dir}; transformers on {placement.describe()}, vLLM dtype {args.vllm_dtype}; "
          f"{os.cpu_count()} CPUs; {args.max_tokens} tokens a request")  # fmt: skip

    results: dict[tuple[str, int], dict[str, float]] = {}
    ray.init(num_cpus=max(4, os.cpu_count() or 1), log_to_driver=False, include_dashboard=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = {
        "models": [model_dir],
        "min_replicas": 1,
        "max_replicas": 1,
        "max_ongoing_requests": 256,
        "engine": {"dtype": args.vllm_dtype, "max_num_seqs": max(levels)},
        "num_gpus": 1 if placement.on_gpu else 0,
        "limits": {"max_tokens": args.max_tokens},
    }
    started = time.perf_counter()
    serve.run(build_app(settings), name="bench", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url)
    print(f"vLLM endpoint up in {time.perf_counter() - started:.0f}s", flush=True)
    asyncio.run(vllm_round(url, 2, 2, 8))  # warm-up
    for c in levels:
        results[("vllm", c)] = asyncio.run(vllm_round(url, c, c * args.rounds, args.max_tokens))
        print(f"vllm c={c}: {results[('vllm', c)]}", flush=True)
    serve.delete("bench")
    slow = None
    if args.slow_clients:
        # ray-ft's own replica defaults (max_ongoing_requests, body_timeout_s): what a deployment gets.
        defaults = {k: v for k, v in settings.items() if k not in ("max_ongoing_requests", "engine")}
        serve.run(build_app({**defaults, "engine": {"dtype": args.vllm_dtype}}), name="slow", route_prefix="/",
                  blocking=False)  # fmt: skip
        wait_healthy(url)
        slow = asyncio.run(slow_clients_ratio(url, "127.0.0.1", port, args.slow_clients))
        print(f"slow clients ({args.slow_clients}): {slow}", flush=True)
    serve.shutdown()
    ray.shutdown()

    if args.vllm_server:
        dtype = args.vllm_dtype if args.vllm_dtype != "auto" else str(placement.dtype).removeprefix("torch.")
        for c, r in vllm_server_rounds(model_dir, dtype, placement.on_gpu, levels, args).items():
            results[("vllm-server", c)] = r
            print(f"vllm-server c={c}: {r}", flush=True)

    if not args.skip_transformers:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=placement.dtype).to(placement.device).eval()
        transformers_round(model, tokenizer, 2, 2, 8)  # warm-up
        for c in levels:
            results[("transformers", c)] = transformers_round(model, tokenizer, c, c * args.rounds, args.max_tokens)
            print(f"transformers c={c}: {results[('transformers', c)]}", flush=True)

    print(f"\n{'engine':<13} {'clients':>7} {'tokens/s':>9} {'TTFT p50':>9} {'TTFT p95':>9} {'errors':>6}")
    for (engine, c), r in sorted(results.items()):
        print(f"{engine:<13} {c:>7} {r['tokens_per_s']:>9.1f} {r['ttft_p50']:>8.2f}s {r['ttft_p95']:>8.2f}s "
              f"{r['errors']:>6}")  # fmt: skip
    ref = 16 if 16 in levels else levels[-1]
    x = results[("vllm", ref)]["tokens_per_s"]
    y = x / results[("vllm", levels[0])]["tokens_per_s"]
    z = x / results[("transformers", ref)]["tokens_per_s"] if ("transformers", ref) in results else float("nan")
    line = f"tokens_per_s_c{ref}={x:.1f} scaling_c{ref}_vs_c{levels[0]}={y:.2f} vs_transformers_c{ref}={z:.2f}"
    if ("vllm-server", ref) in results:
        line += f" vs_vllm_server_c{ref}={x / results[('vllm-server', ref)]['tokens_per_s']:.2f}"
    if slow is not None:
        print(f"\nnormal request, median of 8: {slow['unloaded_s']:.2f}s alone, {slow['loaded_s']:.2f}s with "
              f"{args.slow_clients} slow clients, {slow['after_s']:.2f}s after them")  # fmt: skip
        line += f" latency_ratio_under_slow_clients={slow['ratio']:.2f}"
    print(line)


if __name__ == "__main__":
    main()
