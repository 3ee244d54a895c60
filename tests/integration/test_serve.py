"""Ray Serve over real HTTP on 127.0.0.1: the OpenAI client, bad input, API key, load and autoscaling, the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from ray_ft.export import write_artifact

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
MODEL_ID = "tiny-qa"
PROMPT_FORMAT = {"template": "Human: {question} Assistant: {answer}", "use_chat_template": False}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition, timeout_s: float, what: str, interval_s: float = 0.5):
    """Poll ``condition()`` until it returns a truthy value; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval_s)
    pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what} (last: {last!r})")


def make_merged_artifact(tiny_model_dir: Path, out_dir: Path) -> Path:
    """A ``merged`` LoRA artifact (metadata + manifest) holding the tiny model; no training needed."""

    def copy_model(tmp: Path) -> None:
        for item in tiny_model_dir.iterdir():
            if item.is_file():
                shutil.copy2(item, tmp / item.name)

    meta = {
        "method": "lora",
        "task": "generation",
        "artifact": "merged",
        "base_model": str(tiny_model_dir),
        "prompt_format": PROMPT_FORMAT,
    }
    return write_artifact(out_dir, copy_model, meta)


@pytest.fixture(scope="module")
def artifact(tiny_model_dir, tmp_path_factory) -> Path:
    return make_merged_artifact(tiny_model_dir, tmp_path_factory.mktemp("serve") / MODEL_ID)


@pytest.fixture(scope="module")
def serve_port(ray_local):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()


def deploy(artifact: Path, name: str, route_prefix: str, **args):
    """``serve.run`` one app from ``build_app`` and wait until it answers."""
    from ray import serve

    from ray_ft.serving import build_app

    settings = {"model_dir": str(artifact), "min_replicas": 1, "max_replicas": 1, **args}
    serve.run(build_app(settings), name=name, route_prefix=route_prefix, blocking=False)


@pytest.fixture(scope="module")
def base_url(artifact, serve_port) -> str:
    from ray import serve

    deploy(artifact, "chat", "/", max_batch_size=8, batch_wait_timeout_s=0.05)
    url = f"http://127.0.0.1:{serve_port}"
    wait_until(lambda: httpx.get(f"{url}/health", timeout=5).status_code == 200, 60, "/health")
    yield url
    serve.delete("chat")


def assert_openai_error(response: httpx.Response, status_range=range(400, 500)) -> dict:
    assert response.status_code in status_range, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"]
    return body["error"]


def test_openai_client_completions_chat_and_streaming(base_url, artifact):
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=60, max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL_ID]

    completion = client.completions.create(model=MODEL_ID, prompt="Human: LoRA là gì? Assistant:", max_tokens=8)
    assert completion.object == "text_completion"
    assert isinstance(completion.choices[0].text, str)
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage.prompt_tokens > 0
    assert completion.usage.completion_tokens <= 8

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "LoRA là gì?"}]
    chat = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=12)
    answer = chat.choices[0].message.content
    assert chat.choices[0].message.role == "assistant"
    assert "Human:" not in answer  # the template's next turn is cut, as in `ray-ft generate`

    # Same prompt template and stop text as `ray-ft generate`: greedy answers match the Generator.
    from ray_ft.inference import Generator

    generator = Generator.load(artifact)
    assert answer == generator.answer(["LoRA là gì?"], max_new_tokens=12)[0]

    stream = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=12, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == answer

    text_stream = client.completions.create(
        model=MODEL_ID,
        prompt="Human: LoRA là gì? Assistant:",
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces = list(text_stream)
    assert pieces[-1].usage is not None and pieces[-1].usage.prompt_tokens == completion.usage.prompt_tokens
    assert "".join(p.choices[0].text for p in pieces if p.choices) == completion.choices[0].text


def test_raw_sse_stream_ends_with_done(base_url):
    body = {"messages": [{"role": "user", "content": "What is DeepSpeed ZeRO?"}], "max_tokens": 6, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines), lines
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_health_models_and_classify_on_generation_model(base_url):
    for path in ("/health", "/v1/health"):
        response = httpx.get(base_url + path, timeout=10)
        assert response.status_code == 200 and response.json()["status"] == "ok"
    models = httpx.get(f"{base_url}/v1/models", timeout=10).json()
    assert models["object"] == "list" and models["data"][0]["id"] == MODEL_ID
    error = assert_openai_error(httpx.post(f"{base_url}/v1/classify", json={"input": "xin chào"}, timeout=10))
    assert "not a classifier" in error["message"]


BAD_REQUESTS = [
    # (path, body or raw bytes, headers, expected status, param named in the error)
    ("/v1/completions", b"{not json", None, 400, None),
    ("/v1/completions", b"", None, 400, None),
    ("/v1/completions", b"[1, 2]", None, 400, None),
    ("/v1/completions", {"max_tokens": 4}, None, 400, "prompt"),
    ("/v1/completions", {"prompt": 123}, None, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "ten"}, None, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, None, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 100000}, None, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": 2.5}, None, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, None, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, None, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "top_p": 1.5}, None, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "n": 2}, None, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, None, 400, "stream"),
    ("/v1/completions", {"prompt": "hi", "surprise": 1}, None, 400, "surprise"),
    ("/v1/completions", {"prompt": ""}, None, 400, "prompt"),
    ("/v1/completions", {"prompt": "   "}, None, 400, "prompt"),
    ("/v1/completions", {"prompt": "x" * 100_000}, None, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, None, 400, "prompt"),
    ("/v1/completions", {"prompt": "word " * 1000}, None, 400, "prompt"),  # longer than the 256-token context
    ("/v1/completions", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, None, 400, "stop"),
    ("/v1/completions", {"prompt": "hi", "model": "../../etc/passwd"}, None, 404, "model"),
    ("/v1/completions", b'{"prompt": "hi"}', {"content-type": "text/plain"}, 415, None),
    ("/v1/chat/completions", {"messages": []}, None, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hello"}, None, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, None, 400, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, None, 400, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "hi"}]}, None, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": ""}]}, None, 400, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "y" * 100_000}]}, None, 400, "messages"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 10**6},
        None,
        400,
        "max_completion_tokens",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
        None,
        400,
        "messages[0].content[0].type",
    ),
    ("/v1/classify", {"input": 5}, None, 400, "input"),
    ("/v1/completions", {"prompt": "z" * 2_000_000}, None, 413, None),  # over the 1 MiB body limit
    ("/v1/nothing-here", {"prompt": "hi"}, None, 404, None),
]


def test_bad_input_is_4xx_with_openai_error_and_server_stays_healthy(base_url):
    failures = []
    with httpx.Client(base_url=base_url, timeout=30) as client:
        for path, body, headers, status, param in BAD_REQUESTS:
            if isinstance(body, bytes):
                response = client.post(path, content=body, headers=headers or {"content-type": "application/json"})
            else:
                response = client.post(path, json=body, headers=headers)
            try:
                error = assert_openai_error(response, range(status, status + 1))
                assert error["param"] == param, (error["param"], param)
            except AssertionError as e:
                failures.append(f"{path} {str(body)[:80]!r}: {e}")
        chunked = iter([b'{"prompt": "', b"z" * 700_000, b"z" * 700_000, b'"}'])  # no Content-Length
        assert_openai_error(
            client.post("/v1/completions", content=chunked, headers={"content-type": "application/json"}),
            range(413, 414),
        )
        assert client.get("/v1/completions").status_code == 405
        assert client.get("/health").status_code == 200
        ok = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert ok.status_code == 200, ok.text
    assert not failures, "\n".join(failures)


def test_api_key_required_except_health(artifact, serve_port):
    from openai import AuthenticationError, OpenAI
    from ray import serve

    deploy(artifact, "secured", "/secured", api_key="s3cret-key")
    url = f"http://127.0.0.1:{serve_port}/secured"
    try:
        wait_until(lambda: httpx.get(f"{url}/health", timeout=5).status_code == 200, 60, "secured /health")
        body = {"prompt": "hi", "max_tokens": 2}
        error = assert_openai_error(httpx.post(f"{url}/v1/completions", json=body, timeout=30), range(401, 402))
        assert error["code"] == "invalid_api_key"
        wrong = {"Authorization": "Bearer wrong"}
        assert httpx.post(f"{url}/v1/completions", json=body, headers=wrong, timeout=30).status_code == 401
        assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 401
        malformed = httpx.post(f"{url}/v1/completions", content=b"{oops", timeout=30)
        assert malformed.status_code == 401  # the key is checked before the body is read

        with pytest.raises(AuthenticationError):
            OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).completions.create(
                model=MODEL_ID, prompt="hi", max_tokens=2
            )
        client = OpenAI(base_url=f"{url}/v1", api_key="s3cret-key", timeout=60, max_retries=0)
        assert client.completions.create(model=MODEL_ID, prompt="hi", max_tokens=2).choices
        good = {"Authorization": "Bearer s3cret-key"}
        assert httpx.post(f"{url}/v1/completions", json=body, headers=good, timeout=30).status_code == 200
    finally:
        serve.delete("secured")


def make_probe_artifact(tiny_model_dir: Path, out_dir: Path, labels: list[str]) -> Path:
    """A linear-probe classifier artifact on the tiny backbone, with a random head (no training needed)."""
    import torch
    from transformers import AutoTokenizer

    from ray_ft.methods.linear_probe import ProbeHead, save_head

    info = {"labels": labels, "pooling": "mean", "layer": -1, "max_length": 64, "hidden_size": 64}
    torch.manual_seed(0)
    head = ProbeHead(64, len(labels), info)

    def write(tmp: Path) -> None:
        save_head(head, tmp)
        AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp)

    meta = {
        "method": "linear_probe",
        "task": "classification",
        "artifact": "export",
        "base_model": str(tiny_model_dir),
        "base_model_dir": str(tiny_model_dir),
        "labels": labels,
    }
    return write_artifact(out_dir, write, meta)


def test_classify_with_a_linear_probe_artifact(tiny_model_dir, tmp_path, serve_port):
    from ray import serve

    labels = ["greeting", "question", "complaint"]
    probe = make_probe_artifact(tiny_model_dir, tmp_path / "intent-probe", labels)
    deploy(probe, "classifier", "/classifier")
    url = f"http://127.0.0.1:{serve_port}/classifier"
    try:
        wait_until(lambda: httpx.get(f"{url}/health", timeout=5).status_code == 200, 60, "classifier /health")
        assert httpx.get(f"{url}/health", timeout=10).json()["task"] == "classification"
        texts = ["xin chào", "LoRA là gì?", "dịch vụ quá tệ"]
        response = httpx.post(f"{url}/v1/classify", json={"model": "intent-probe", "input": texts}, timeout=60)
        assert response.status_code == 200, response.text
        data = response.json()["data"]
        assert [d["index"] for d in data] == [0, 1, 2]
        for item in data:
            assert item["label"] in labels
            assert set(item["probabilities"]) == set(labels)
            assert abs(sum(item["probabilities"].values()) - 1) < 1e-4
            assert item["label"] == max(item["probabilities"], key=item["probabilities"].get)
        single = httpx.post(f"{url}/v1/classify", json={"input": "xin chào"}, timeout=60).json()["data"]
        assert single[0]["probabilities"] == pytest.approx(data[0]["probabilities"], abs=1e-5)
        assert_openai_error(httpx.post(f"{url}/v1/classify", json={"input": ["ok", ""]}, timeout=30))
        chat = {"messages": [{"role": "user", "content": "hi"}]}
        error = assert_openai_error(httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=30))
        assert "classifier" in error["message"]
    finally:
        serve.delete("classifier")


async def _fire(url: str, total: int, concurrency: int) -> list[int]:
    """``total`` mixed requests (completions, chat, streaming chat), ``concurrency`` at a time."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    semaphore = asyncio.Semaphore(concurrency)
    statuses: list[int] = []

    async def one(client: httpx.AsyncClient, i: int) -> None:
        async with semaphore:
            question = f"Câu hỏi số {i}: LoRA là gì?"
            if i % 4 == 3:
                body = {"messages": [{"role": "user", "content": question}], "max_tokens": 4, "stream": True}
                async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                    text = "".join([line async for line in response.aiter_lines()])
                    statuses.append(response.status_code if text.rstrip().endswith("[DONE]") else 599)
            elif i % 2:
                body = {"messages": [{"role": "user", "content": question}], "max_tokens": 4}
                statuses.append((await client.post("/v1/chat/completions", json=body)).status_code)
            else:
                body = {"prompt": question, "max_tokens": 4, "temperature": 0.7 if i % 3 else 0.0}
                statuses.append((await client.post("/v1/completions", json=body)).status_code)

    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(120.0), limits=limits) as client:
        await asyncio.gather(*(one(client, i) for i in range(total)))
    return statuses


def test_200_concurrent_requests_no_server_errors(base_url):
    statuses = asyncio.run(_fire(base_url, total=200, concurrency=200))
    assert len(statuses) == 200
    assert [s for s in statuses if s != 200] == []
    assert httpx.get(f"{base_url}/health", timeout=10).status_code == 200


SOAK_VALID = [
    ("/v1/completions", {"prompt": "Human: LoRA là gì? Assistant:", "max_tokens": 4}, False),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "QLoRA là gì?"}], "max_tokens": 4}, False),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Prompt tuning?"}], "max_tokens": 4, "stream": True},
        True,
    ),
]
SOAK_INVALID = [(path, body, headers, status) for path, body, headers, status, _ in BAD_REQUESTS] + [
    ("/v1/completions", b"prompt=hi", {"content-type": "application/x-www-form-urlencoded"}, 415),
    ("/v1/completions", b'{"prompt": "hi"', None, 400),  # truncated JSON
    ("/v1/completions", b"\xff\xfe{}", None, 400),  # not UTF-8
    ("/v1/chat/completions", b"null", None, 400),
]


async def _soak(url: str, total: int, concurrency: int) -> list[str]:
    """``total`` requests, half valid and half invalid, shuffled; returns one line per unexpected answer."""
    rng = random.Random(0)
    cases = [
        ("valid", *SOAK_VALID[i % len(SOAK_VALID)]) if i % 2 == 0 else ("invalid", *SOAK_INVALID[i % len(SOAK_INVALID)])
        for i in range(total)
    ]
    rng.shuffle(cases)
    semaphore = asyncio.Semaphore(concurrency)
    problems: list[str] = []
    answered = 0

    async def one(client: httpx.AsyncClient, case: tuple) -> None:
        nonlocal answered
        async with semaphore:
            if case[0] == "valid":
                _, path, body, stream = case
                if stream:
                    async with client.stream("POST", path, json=body) as response:
                        text = "".join([line async for line in response.aiter_lines()])
                    ok = response.status_code == 200 and text.rstrip().endswith("[DONE]")
                else:
                    response = await client.post(path, json=body)
                    ok = response.status_code == 200
                expected = 200
            else:
                _, path, body, headers, expected = case
                if isinstance(body, bytes):
                    headers = headers or {"content-type": "application/json"}
                    response = await client.post(path, content=body, headers=headers)
                else:
                    response = await client.post(path, json=body, headers=headers)
                ok = response.status_code == expected
            answered += 1
            if not ok:
                problems.append(f"{path} {str(body)[:60]!r}: expected {expected}, got {response.status_code}")

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(120.0), limits=limits) as client:
        await asyncio.gather(*(one(client, case) for case in cases))
    assert answered == total
    return problems


def test_1000_mixed_valid_and_invalid_requests_never_5xx(base_url):
    """Valid bodies get 200, each invalid one its own 4xx (never a 5xx), and the endpoint stays healthy."""
    problems = asyncio.run(_soak(base_url, total=1000, concurrency=16))
    assert problems == [], "\n".join(problems[:20])
    assert httpx.get(f"{base_url}/health", timeout=10).status_code == 200
    ok = httpx.post(f"{base_url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200, ok.text


def running_replicas(app: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return 0
    deployment = status.deployments["ModelServer"]
    return int(deployment.replica_states.get("RUNNING", 0))


def test_autoscales_from_one_to_two_replicas_under_load(artifact, serve_port):
    from ray import serve

    deploy(
        artifact,
        "scaling",
        "/scaling",
        min_replicas=1,
        max_replicas=2,
        target_ongoing_requests=1,
        upscale_delay_s=1,
        downscale_delay_s=600,
        look_back_period_s=12,
        max_batch_size=1,
        max_ongoing_requests=4,
    )
    url = f"http://127.0.0.1:{serve_port}/scaling"
    try:
        wait_until(lambda: running_replicas("scaling") == 1, 60, "one running replica")

        async def sustained_load(stop: asyncio.Event) -> list[int]:
            statuses: list[int] = []
            body = {"prompt": "Human: What is prompt tuning? Assistant:", "max_tokens": 32}
            async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(120.0)) as client:

                async def worker() -> None:
                    while not stop.is_set():
                        statuses.append((await client.post("/v1/completions", json=body)).status_code)

                await asyncio.gather(*(worker() for _ in range(8)))
            return statuses

        async def load_until_scaled() -> tuple[int, list[int]]:
            stop = asyncio.Event()
            load = asyncio.create_task(sustained_load(stop))
            deadline = time.monotonic() + 120
            replicas = 1
            while time.monotonic() < deadline and replicas < 2:
                await asyncio.sleep(1)
                replicas = await asyncio.to_thread(running_replicas, "scaling")
            stop.set()
            return replicas, await load

        replicas, statuses = asyncio.run(load_until_scaled())
        assert replicas == 2, "the deployment did not scale to 2 replicas under sustained load within 120s"
        assert statuses and all(s == 200 for s in statuses)
    finally:
        serve.delete("scaling")


def test_cli_serves_until_sigterm_and_exits_zero(artifact, tmp_path):
    """``ray-ft serve`` in its own process (its own local Ray): answers, then stops cleanly on SIGTERM."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_FT_API_KEY"] = "from-env"
    cmd = [
        sys.executable,
        "-m",
        "ray_ft.cli",
        "serve",
        str(artifact),
        "--port",
        str(port),
        "--replicas",
        "1:1",
        "--model-name",
        "cli-model",
    ]
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:

        def healthy() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"ray-ft serve exited early ({proc.returncode}):\n{(tmp_path / 'serve.log').read_text()}")
            try:
                return httpx.get(f"{url}/health", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(healthy, 180, "ray-ft serve to answer /health", interval_s=1)
        assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401
        models = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer from-env"}, timeout=10).json()
        assert models["data"][0]["id"] == "cli-model"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        log.close()
    output = (tmp_path / "serve.log").read_text()
    assert f"http://127.0.0.1:{port}/v1" in output
    assert "[ray-ft] stopped" in output
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=5)


def replica_pids(state_api: str, app: str) -> dict[str, int]:
    """Alive replica actors of ``app`` -> their process ids (from Ray's state API)."""
    from ray.util.state import list_actors

    actors = list_actors(address=state_api, filters=[("state", "=", "ALIVE")], detail=True, limit=1000)
    return {a.actor_id: a.pid for a in actors if a.class_name == f"ServeReplica:{app}:ModelServer"}


def test_killed_replica_is_replaced_and_requests_recover(artifact, serve_port, ray_local):
    """SIGKILL one of two replicas: the other keeps answering, Serve starts a replacement, no redeploy."""
    from ray import serve

    state_api = f"http://{ray_local.dashboard_url}"
    deploy(artifact, "fragile", "/fragile", min_replicas=2, max_replicas=2)
    url = f"http://127.0.0.1:{serve_port}/fragile"
    body = {"prompt": "Human: LoRA là gì? Assistant:", "max_tokens": 4}
    try:
        wait_until(lambda: running_replicas("fragile") == 2, 120, "two running replicas")
        before = wait_until(lambda: len(pids := replica_pids(state_api, "fragile")) == 2 and pids, 30, "replica pids")
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200

        victim_id, victim_pid = next(iter(before.items()))
        os.kill(victim_pid, signal.SIGKILL)
        statuses: list[int] = []

        def replaced() -> bool:
            statuses.append(httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code)
            now = replica_pids(state_api, "fragile")
            return victim_id not in now and len(now) == 2 and running_replicas("fragile") == 2

        wait_until(replaced, 180, "a replacement replica")
        after = replica_pids(state_api, "fragile")
        assert victim_pid not in after.values() and set(after) - set(before), (before, after)
        # At most the request that was on the killed replica fails; everything else is answered.
        assert sum(s != 200 for s in statuses) <= 1, statuses
        recovered = [httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code for _ in range(10)]
        assert recovered == [200] * 10
        assert serve.status().applications["fragile"].status == "RUNNING"
    finally:
        serve.delete("fragile")
