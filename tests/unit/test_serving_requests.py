"""Serving without a cluster: the shipped Serve config, builder arguments, the serving plan, request checks."""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from ray_ft.cli import parse_replicas
from ray_ft.config import ConfigError
from ray_ft.export import ArtifactError, write_artifact
from ray_ft.serving import ServeArgs, build_app, parse_serve_args
from ray_ft.serving.catalog import resolve_plan

REPO = Path(__file__).resolve().parents[2]
PLAIN = {"template": "Q: {question} A: {answer}", "use_chat_template": False}


def _copy_model(src: Path):
    def write(tmp: Path) -> None:
        for item in src.iterdir():
            shutil.copy2(item, tmp / item.name)

    return write


@pytest.fixture(scope="module")
def merged_artifact(tiny_model_dir, tmp_path_factory) -> Path:
    meta = {"method": "lora", "task": "generation", "artifact": "merged", "prompt_format": PLAIN}
    return write_artifact(tmp_path_factory.mktemp("serve-config") / "run" / "merged", _copy_model(tiny_model_dir), meta)


def make_adapter_run(root: Path, name: str, base: Path, method: str = "lora", rank: int = 8) -> Path:
    """A training output dir holding ``trainable/`` (adapter config + metadata), as ``ray-ft train`` leaves it."""

    def write(tmp: Path) -> None:
        (tmp / "adapter_config.json").write_text(json.dumps({"r": rank, "peft_type": "LORA"}))

    meta = {"method": method, "task": "generation", "artifact": "trainable", "base_model_dir": str(base),
            "prompt_format": PLAIN}  # fmt: skip
    write_artifact(root / name / "trainable", write, meta)
    return root / name


@pytest.mark.parametrize("config", sorted((REPO / "serve").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_serve_config_builds_an_application(config, merged_artifact):
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load(config.read_text())
    schema = ServeDeploySchema.model_validate(raw)
    assert schema.http_options.host == "127.0.0.1", "shipped configs listen on loopback only"
    for app in schema.applications:
        module_name, _, attr = app.import_path.partition(":")
        builder = getattr(importlib.import_module(module_name), attr)
        args = {**app.args, "models": [str(merged_artifact)]}
        parsed = ServeArgs.model_validate(args)  # every key in the file is a real field
        assert parsed.min_replicas <= parsed.max_replicas
        assert isinstance(builder(args), Application)


def test_builder_arguments_are_checked_with_field_names(merged_artifact, tmp_path):
    models = [str(merged_artifact)]
    with pytest.raises(ConfigError, match="min_replicas"):
        build_app({"models": models, "min_replicas": 3, "max_replicas": 2})
    with pytest.raises(ConfigError, match=r"max_replica: unknown key"):
        build_app({"models": models, "max_replica": 2})
    with pytest.raises(ConfigError, match="limits.max_tokens"):
        build_app({"models": models, "limits": {"max_tokens": 0}})
    with pytest.raises(ConfigError, match="request_timeout_s"):
        build_app({"models": models, "request_timeout_s": float("inf")})
    with pytest.raises(ConfigError, match="engine.dtype"):
        build_app({"models": models, "engine": {"dtype": "int3"}})
    with pytest.raises(ConfigError, match="model_names"):
        build_app({"models": models, "model_names": ["a", "b"]})
    with pytest.raises(ConfigError, match="models"):
        build_app({})
    with pytest.raises(ArtifactError, match="not a directory"):
        build_app({"models": [str(tmp_path / "missing")]})
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "ray_ft.json").write_text(json.dumps({"task": "generation"}))
    with pytest.raises(ArtifactError, match="MANIFEST"):
        build_app({"models": [str(tmp_path / "half")]})


def test_api_key_is_secret_and_empty_means_none(monkeypatch):
    args = parse_serve_args({"models": ["x"], "api_key": "k-123"})
    assert "k-123" not in repr(args) and "k-123" not in str(args.model_dump())
    assert args.resolved_api_key() == "k-123"
    monkeypatch.setenv("RAY_FT_API_KEY", "from-env")
    assert parse_serve_args({"models": ["x"], "api_key": ""}).resolved_api_key() == "from-env"
    monkeypatch.delenv("RAY_FT_API_KEY")
    assert parse_serve_args({"models": ["x"]}).resolved_api_key() is None


def test_replicas_option():
    assert parse_replicas("1:2") == (1, 2)
    assert parse_replicas("3") == (3, 3)
    for bad in ("2:1", "a:b", "0:0", "-1:2", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_replicas(bad)


def test_lora_runs_sharing_a_base_become_adapters_named_after_their_directories(tiny_model_dir, tmp_path):
    a = make_adapter_run(tmp_path, "vi-qa", tiny_model_dir, rank=8)
    b = make_adapter_run(tmp_path, "en-qa", tiny_model_dir, method="qlora", rank=16)
    plan = resolve_plan([str(a), str(b / "trainable")])
    assert plan.engine == "vllm"
    assert plan.base.path == str(tiny_model_dir.resolve()) and plan.base.name == tiny_model_dir.name
    assert [(m.name, m.lora_rank) for m in plan.adapters] == [("vi-qa", 8), ("en-qa", 16)]
    assert plan.adapters[0].prompt_format == PLAIN
    named = resolve_plan([str(a), str(b)], names=["one", "two"], base_name="base")
    assert [m.name for m in named.models] == ["base", "one", "two"]
    assert named.get(None).name == "base" and named.get("two").path.endswith("trainable")
    assert named.get("nope") is None


def test_a_plan_refuses_what_one_endpoint_cannot_serve(tiny_model_dir, merged_artifact, tmp_path):
    other_base = tmp_path / "other-base"
    shutil.copytree(tiny_model_dir, other_base)
    a = make_adapter_run(tmp_path, "a", tiny_model_dir)
    b = make_adapter_run(tmp_path, "b", other_base)
    with pytest.raises(ArtifactError, match="share a base"):
        resolve_plan([str(a), str(b)])
    with pytest.raises(ArtifactError, match="one base model"):
        resolve_plan([str(a), str(merged_artifact)])
    with pytest.raises(ArtifactError, match="repeats"):
        resolve_plan([str(a), str(a)])
    with pytest.raises(ArtifactError, match="names both"):
        resolve_plan([str(a)], base_name="a")
    # A merged model alone, and the base given beside its adapters, are both fine.
    assert resolve_plan([str(merged_artifact)]).base.name == "run"
    assert [m.name for m in resolve_plan([str(tiny_model_dir), str(a)]).models] == [tiny_model_dir.name, "a"]


def test_prompt_tuning_and_classifiers_go_to_the_transformers_engine_alone(tiny_model_dir, tmp_path):
    meta = {"method": "prompt_tuning", "task": "generation", "artifact": "export", "prompt_format": PLAIN}
    export = write_artifact(tmp_path / "pt" / "export", _copy_model(tiny_model_dir), meta)
    plan = resolve_plan([str(export)])
    assert (plan.engine, plan.task, plan.base.name) == ("transformers", "generation", "pt")
    probe = {"method": "linear_probe", "task": "classification", "artifact": "export"}
    write_artifact(tmp_path / "probe" / "export", _copy_model(tiny_model_dir), probe)
    write_artifact(tmp_path / "probe" / "trainable", lambda d: None, {**probe, "artifact": "trainable"})
    assert resolve_plan([str(tmp_path / "probe")]).task == "classification"
    a = make_adapter_run(tmp_path, "a", tiny_model_dir)
    with pytest.raises(ArtifactError, match="served alone"):
        resolve_plan([str(export), str(a)])


def test_engine_arguments_parse_with_vllms_own_parser(tiny_model_dir, tmp_path):
    pytest.importorskip("vllm")
    from ray_ft.serving.vllm_engine import engine_cli_args, parse_engine_args

    a = make_adapter_run(tmp_path, "a", tiny_model_dir, rank=12)
    plan = resolve_plan([str(a)])
    args = parse_serve_args({"models": [str(a)], "engine": {"kv_cache_gib": 0.5, "max_num_seqs": 8}})
    ns = parse_engine_args(engine_cli_args(plan, args, "bfloat16", on_gpu=False), {"seed": 3})
    assert ns.model == str(tiny_model_dir.resolve()) and ns.served_model_name == [tiny_model_dir.name]
    assert ns.enable_lora and ns.max_lora_rank == 16 and ns.enforce_eager and ns.max_num_seqs == 8
    assert ns.kv_cache_memory_bytes == 512 << 20 and ns.max_model_len == 256 and ns.seed == 3
    assert [m.name for m in ns.lora_modules] == ["a"]
    assert ns.trust_request_chat_template and not ns.trust_remote_code
    on_gpu = parse_engine_args(engine_cli_args(plan, args, "bfloat16", on_gpu=True), {})
    assert not on_gpu.enforce_eager and on_gpu.distributed_executor_backend != "mp"
    with pytest.raises(ValueError, match="engine.extra.nonsense"):
        parse_engine_args(engine_cli_args(plan, args, "bfloat16", on_gpu=False), {"nonsense": 1})


def _completion(**body):
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    return CompletionRequest.model_validate({"prompt": "hi", **body})


def _chat(**body):
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **body})


@pytest.mark.parametrize(
    ("make", "body", "param"),
    [
        ("completion", {"max_tokens": 10**9}, "max_tokens"),
        ("chat", {"max_completion_tokens": 4, "max_tokens": 10**9}, "max_tokens"),
        ("chat", {"max_completion_tokens": 10**9}, "max_completion_tokens"),
        ("completion", {"n": 5}, "n"),
        ("completion", {"max_tokens": -1}, "max_tokens"),
        ("chat", {"max_completion_tokens": 0}, "max_completion_tokens"),
        ("completion", {"logprobs": 6}, "logprobs"),
        ("chat", {"top_logprobs": 6, "logprobs": True}, "top_logprobs"),
        ("completion", {"stop": ["x" * 65]}, "stop[0]"),
        ("completion", {"prompt": ["a"] * 17}, "prompt"),
        ("completion", {"prompt": "y" * 8001}, "prompt"),
        ("completion", {"kv_transfer_params": {"a": 1}}, "kv_transfer_params"),
        ("completion", {"surprise": 1}, "surprise"),
        ("chat", {"chat_template": "{{ 1 }}"}, "chat_template"),
        ("chat", {"messages": [{"role": "system", "content": "s"}]}, "messages"),
        ("completion", {"prompt": "\ud800"}, None),
    ],
)
def test_request_checks_refuse_with_the_parameter_named(make, body, param):
    pytest.importorskip("vllm")
    from ray_ft.serving import requests as checks
    from ray_ft.serving.args import RequestLimits
    from ray_ft.serving.errors import ApiError

    request = _completion(**body) if make == "completion" else _chat(**body)
    limits = RequestLimits()
    with pytest.raises(ApiError) as info:
        checks.check_fields(request, checks.COMPLETION_FIELDS if make == "completion" else checks.CHAT_FIELDS)
        checks.check_text(request)
        if make == "completion":
            checks.check_prompts(request, limits)
        else:
            checks.check_messages(request, limits)
        checks.check_sampling(request, limits, set(body))
    assert info.value.status == 400 and info.value.param == param, info.value.message


def test_request_defaults_are_greedy_and_bounded():
    pytest.importorskip("vllm")
    from ray_ft.serving import requests as checks
    from ray_ft.serving.args import RequestLimits

    request = _completion()
    checks.check_sampling(request, RequestLimits(max_tokens=32), {"prompt"})
    assert (request.max_tokens, request.temperature) == (32, 0.0)  # min(64, max_tokens), greedy
    chat = _chat(max_completion_tokens=8, temperature=0.5)
    checks.check_sampling(chat, RequestLimits(), {"messages", "max_completion_tokens", "temperature"})
    assert (chat.max_completion_tokens, chat.temperature) == (8, 0.5)
    checks.check_fields(_completion(logit_bias=None), checks.COMPLETION_FIELDS)  # an explicit null asks for nothing


def test_the_gate_checks_one_api_key_header_before_reading_the_body():
    import asyncio

    import httpx
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from ray_ft.serving.gate import RequestGate

    async def echo(request):
        return JSONResponse({"size": len(await request.body())})

    app = RequestGate(Starlette(routes=[Route("/v1/x", echo, methods=["POST"]), Route("/health", echo)]),
                      api_key="k", max_body_bytes=2048, body_timeout_s=5)  # fmt: skip

    async def call(headers, body=b"{}", path="/v1/x", method="POST"):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.request(method, path, headers=headers, content=body)

    def status(*args, **kwargs) -> int:
        return asyncio.run(call(*args, **kwargs)).status_code

    json_type = ("Content-Type", "application/json")
    assert status([("Authorization", "Bearer k"), json_type]) == 200
    assert status([("Authorization", "Bearer nope"), json_type]) == 401
    assert status([json_type]) == 401
    assert status([("Authorization", "Bearer nope"), ("Authorization", "Bearer k"), json_type]) == 401
    assert status([("Authorization", "Bearer k"), json_type, ("Content-Type", "text/plain")]) == 400
    assert status([("Authorization", "Bearer k"), ("Content-Type", "text/plain")]) == 415
    assert status([("Authorization", "Bearer k"), json_type], body=b"x" * 4096) == 413
    assert status([], method="GET", path="/health", body=b"") == 200


def test_errors_inside_vllms_request_validators_are_400_not_500():
    """vLLM's validators raise TypeError on some malformed bodies (found by fuzzing); the route answers 400."""
    pytest.importorskip("vllm")
    import asyncio

    import httpx
    from fastapi import FastAPI, Request
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    from ray_ft.serving.api import _client_error_route
    from ray_ft.serving.errors import install_handlers

    api = FastAPI()
    install_handlers(api)
    api.router.route_class = _client_error_route()

    async def chat(body, raw_request):
        raw_request.state.validated = True
        if body.messages[-1]["content"] == "boom":
            raise TypeError("a fault of the server")
        return {"ok": True}

    # Real annotations (this module's are strings), as api.build_api has them.
    chat.__annotations__ = {"body": ChatCompletionRequest, "raw_request": Request}
    api.post("/chat")(chat)

    async def send(messages):
        transport = httpx.ASGITransport(app=api, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.post("/chat", json={"messages": messages})

    bad = asyncio.run(send([{"role": "system", "content": None}, {"role": "user", "content": "hi"}]))
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error", bad.text
    good = asyncio.run(send([{"role": "user", "content": "hi"}]))
    assert good.status_code == 200, good.text
    assert asyncio.run(send([{"role": "user", "content": "boom"}])).status_code == 500  # still the server's


@pytest.mark.parametrize(
    ("raw", "param", "words"),
    [
        (b'{"prompt": "a", "prompt": "b"}', "prompt", "duplicated key"),
        (b'{"prompt": "a", "temperature": NaN}', None, "NaN is not a JSON number"),
        (b'{"prompt": "a", "top_p": -Infinity}', None, "-Infinity is not a JSON number"),
        (b'{"prompt": "a", "user": ' + b"[" * 100 + b"]" * 100 + b"}", None, "nested more than 64 levels"),
    ],
)
def test_request_bodies_are_parsed_strictly_like_data_and_configs(raw, param, words):
    """What FastAPI's parse lets through (the last duplicated key wins, NaN, deep nesting) is a 400 naming it."""
    import asyncio

    from starlette.requests import Request

    from ray_ft.serving.api import _sent_fields
    from ray_ft.serving.errors import ApiError

    async def receive():
        return {"type": "http.request", "body": raw, "more_body": False}

    request = Request({"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}, receive)
    with pytest.raises(ApiError) as refused:
        asyncio.run(_sent_fields(request))
    assert (refused.value.status, refused.value.param) == (400, param)
    assert words in refused.value.message


def test_a_request_past_its_deadline_is_504_and_the_queue_is_bounded(merged_artifact):
    """``request_timeout_s`` cuts a non-streaming request with 504 (its task is cancelled); the deployment bounds
    both the requests a replica holds and those Serve queues for it (past ``max_queued_requests``: 503)."""
    import asyncio
    from types import SimpleNamespace

    from ray_ft.serving.api import ModelServer
    from ray_ft.serving.app import build_app
    from ray_ft.serving.errors import ApiError

    cancelled = []

    async def slow_generation():
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    server = SimpleNamespace(args=SimpleNamespace(request_timeout_s=0.05))
    with pytest.raises(ApiError) as late:
        asyncio.run(ModelServer._deadline(server, slow_generation()))
    assert (late.value.status, late.value.code) == (504, "timeout") and cancelled == [True]

    app = build_app({"models": [str(merged_artifact)], "max_ongoing_requests": 8, "max_queued_requests": 16})
    config = app._bound_deployment._deployment_config
    assert (config.max_ongoing_requests, config.max_queued_requests) == (8, 16)
