"""GPU scheduling on a CPU machine: a real Ray that declares 2 GPUs (logical resources, no CUDA) runs
ray-ft's trainer and a Tune search; each Train worker must hold exactly one distinct GPU in a placement group that
fits. The workers run a probe (fake_gpu_scheduling.py) instead of training, over gloo instead of nccl.

It runs in its own process because this Ray must declare GPUs, unlike the session's shared one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def scheduled(tmp_path_factory):
    out = tmp_path_factory.mktemp("fake-gpu")
    env = {**os.environ, "RAY_ADDRESS": ""}  # a Ray of its own, not one this process may have started
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parents[1]), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(HERE / "fake_gpu_scheduling.py"), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (proc.stdout[-3000:], proc.stderr[-6000:])
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    return json.loads(lines[-1][7:]), records


def test_training_workers_each_receive_one_gpu_bundle(scheduled):
    summary, records = scheduled
    train = [r for r in records if r["trial"] is None]
    assert sorted(r["rank"] for r in train) == [0, 1]
    assert all(len(r["gpu_ids"]) == 1 and r["assigned"].get("GPU") == 1.0 for r in train), train
    assert len({r["gpu_ids"][0] for r in train}) == 2, "two workers shared one GPU"
    bundles = train[0]["bundles"]
    assert len(bundles) == 2 and all(b.get("GPU") == 1.0 and b.get("CPU") == 0.5 for b in bundles), bundles
    total_gpu = sum(b.get("GPU", 0) for b in bundles)
    assert total_gpu <= summary["cluster"]["GPU"], "the placement group does not fit the cluster"


def test_tune_trials_fit_two_at_once_and_each_worker_receives_a_gpu(scheduled):
    summary, records = scheduled
    assert summary["trial_errors"] == []
    assert summary["trial_resources"]["GPU"] == 1.0
    assert summary["concurrent_trials"] == 2  # 2 GPUs, one per trial
    trials = [r for r in records if r["trial"] is not None]
    assert len(trials) == 2 and len({r["trial"] for r in trials}) == 2
    assert all(len(r["gpu_ids"]) == 1 and r["bundles"][0].get("GPU") == 1.0 for r in trials), trials
