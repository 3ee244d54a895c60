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


def serve(settings: ServeArgs, host: str = "127.0.0.1", port: int = 8000) -> int:
    """Serve ``settings.models`` at ``http://host:port/v1`` until SIGINT/SIGTERM, then shut down cleanly.

    Joins ``$RAY_ADDRESS`` when set (and deletes only its own application on the way out), else starts a local Ray
    sized for the replicas. Returns the exit code (0).
    """
    from ray import serve as ray_serve

    from ray_ft.train.runtime import init_ray

    plan = resolve_plan(settings.models, settings.model_names, settings.base_model_name)
    app = build_app(settings, plan)
    check_port_free(host, port)
    address = os.environ.get("RAY_ADDRESS")
    own_cluster = not address
    logger.info("[ray-ft] starting Ray (%s)", "connecting to " + address if address else "local")
    # The proxy and controller need a share beside the replicas; vLLM's engine runs in processes of its own.
    init_ray(
        cpus_needed=settings.max_replicas * settings.num_cpus + 1,
        gpus_needed=settings.max_replicas * settings.num_gpus,
        log_to_driver=False,
    )
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    started = time.time()
    try:
        ray_serve.start(
            http_options={
                "host": host,
                "port": port,
                # A streaming response may last long; the replica cuts non-streaming requests at request_timeout_s.
                "request_timeout_s": settings.request_timeout_s + 60,
                "keep_alive_timeout_s": 5,
            }
        )
        names = [m.name for m in plan.models]
        logger.info("[ray-ft] deploying %s on %s (%d..%d replicas); the first start loads the engine",
                    names, plan.engine, settings.min_replicas, settings.max_replicas)  # fmt: skip
        ray_serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        logger.info("[ray-ft] serving %s at http://%s:%d/v1", names, host, port)
        logger.info("[ray-ft] health: http://%s:%d/health   (Ctrl-C or SIGTERM to stop)", host, port)
        while not stop.wait(0.5):
            pass
        logger.info("[ray-ft] stopping")
    finally:
        if own_cluster:
            ray_serve.shutdown()
        else:
            ray_serve.delete(APP_NAME)
        import ray

        ray.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    logger.info("[ray-ft] stopped after %.0fs", time.time() - started)
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
