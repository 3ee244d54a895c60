"""Helpers for the serving tests: ports, polling, OpenAI error shape, Serve state."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest


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


def assert_openai_error(response: httpx.Response, status_range=range(400, 500)) -> dict:
    """The response is an error in ``status_range`` with exactly the OpenAI error fields."""
    assert response.status_code in status_range, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    assert {"message", "type", "param", "code"} <= set(body["error"]), body
    assert body["error"]["message"]
    return body["error"]


def running_replicas(app: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return 0
    deployment = status.deployments["ModelServer"]
    return int(deployment.replica_states.get("RUNNING", 0))


def starting_replicas(app: str) -> int:
    """Replicas of ``app`` being started (constructor, engine load) or pending a node."""
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return 0
    states = status.deployments["ModelServer"].replica_states
    return int(states.get("STARTING", 0)) + int(states.get("PENDING_ALLOCATION", 0))


def replica_pids(state_api: str, app: str) -> dict[str, int]:
    """Alive replica actors of ``app`` -> their process ids (from Ray's state API)."""
    from ray.util.state import list_actors

    actors = list_actors(address=state_api, filters=[("state", "=", "ALIVE")], detail=True, limit=1000)
    return {a.actor_id: a.pid for a in actors if a.class_name == f"ServeReplica:{app}:ModelServer"}


def fuzz_openapi(url: str, api_key: str, workdir: Path, max_examples: int) -> str:
    """Schemathesis over every route of ``url``'s own OpenAPI schema, valid and invalid requests alike; fails
    on any 5xx or any response that does not conform to the schema (status code, content type, body).
    Returns its report."""
    checks = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
    cmd = [
        str(Path(sys.executable).with_name("st")),
        "run",
        f"{url}/openapi.json",
        "--header",
        f"Authorization: Bearer {api_key}",
        "--checks",
        checks,
        "--max-examples",
        str(max_examples),
        "--request-timeout",
        "60",
        "--generation-deterministic",
        # One worker thread: Hypothesis raises the interpreter-wide recursion limit while it runs, and on CPython
        # 3.11 a second thread parsing source at that moment fails with "AST constructor recursion depth mismatch".
        "--workers",
        "1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=workdir)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-2000:]
    return proc.stdout
