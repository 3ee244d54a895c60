"""``ray-ft serve`` (:func:`serve`): start (or join) Ray, run the application until SIGINT/SIGTERM, then shut down
cleanly. Its command-line arguments are parsed in ``ray_ft.cli``."""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time

from ray_ft.serving.app import APP_NAME, build_app
from ray_ft.serving.args import ServeArgs
from ray_ft.serving.catalog import resolve_plan

logger = logging.getLogger(__name__)


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

    from ray_ft.train.runtime import start_ray

    plan = resolve_plan(settings.models, settings.model_names, settings.base_model_name)
    app = build_app(settings, plan)
    check_port_free(host, port)
    # The proxy and controller need a share beside the replicas; vLLM's engine runs in processes of its own.
    own_cluster = start_ray(
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
