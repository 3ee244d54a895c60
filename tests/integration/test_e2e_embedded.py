"""The real embedded model through the real CLI: train a few steps, merge, generate, eval."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.e2e]
REPO = Path(__file__).resolve().parents[2]
RAY_FT = [sys.executable, "-m", "ray_ft.cli"]


def _run(args, **kw):
    env = {**os.environ, "RAY_ADDRESS": ""}
    return subprocess.run([*RAY_FT, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=900, **kw)


def test_cli_train_generate_eval_on_embedded_model(tmp_path):
    out = tmp_path / "e2e"
    proc = _run(
        [
            "train",
            "jobs/lora.yaml",
            f"output_dir={out}",
            f"tracking.mlflow_dir={tmp_path / 'mlflow'}",
            "train.max_steps=2",
            "scaling.num_workers=2",
            "scaling.cpus_per_worker=0.5",
            "eval.max_examples=2",
            "eval.max_new_tokens=8",
        ]
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"artifact:      {out / 'merged'}" in proc.stdout
    assert "step 2/2" in proc.stdout + proc.stderr
    cfg = (out / "merged" / "config.json").read_text()
    assert json.loads(cfg)["model_type"] == "llama"

    gen = _run(["generate", str(out / "merged"), "LoRA là gì?", "--max-new-tokens", "12"])
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert gen.stdout.strip()

    ev = _run(
        ["eval", str(out / "merged"), "ray_ft/datasets/vi_ai_qa.jsonl", "--max-examples", "3", "--max-new-tokens", "8"]
    )
    assert ev.returncode == 0, ev.stderr[-2000:]
    metrics = json.loads(ev.stdout)
    assert metrics["n"] == 3 and 0.0 <= metrics["rouge_l"] <= 1.0 and metrics["loss"] > 0
