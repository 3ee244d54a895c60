"""A real two-node Ray cluster on this machine (cluster/local-up.sh) running ray-ft as Ray Jobs.

One cluster serves the whole module: a head and a worker node with 1 logical CPU each, so the two
Ray Train workers of a 2-worker job (1 CPU each) land on different nodes. Jobs go in through
``ray-ft submit`` and through the plain ``ray job submit`` CLI, with token authentication on; the
last test stops the cluster with cluster/local-down.sh and checks that none of its processes is left.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import QA_ROWS, tiny_overrides, write_jsonl

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).with_name("ray")
RAY_FT = [sys.executable, "-m", "ray_ft.cli"]
JOB_TIMEOUT_S = 1500
CLIENT_VARS = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")


@dataclass
class LocalCluster:
    env: dict[str, str]
    """Environment for clients and the cluster scripts: the scripts' settings plus the state file's addresses."""
    state: dict[str, str]
    state_dir: Path
    shared: Path
    """A directory every node reads and writes (data, checkpoints, MLflow store, outputs)."""

    @property
    def api(self) -> str:
        return self.state["RAY_API_SERVER_ADDRESS"]

    def get(self, path: str, token: bool = True) -> dict:
        """GET a Jobs/State API path; JSON body."""
        token_value = Path(self.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
        headers = {"Authorization": f"Bearer {token_value}"} if token else {}
        with urllib.request.urlopen(urllib.request.Request(self.api + path, headers=headers), timeout=30) as resp:
            return json.loads(resp.read())

    def actors(self, class_name: str, job_id: str) -> list[dict]:
        query = f"limit=1000&detail=1&filter_keys=class_name&filter_predicates=%3D&filter_values={class_name}"
        rows = self.get(f"/api/v0/actors?{query}")["data"]["result"]["result"]
        return [a for a in rows if a["job_id"] == job_id]

    def sessions(self) -> set[str]:
        return set(self.state["RAY_FT_CLUSTER_SESSIONS"].split())


def read_state(path: Path) -> dict[str, str]:
    state = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            state[key.strip()] = value.strip().strip('"')
    return state


def free_port_block(size: int) -> int:
    """The first port of ``size`` consecutive ports that nothing on this machine listens on."""
    for _ in range(50):
        base = random.randrange(20000, 32000 - size, 500)  # below the ephemeral range
        try:
            for port in range(base, base + size):
                with socket.socket() as s:
                    s.bind(("0.0.0.0", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free block of ports")


def processes_in_sessions(sessions: set[str]) -> list[str]:
    ps = subprocess.run(["ps", "-eo", "pid=,sid=,stat=,args="], capture_output=True, text=True, check=True)
    rows = [line.split(None, 3) for line in ps.stdout.splitlines()]
    return [" ".join(r) for r in rows if len(r) >= 3 and r[1] in sessions and not r[2].startswith("Z")]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[LocalCluster]:
    base = free_port_block(402)  # 2 nodes x 200 ports, then the GCS and dashboard ports
    state_dir = tmp_path_factory.mktemp("cluster")
    env = {k: v for k, v in os.environ.items() if k not in (*CLIENT_VARS, "RAY_AUTH_TOKEN")}
    env.update(
        RAY_FT_RAY=str(RAY),
        RAY_FT_CLUSTER_DIR=str(state_dir),
        RAY_FT_PORT_BASE=str(base),
        RAY_FT_GCS_PORT=str(base + 400),
        RAY_FT_DASHBOARD_PORT=str(base + 401),
        RAY_FT_HEAD_CPUS="1",
        RAY_FT_WORKER_CPUS="1",
        RAY_FT_OBJECT_STORE_MB="100",
        RAY_FT_RAY_TEMP_DIR=f"/tmp/rft-{base}",
        RAY_AUTH_TOKEN_PATH=str(state_dir / "auth_token"),  # a token of this cluster, created by local-up.sh
    )
    up = subprocess.run(
        ["bash", str(REPO / "cluster/local-up.sh")], env=env, capture_output=True, text=True, timeout=900
    )
    state_file = state_dir / "cluster.env"
    try:
        assert up.returncode == 0, f"local-up.sh failed:\n{up.stdout}\n{up.stderr}"
        state = read_state(state_file)
        env.update({k: state[k] for k in CLIENT_VARS if k in state})
        shared = tmp_path_factory.mktemp("shared")
        write_jsonl(shared / "qa.jsonl", QA_ROWS)
        yield LocalCluster(env=env, state=state, state_dir=state_dir, shared=shared)
    finally:
        if state_file.exists():  # test_cluster_stops_cleanly normally stopped it already
            subprocess.run(["bash", str(REPO / "cluster/local-down.sh"), "--purge"], env=env, timeout=600)


def overrides(cluster: LocalCluster, model_dir: Path, name: str, **extra) -> list[str]:
    shared = cluster.shared
    return tiny_overrides(
        model_dir,
        shared / "qa.jsonl",
        shared / name,
        shared / "mlflow",
        **{"train.max_steps": 2, "eval.enabled": "false", "scaling.storage_path": shared / "ray", **extra},
    )


def mlflow_run(cluster: LocalCluster, run_name: str):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{cluster.shared / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ray-ft")
    runs = client.search_runs([experiment.experiment_id], f"tags.mlflow.runName = '{run_name}'")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


def test_two_nodes_alive_and_token_required(cluster):
    nodes = cluster.get("/api/v0/nodes?limit=100")["data"]["result"]["result"]
    alive = [n for n in nodes if n["state"] == "ALIVE"]
    assert len(alive) == 2 and sorted(n["is_head_node"] for n in alive) == [False, True], nodes
    with pytest.raises(urllib.error.HTTPError) as e:
        cluster.get("/api/jobs/", token=False)
    assert e.value.code == 401


def test_ray_ft_submit_trains_on_both_nodes(cluster, tiny_model_dir):
    out = cluster.shared / "run-submit"
    args = overrides(cluster, tiny_model_dir, "run-submit", **{"scaling.num_workers": 2, "scaling.cpus_per_worker": 1})
    r = subprocess.run(
        [*RAY_FT, "submit", "jobs/lora.yaml", "--", *args],
        cwd=REPO,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
    )
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-6000:]
    assert "[ray-ft] step 2/2" in r.stdout, "the job's logs were not streamed"
    submission_id = re.search(r"job (raysubmit_\w+) SUCCEEDED", r.stdout).group(1)
    assert (out / "merged" / "config.json").is_file()

    client, run = mlflow_run(cluster, "run-submit")
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [1, 2]

    # The two Ray Train workers ran on the two nodes (1 CPU each, 1 CPU per worker).
    job = cluster.get(f"/api/jobs/{submission_id}")
    assert job["status"] == "SUCCEEDED" and job["metadata"]["ray_ft.config"] == "jobs/lora.yaml"
    workers = cluster.actors("RayTrainWorker", job["job_id"])
    assert len(workers) == 2 and len({w["node_id"] for w in workers}) == 2, workers


def test_ray_job_submit_cli_trains(cluster, tiny_model_dir):
    out = cluster.shared / "run-cli"
    args = overrides(cluster, tiny_model_dir, "run-cli", **{"scaling.num_workers": 1, "scaling.cpus_per_worker": 1})
    r = subprocess.run(
        [
            *(str(RAY), "job", "submit", "--address", cluster.api, "--working-dir", "."),
            *("--runtime-env", "cluster/runtime_env.yaml", "--", "ray-ft", "train", "jobs/lora.yaml", *args),
        ],
        cwd=REPO,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    assert re.search(r"Job 'raysubmit_\w+' succeeded", r.stdout + r.stderr)
    assert (out / "merged" / "config.json").is_file()
    _, run = mlflow_run(cluster, "run-cli")
    assert run.info.status == "FINISHED"


def test_bad_config_fails_locally_and_on_the_cluster(cluster, tmp_path):
    bad = ["train.lrr=1e-3", f"output_dir={tmp_path / 'bad'}"]
    # Validated before anything is uploaded: no cluster is needed to refuse it.
    local = subprocess.run(
        [*RAY_FT, "submit", "--address", "http://127.0.0.1:9", "jobs/lora.yaml", *bad],
        cwd=REPO,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert local.returncode == 2, local.stdout + local.stderr
    assert "train.lrr: unknown key" in local.stderr

    remote = subprocess.run(
        [*RAY_FT, "submit", "--no-local-check", "jobs/lora.yaml", *bad],
        cwd=REPO,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
    )
    assert remote.returncode == 1, remote.stdout + remote.stderr
    submission_id = re.search(r"job (raysubmit_\w+) FAILED", remote.stdout).group(1)
    assert cluster.get(f"/api/jobs/{submission_id}")["status"] == "FAILED"
    logs = cluster.get(f"/api/jobs/{submission_id}/logs")["logs"]
    assert "jobs/lora.yaml (with overrides): train.lrr: unknown key" in logs
    assert not (tmp_path / "bad").exists()


def test_cluster_stops_cleanly(cluster):
    """Runs last: local-down.sh stops exactly this cluster and leaves none of its processes."""
    sessions = cluster.sessions()
    assert processes_in_sessions(sessions), "the recorded sessions hold no process: wrong state file?"
    down = subprocess.run(
        ["bash", str(REPO / "cluster/local-down.sh"), "--purge"],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert down.returncode == 0, down.stdout + down.stderr
    assert processes_in_sessions(sessions) == []
    assert not (cluster.state_dir / "cluster.env").exists()
    assert not Path(cluster.state["RAY_FT_CLUSTER_TEMP_DIR"]).exists()
    with pytest.raises(urllib.error.URLError):
        cluster.get("/api/version")
