"""``bench/gpu_check.py --smoke``: every row of the GPU matrix with tiny shapes on CPU, through the same code the GPU
run uses (real Ray, Ray Train + DeepSpeed, bitsandbytes 4-bit on CPU, HF Trainer, the Generator)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_smoke_runs_every_row_and_ends_with_its_summary_line(tmp_path):
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench/gpu_check.py"), "--smoke", "--workdir", str(tmp_path / "work")],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=1200,
    )
    out = proc.stdout
    assert proc.returncode == 0, (out[-3000:], proc.stderr[-5000:])
    lines = out.strip().splitlines()
    last = lines[-1]
    assert last.startswith("gpu_check ok=1 "), last
    values = dict(item.split("=", 1) for item in last.split()[1:])
    assert values["device"] == "cpu"
    assert values["mfu"] == "nan"  # no GPU peak on CPU
    for key in ("seed_ratio", "tokens_per_s", "qlora_mem_ratio", "generate_tokens_per_s"):
        assert float(values[key]) > 0, (key, values)
    # A ratio of two timings: on a loaded CPU machine its value means nothing, only that it was measured.
    assert math.isfinite(float(values["overhead"])), values
    table = {ln.split()[0] for ln in lines if ln.split()}
    assert {"seed", "lora", "bare", "packed", "qlora", "generate"} <= table
    assert "Generator on cpu" in out
