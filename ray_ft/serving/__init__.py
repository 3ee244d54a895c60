"""Serving: tuned models behind an OpenAI-compatible HTTP endpoint on Ray Serve.

Modules, one concern each: :mod:`~ray_ft.serving.args` (typed arguments), :mod:`~ray_ft.serving.catalog`
(what the given directories serve, and on which engine), :mod:`~ray_ft.serving.vllm_engine` and
:mod:`~ray_ft.serving.transformers_engine` (the engines), :mod:`~ray_ft.serving.requests` (request checks),
:mod:`~ray_ft.serving.gate` (API key and body limits, before routing), :mod:`~ray_ft.serving.api` (the replica
and its routes), :mod:`~ray_ft.serving.app` (the Serve builder) and :mod:`~ray_ft.serving.launch`
(``ray-ft serve``). Heavy imports (Ray, vLLM, torch) happen where they are used.
"""

from ray_ft.serving.app import APP_NAME, build_app
from ray_ft.serving.args import API_KEY_ENV, RequestLimits, ServeArgs, parse_serve_args
from ray_ft.serving.launch import check_port_free, serve

__all__ = [
    "API_KEY_ENV",
    "APP_NAME",
    "RequestLimits",
    "ServeArgs",
    "build_app",
    "check_port_free",
    "parse_serve_args",
    "serve",
]
