"""The Serve application builder (``import_path: ray_ft.serving:build_app`` in a Serve config file)."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from ray_ft.serving.args import ServeArgs, parse_serve_args
from ray_ft.serving.catalog import ServingPlan, resolve_plan

if TYPE_CHECKING:
    from ray.serve import Application
    from ray.serve.deployment import Deployment

APP_NAME = "ray-ft"
"""Serve application name used by ``ray-ft serve`` and ``serve/config.yaml``."""


@functools.cache
def model_server_deployment() -> Deployment:
    """``ModelServer`` behind its FastAPI ingress, as a Serve deployment (built once per process)."""
    from ray import serve

    from ray_ft.serving.api import ModelServer

    ingress = serve.ingress()(ModelServer)  # the app comes from ModelServer.__serve_build_asgi_app__
    # Engine start-up (loading the model, profiling the KV cache) can take minutes on a loaded CPU machine.
    return serve.deployment(
        ingress,
        name="ModelServer",
        max_constructor_retry_count=3,
        graceful_shutdown_timeout_s=20,
        health_check_period_s=10,
        health_check_timeout_s=60,
    )


def replica_options(settings: ServeArgs) -> dict[str, Any]:
    """Autoscaling, request-slot, queue and resource options of the deployment."""
    actor_options: dict[str, Any] = {"num_cpus": settings.num_cpus}
    if settings.num_gpus:
        actor_options["num_gpus"] = settings.num_gpus
    return {
        "autoscaling_config": {
            "min_replicas": settings.min_replicas,
            "max_replicas": settings.max_replicas,
            "initial_replicas": max(settings.min_replicas, 1),
            "target_ongoing_requests": settings.target_ongoing_requests,
            "upscale_delay_s": settings.upscale_delay_s,
            "downscale_delay_s": settings.downscale_delay_s,
            "look_back_period_s": settings.look_back_period_s,
        },
        "max_ongoing_requests": settings.max_ongoing_requests,
        "max_queued_requests": settings.max_queued_requests,
        "ray_actor_options": actor_options,
    }


def build_app(args: dict[str, Any] | ServeArgs, plan: ServingPlan | None = None) -> Application:
    """Build the Serve application.

    Args:
        args: :class:`ServeArgs` or a mapping of its fields (the config file's ``args:``).
        plan: the models already resolved from ``args.models`` (``ray-ft serve`` resolves them once to print them).

    Returns:
        The bound ``ModelServer`` deployment, with autoscaling and per-replica resources set.

    Raises:
        ConfigError: an argument is missing or out of range (each message names the field).
        ArtifactError: a directory is not servable, or the directories cannot share one endpoint.
    """
    settings = parse_serve_args(args)
    if plan is None:  # here, not per replica
        plan = resolve_plan(settings.models, settings.model_names, settings.base_model_name)
    api_key = settings.resolved_api_key()
    settings = settings.model_copy(update={"api_key": SecretStr(api_key) if api_key else None})
    return model_server_deployment().options(**replica_options(settings)).bind(settings, plan)
