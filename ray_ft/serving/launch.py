"""``ray-ft serve``: start (or join) Ray, run the application until SIGINT/SIGTERM, then shut down cleanly."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import threading
import time
from typing import Any

from ray_ft.serving.app import APP_NAME, build_app
from ray_ft.serving.args import parse_serve_args
from ray_ft.serving.catalog import resolve_plan


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
    if not 0 < port < 65536:
        raise ValueError(f"--port {port}: must be between 1 and 65535")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            raise ValueError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror})") from None


def serve_fields(args: argparse.Namespace) -> dict[str, Any]:
    """``ServeArgs`` fields from the command line."""
    min_replicas, max_replicas = args.replicas
    fields: dict[str, Any] = {
        "models": args.models,
        "model_names": args.model_name or None,
        "api_key": args.api_key,
        "min_replicas": min_replicas,
        "max_replicas": max_replicas,
        "num_cpus": args.num_cpus,
        "num_gpus": args.num_gpus,
    }
    if args.request_timeout_s is not None:
        fields["request_timeout_s"] = args.request_timeout_s
    return fields


def cmd_serve(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    settings = parse_serve_args(serve_fields(args), source="ray-ft serve")
    plan = resolve_plan(settings.models, settings.model_names, settings.base_model_name)
    app = build_app(settings, plan)
    check_port_free(args.host, args.port)
    address = os.environ.get("RAY_ADDRESS")
    own_cluster = not address
    print(f"[ray-ft] starting Ray ({'connecting to ' + address if address else 'local'})", flush=True)
    if own_cluster:
        # The proxy and controller need a share beside the replicas; vLLM's engine runs in processes of its own.
        need = settings.max_replicas * settings.num_cpus + 1
        gpus = {"num_gpus": int(settings.max_replicas * settings.num_gpus + 0.999)} if settings.num_gpus else {}
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(need + 0.999)), log_to_driver=False, **gpus)
    else:
        ray.init(address=address, log_to_driver=False)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    started = time.time()
    try:
        serve.start(
            http_options={
                "host": args.host,
                "port": args.port,
                # A streaming response may last long; the replica cuts non-streaming requests at request_timeout_s.
                "request_timeout_s": settings.request_timeout_s + 60,
                "keep_alive_timeout_s": 5,
            }
        )
        names = [m.name for m in plan.models]
        print(f"[ray-ft] deploying {names} on {plan.engine} ({settings.min_replicas}..{settings.max_replicas} "
              "replicas); the first start loads the engine", flush=True)  # fmt: skip
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        print(f"[ray-ft] serving {names} at http://{args.host}:{args.port}/v1", flush=True)
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


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options ``ray-ft serve`` and ``ray-ft tune --deploy`` share."""
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $RAY_FT_API_KEY)")
    p.add_argument(
        "--replicas", type=parse_replicas, default=(1, 2), metavar="MIN:MAX", help="autoscaling bounds (default 1:2)"
    )
    p.add_argument("--num-cpus", type=float, default=1.0, help="logical CPUs per replica (default 1)")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica (default 0)")
    p.add_argument("--request-timeout-s", type=float, default=None, help="504 after this many seconds (default 300)")


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``ray-ft serve``."""
    p = subparsers.add_parser(
        "serve",
        help="serve tuned models over an OpenAI-compatible HTTP API (Ray Serve + vLLM)",
        description=(
            "Serve MODEL ... until SIGINT/SIGTERM. Each MODEL is a training output directory, an artifact "
            "(merged/, export/) or a Hugging Face model directory; LoRA/QLoRA outputs sharing a base are served "
            "as adapters of one engine, each under its directory's name. The API key defaults to $RAY_FT_API_KEY."
        ),
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help="output or model directories")
    p.add_argument(
        "--model-name",
        action="append",
        default=[],
        help="model id in the API, once per MODEL in order (default: each directory's name)",
    )
    add_arguments(p)
    p.set_defaults(func=cmd_serve)
