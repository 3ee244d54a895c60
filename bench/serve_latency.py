"""Serving latency and throughput: dynamic batching vs one request at a time.

Deploys ``ray_ft.serving.build_app`` on a local Ray (loopback only), once with ``max_batch_size``
N and once with 1, and sends the same non-streaming completions at concurrency 1, 4 and 16.
Prints requests/s, p50 and p99 latency per setting and the batched/one-at-a-time ratios.

    .venv/bin/python bench/serve_latency.py                        # tiny random model, built on the fly
    .venv/bin/python bench/serve_latency.py --model-dir outputs/demo/merged --requests 48
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_model(directory: Path) -> Path:
    """The 2-layer random Llama the test suite uses (no download)."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import build_tiny_model_dir

    return build_tiny_model_dir(directory)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def measure(url: str, concurrency: int, requests: int, max_tokens: int) -> dict[str, float]:
    """Send ``requests`` completions, ``concurrency`` in flight; latency per request and overall req/s."""
    latencies: list[float] = []
    errors = 0
    semaphore = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def one(client: httpx.AsyncClient, i: int) -> None:
        nonlocal errors
        body = {"prompt": f"Human: Question {i % 8}: what does LoRA train? Assistant:", "max_tokens": max_tokens}
        async with semaphore:
            start = time.perf_counter()
            response = await client.post("/v1/completions", json=body)
            latencies.append(time.perf_counter() - start)
            errors += response.status_code != 200

    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(300.0), limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(one(client, i) for i in range(requests)))
        wall = time.perf_counter() - start
    return {
        "rps": requests / wall,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * percentile(latencies, 99),
        "errors": float(errors),
    }


def wait_healthy(url: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the deployment did not become healthy within {timeout_s:.0f}s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", default=None, help="artifact or HF model dir (default: a tiny random model)")
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency level (bounded run)")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated concurrency levels")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8, help="max_batch_size of the batched setting")
    p.add_argument("--batch-wait-s", type=float, default=0.02, help="batch_wait_timeout_s of the batched setting")
    args = p.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import ray
    from ray import serve

    from ray_ft.serving import build_app

    with tempfile.TemporaryDirectory(prefix="ray-ft-bench-") as tmp:
        model_dir = Path(args.model_dir) if args.model_dir else tiny_model(Path(tmp) / "tiny-llama")
        print(f"[bench] model {model_dir}; {args.requests} requests per level, max_tokens {args.max_tokens}")
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
        rows: dict[tuple[str, int], dict[str, float]] = {}
        settings = [(f"batched (max_batch_size {args.batch_size})", args.batch_size), ("one at a time", 1)]
        try:
            for label, batch_size in settings:
                app = build_app(
                    {
                        "model_dir": str(model_dir),
                        "min_replicas": 1,
                        "max_replicas": 1,
                        "max_batch_size": batch_size,
                        "batch_wait_timeout_s": args.batch_wait_s if batch_size > 1 else 0.0,
                        "max_ongoing_requests": max(32, max(levels)),
                        "limits": {"max_tokens": max(args.max_tokens, 1)},
                    }
                )
                serve.run(app, name="bench", route_prefix="/", blocking=False)
                wait_healthy(url)
                asyncio.run(measure(url, 4, 8, args.max_tokens))  # warm-up
                for level in levels:
                    result = asyncio.run(measure(url, level, max(args.requests, level), args.max_tokens))
                    rows[(label, level)] = result
                    print(
                        f"[bench] {label:<28} concurrency {level:>3}: {result['rps']:7.2f} req/s  "
                        f"p50 {result['p50_ms']:8.1f} ms  p99 {result['p99_ms']:8.1f} ms  "
                        f"errors {result['errors']:.0f}",
                        flush=True,
                    )
                serve.delete("bench")
        finally:
            serve.shutdown()
            ray.shutdown()

    print()
    print(f"{'setting':<30}{'conc':>5}{'req/s':>9}{'p50 ms':>10}{'p99 ms':>10}")
    for (label, level), r in rows.items():
        print(f"{label:<30}{level:>5}{r['rps']:>9.2f}{r['p50_ms']:>10.1f}{r['p99_ms']:>10.1f}")
    print()
    batched_label, single_label = settings[0][0], settings[1][0]
    for level in levels:
        batched, single = rows[(batched_label, level)], rows[(single_label, level)]
        print(
            f"concurrency {level:>3}: batched/one-at-a-time throughput x{batched['rps'] / single['rps']:.2f}, "
            f"p50 latency x{batched['p50_ms'] / single['p50_ms']:.2f}"
        )
    return 1 if any(r["errors"] for r in rows.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
