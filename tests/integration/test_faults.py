"""Faults survived: a killed Ray Train worker and a terminated driver, each on a real run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_overrides

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def _start_training(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ray_ft.cli", "train", "jobs/lora.yaml", *args],
        cwd=REPO,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for(proc: subprocess.Popen, needle: str, log: list[str], deadline_s: float = 600) -> None:
    end = time.time() + deadline_s
    for line in proc.stdout:
        log.append(line)
        if needle in line:
            return
        if time.time() > end:
            break
    proc.kill()
    raise AssertionError(f"never saw {needle!r}:\n" + "".join(log[-40:]))


def _mlflow_run(out: Path):
    from mlflow import MlflowClient

    info = json.loads((out / "run.json").read_text())
    client = MlflowClient(info["tracking_uri"])
    return client, client.get_run(info["run_id"])


def test_killed_worker_restarts_from_checkpoint(ray_local, tiny_model_dir, qa_file, tmp_path, mlflow_dir):
    """The run joins the session's Ray (``ray_local``, started by whichever test needs it first)."""
    import ray
    from ray.util.state import list_actors

    api = f"http://{ray_local.dashboard_url}"  # explicit: other Ray instances may run on this machine
    out = tmp_path / "kill"
    args = tiny_overrides(
        tiny_model_dir,
        qa_file,
        out,
        mlflow_dir,
        **{"train.max_steps": 40, "train.eval_every": 2, "eval.enabled": "false", "scaling.max_failures": 2},
    )
    proc = _start_training(args, {"RAY_ADDRESS": ray.get_runtime_context().gcs_address})
    log: list[str] = []
    _wait_for(proc, "step 6/40", log)
    workers = [
        a
        for a in list_actors(address=api, filters=[("state", "=", "ALIVE")], detail=True)
        if a.class_name == "RayTrainWorker"
    ]
    assert len(workers) == 2, workers
    os.kill(workers[1].pid, signal.SIGKILL)
    rest, _ = proc.communicate(timeout=600)
    log.append(rest)
    text = "".join(log)
    assert proc.returncode == 0, text[-4000:]
    assert "resumed from step" in text
    assert "step 40/40" in text

    client, run = _mlflow_run(out)
    assert run.info.status == "FINISHED"
    runs = client.search_runs([run.info.experiment_id])
    assert len(runs) == 1, "a restart must not create a second MLflow run"
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "loss")}
    assert steps == set(range(1, 41))
    assert (out / "merged" / "MANIFEST.json").is_file()


def test_sigterm_keeps_checkpoint_marks_killed_and_resumes(tiny_model_dir, qa_file, tmp_path, mlflow_dir):
    out = tmp_path / "term"
    base = tiny_overrides(
        tiny_model_dir,
        qa_file,
        out,
        mlflow_dir,
        **{"train.eval_every": 2, "eval.enabled": "false", "scaling.num_workers": 1},
    )
    proc = _start_training([*base, "train.max_steps=400"], {"RAY_ADDRESS": ""})
    log: list[str] = []
    _wait_for(proc, "step 5/400", log)
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=300)
    text = "".join(log) + rest
    assert proc.returncode != 0
    assert "interrupted" in text and "--resume" in text
    assert list((out / "ray" / out.name).glob("checkpoint_*")), "checkpoint lost"
    _, run = _mlflow_run(out)
    assert run.info.status == "KILLED"

    resumed = subprocess.run(
        [sys.executable, "-m", "ray_ft.cli", "train", "jobs/lora.yaml", *base, "train.max_steps=8", "--resume"],
        cwd=REPO,
        env={**os.environ, "RAY_ADDRESS": ""},
        capture_output=True,
        text=True,
        timeout=600,
    )
    text = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, text[-4000:]
    assert "resumed from step" in text
    _, run2 = _mlflow_run(out)
    assert run2.info.run_id == run.info.run_id and run2.info.status == "FINISHED"
