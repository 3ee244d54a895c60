"""What vLLM cannot serve, served by the transformers engine over real HTTP: a prompt-tuning export
(completions, chat, streaming) and a linear-probe classifier (``/v1/classify``)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from ray_ft.export import write_artifact
from tests.conftest import REPO, tiny_overrides
from tests.integration.serving_helpers import assert_openai_error, free_port, fuzz_openapi, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def serve_port(ray_local):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()


def deploy(models: list[Path], name: str, port: int) -> str:
    from ray import serve

    from ray_ft.serving import build_app

    serve.run(build_app({"models": [str(m) for m in models], "max_replicas": 1, "num_cpus": 0.5}), name=name,
              route_prefix=f"/{name}", blocking=False)  # fmt: skip
    url = f"http://127.0.0.1:{port}/{name}"
    wait_until(lambda: httpx.get(f"{url}/health", timeout=5).status_code == 200, 180, f"{name} /health")
    return url


def test_a_prompt_tuning_export_serves_completions_chat_and_streams(tiny_model_dir, qa_file, tmp_path, serve_port):
    from ray import serve

    from ray_ft.config import load_config
    from ray_ft.inference import Generator
    from ray_ft.job import run_training

    out = tmp_path / "soft-prompt"
    extra = {"train.max_steps": 2, "method.num_virtual_tokens": 4, "eval.enabled": "false", "scaling.num_workers": 0}
    overrides = tiny_overrides(tiny_model_dir, qa_file, out, tmp_path / "mlflow", **extra)
    run_training(load_config(REPO / "jobs/prompt_tuning.yaml", overrides))
    url = deploy([out], "pt", serve_port)
    try:
        health = httpx.get(f"{url}/health", timeout=10).json()
        assert (health["engine"], health["models"]) == ("transformers", ["soft-prompt"])
        question = "LoRA là gì?"
        chat = {"messages": [{"role": "user", "content": question}], "max_tokens": 6}
        answer = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=120).json()
        expected = Generator.load(out / "export", prefer_gpu=False).answer([question], max_new_tokens=6)[0]
        assert answer["choices"][0]["message"]["content"] == expected
        assert answer["model"] == "soft-prompt" and answer["usage"]["completion_tokens"] >= 1
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**chat, "stream": True}, timeout=120) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and expected in "".join(lines)
        completion = {"prompt": f"Human: {question} Assistant:", "max_tokens": 4}
        assert httpx.post(f"{url}/v1/completions", json=completion, timeout=120).json()["choices"][0]["text"]
        error = assert_openai_error(httpx.post(f"{url}/v1/completions", json={**completion, "echo": True}, timeout=30))
        assert error["param"] == "echo"
        bad = b'{"prompt": "\\ud800", "max_tokens": 2}'
        headers = {"Content-Type": "application/json"}
        assert_openai_error(httpx.post(f"{url}/v1/completions", content=bad, headers=headers, timeout=30))
        assert_openai_error(httpx.post(f"{url}/v1/classify", json={"input": "hi"}, timeout=30))
    finally:
        serve.delete("pt")


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


def test_a_linear_probe_classifies(tiny_model_dir, tmp_path, serve_port):
    from ray import serve

    labels = ["greeting", "question", "complaint"]
    probe = make_probe_artifact(tiny_model_dir, tmp_path / "intent-probe", labels)
    url = deploy([probe], "classifier", serve_port)
    try:
        texts = ["xin chào", "LoRA là gì?", "dịch vụ quá tệ"]
        response = httpx.post(f"{url}/v1/classify", json={"model": "intent-probe", "input": texts}, timeout=60)
        assert response.status_code == 200, response.text
        data = response.json()["data"]
        assert [d["index"] for d in data] == [0, 1, 2]
        for item in data:
            assert set(item["probabilities"]) == set(labels)
            assert abs(sum(item["probabilities"].values()) - 1) < 1e-4
            assert item["label"] == max(item["probabilities"], key=item["probabilities"].get)
        single = httpx.post(f"{url}/v1/classify", json={"input": "xin chào"}, timeout=60).json()["data"]
        assert single[0]["probabilities"] == pytest.approx(data[0]["probabilities"], abs=1e-5)
        assert_openai_error(httpx.post(f"{url}/v1/classify", json={"input": ["ok", ""]}, timeout=30))
        assert_openai_error(httpx.post(f"{url}/v1/classify", json={"input": ["ok"] * 17}, timeout=30))
        chat = {"messages": [{"role": "user", "content": "hi"}]}
        error = assert_openai_error(httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=30))
        assert "classifier" in error["message"]
    finally:
        serve.delete("classifier")


def test_cli_serves_until_sigterm_and_exits_zero(tiny_model_dir, tmp_path):
    """``ray-ft serve`` in its own process (its own local Ray): answers, survives schema fuzzing, then stops
    cleanly on SIGTERM."""
    import os
    import signal
    import subprocess
    import sys

    probe = make_probe_artifact(tiny_model_dir, tmp_path / "probe" / "export", ["a", "b"])
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_FT_API_KEY"] = "from-env"
    cmd = [sys.executable, "-m", "ray_ft.cli", "serve", str(probe), "--port", str(port), "--replicas", "1:1",
           "--num-cpus", "0.5", "--model-name", "cli-model"]  # fmt: skip
    log_path = tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        try:

            def healthy() -> bool:
                if proc.poll() is not None:
                    pytest.fail(f"ray-ft serve exited early ({proc.returncode}):\n{log_path.read_text()}")
                try:
                    return httpx.get(f"{url}/health", timeout=5).status_code == 200
                except httpx.TransportError:
                    return False

            wait_until(healthy, 240, "ray-ft serve to answer /health", interval_s=1)
            assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401
            models = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer from-env"}, timeout=10).json()
            assert models["data"][0]["id"] == "cli-model"
            # The launched command's own endpoint, fuzzed from its schema: no 5xx, every response conforms.
            report = fuzz_openapi(url, "from-env", tmp_path, max_examples=15)
            assert "/v1/classify" in report
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=120) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    output = log_path.read_text()
    assert f"http://127.0.0.1:{port}/v1" in output and "[ray-ft] stopped" in output
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=5)


def test_cli_refuses_what_it_cannot_serve_in_one_line(tiny_model_dir, tmp_path):
    import subprocess
    import sys

    missing = subprocess.run([sys.executable, "-m", "ray_ft.cli", "serve", str(tmp_path / "nope")],
                             capture_output=True, text=True, cwd=REPO, timeout=300)  # fmt: skip
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0, missing.stderr
    assert "not a directory" in missing.stderr and "Traceback" not in missing.stderr
