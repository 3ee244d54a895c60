"""GPU scheduling of Serve replicas on a CPU machine: a real Ray declaring 2 GPUs (logical resources, no CUDA)
runs replicas with the options of a ``num_gpus: 1`` endpoint; each must hold its own GPU.

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


def test_each_gpu_replica_asks_for_and_gets_its_own_gpu():
    env = {**os.environ, "RAY_ADDRESS": ""}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parents[1]), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(HERE / "fake_gpu_serving.py")], capture_output=True, text=True, env=env, timeout=600
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (proc.stdout[-3000:], proc.stderr[-6000:])
    result = json.loads(lines[-1][7:])
    assert result["options"]["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 1.0}
    replicas = result["replicas"]
    assert len(replicas) == 2, replicas
    gpu_ids = [r["gpu_ids"] for r in replicas]
    assert all(len(ids) == 1 for ids in gpu_ids) and len({ids[0] for ids in gpu_ids}) == 2, gpu_ids
    for r in replicas:
        assert r["assigned"].get("GPU") == 1.0, r
        assert r["cuda_visible_devices"] == r["gpu_ids"][0], r  # what vLLM in the replica would see
