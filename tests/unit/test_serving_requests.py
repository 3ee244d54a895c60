"""Serving without a cluster: the shipped Serve config, builder arguments, request models, stream stop text."""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import shutil
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from ray_ft.config import ConfigError
from ray_ft.export import ArtifactError, write_artifact
from ray_ft.serving import (
    ChatCompletionRequest,
    CompletionRequest,
    RequestLimits,
    ServeArgs,
    StopTextFilter,
    _param_of,
    build_app,
    parse_replicas,
    parse_serve_args,
    sampling_params,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def merged_artifact(tiny_model_dir, tmp_path_factory) -> Path:
    def copy_model(tmp: Path) -> None:
        for item in tiny_model_dir.iterdir():
            shutil.copy2(item, tmp / item.name)

    meta = {
        "method": "lora",
        "task": "generation",
        "artifact": "merged",
        "prompt_format": {"template": "Q: {question} A: {answer}"},
    }
    return write_artifact(tmp_path_factory.mktemp("serve-config") / "merged", copy_model, meta)


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
        args = {**app.args, "model_dir": str(merged_artifact)}
        parsed = ServeArgs.model_validate(args)  # every key in the file is a real field
        assert parsed.num_cpus <= 1 and parsed.min_replicas <= parsed.max_replicas
        built = builder(args)
        assert isinstance(built, Application)


def test_builder_arguments_are_checked_with_field_names(merged_artifact, tmp_path):
    with pytest.raises(ConfigError, match="min_replicas"):
        build_app({"model_dir": str(merged_artifact), "min_replicas": 3, "max_replicas": 2})
    with pytest.raises(ConfigError, match=r"max_replica: unknown key"):
        build_app({"model_dir": str(merged_artifact), "max_replica": 2})
    with pytest.raises(ConfigError, match="limits.max_tokens"):
        build_app({"model_dir": str(merged_artifact), "limits": {"max_tokens": 0}})
    with pytest.raises(ConfigError, match="max_ongoing_requests"):
        build_app({"model_dir": str(merged_artifact), "max_batch_size": 16, "max_ongoing_requests": 4})
    with pytest.raises(ConfigError, match="model_dir"):
        build_app({})
    with pytest.raises(ArtifactError, match="not a directory"):
        build_app({"model_dir": str(tmp_path / "missing")})
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "ray_ft.json").write_text(json.dumps({"task": "generation"}))
    with pytest.raises(ArtifactError, match="MANIFEST"):
        build_app({"model_dir": str(tmp_path / "half")})


def test_api_key_is_secret_and_empty_means_none(merged_artifact):
    args = parse_serve_args({"model_dir": str(merged_artifact), "api_key": "k-123"})
    assert "k-123" not in repr(args) and "k-123" not in str(args.model_dump())
    assert parse_serve_args({"model_dir": "x", "api_key": ""}).api_key is None
    assert args.served_model_id() == "merged"
    assert parse_serve_args({"model_dir": "x", "model_name": "m"}).served_model_id() == "m"


def test_replicas_option():
    assert parse_replicas("1:2") == (1, 2)
    assert parse_replicas("3") == (3, 3)
    for bad in ("2:1", "a:b", "0:0", "-1:2", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_replicas(bad)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": "5"}, "max_tokens"),  # strict: no string-to-int coercion
        ({"prompt": "hi", "temperature": 2.01}, "temperature"),
        ({"prompt": "hi", "top_p": 0.0}, "top_p"),
        ({"prompt": "hi", "n": 3}, "n"),
        ({"prompt": "hi", "echo": True}, "echo"),
        ({"prompt": "hi", "logit_bias": {"1": 2.0}}, "logit_bias"),
        ({"prompt": "hi", "presence_penalty": 0.5}, "presence_penalty"),
        ({"prompt": None}, "prompt"),
        ({"prompt": ["a", 1]}, "prompt[1]"),
        ({"prompt": "hi", "unknown_field": 1}, "unknown_field"),
    ],
)
def test_completion_request_rejects(body, param):
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate(body)
    deepest = max(info.value.errors(), key=lambda e: len(e["loc"]))
    assert _param_of(("body", *deepest["loc"])) == param


def test_chat_request_and_limits():
    req = ChatCompletionRequest.model_validate(
        {
            "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
            "stop": "##",
            "temperature": 1,
            "max_tokens": 5,
        }
    )
    assert req.messages[0].text() == "ab"
    params = sampling_params(req, RequestLimits(), req.max_tokens, ["Human:"])
    assert params.stop == ("Human:", "##") and params.max_new_tokens == 5 and params.temperature == 1.0
    default = sampling_params(
        ChatCompletionRequest.model_validate({"messages": req.model_dump()["messages"]}),
        RequestLimits(default_max_tokens=7),
        None,
        [],
    )
    assert default.max_new_tokens == 7 and default.temperature == 0.0 and default.top_p == 1.0
    from ray_ft.serving import ApiError

    with pytest.raises(ApiError) as info:
        sampling_params(req, RequestLimits(max_tokens=4), 5, [])
    assert info.value.status == 400 and info.value.param == "max_tokens"
    assert RequestLimits(max_tokens=4).default_tokens() == 4
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"messages": [{"role": "tool", "content": "x"}]})
    with pytest.raises(ValidationError):
        RequestLimits(max_tokens=8, default_max_tokens=9)


def earliest_stop_cut(text: str, stops: list[str]) -> str:
    """What a non-streamed answer holds: text before the earliest stop string, stripped."""
    cuts = [text.find(s) for s in stops if s in text]
    return (text[: min(cuts)] if cuts else text).strip()


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="ab \nH:", max_size=40),
    stops=st.lists(st.text(alphabet="ab \nH:", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=8),
)
def test_streamed_deltas_add_up_to_the_cut_text(text, stops, cuts):
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    stream = StopTextFilter(stops)
    sent = ""
    for piece in pieces:
        sent += stream.push(piece)
        if stream.stopped:
            break
    sent += stream.finish()
    assert sent == earliest_stop_cut(text, stops)


def test_stop_text_is_held_back_until_it_cannot_match():
    stream = StopTextFilter(["Human:"])
    assert stream.push(" Hello Hu") == "Hello"
    assert stream.push("m") == ""
    assert stream.push("an: next turn") == ""
    assert stream.stopped and stream.finish() == ""
    other = StopTextFilter(["Human:"])
    assert other.push("Hug") == "Hug"
