"""Golden losses: the first training losses of a tiny seeded model through ray-ft's own training loop.

The run is Ray Train's local mode (``scaling.num_workers=0``: the worker function runs in this process, no Ray
cluster), with DeepSpeed ZeRO-2, LoRA, a cosine schedule and two micro-batches per step, so a change to batching,
the loss, the optimizer, the LR schedule or gradient accumulation changes these numbers and fails the test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import QA_ROWS, write_jsonl

from ray_ft import tracking
from ray_ft.config import load_config

REPO = Path(__file__).resolve().parents[2]

GOLDEN_LOSSES = [5.992415428161621, 6.000719308853149, 5.8966898918151855, 5.899850606918335, 5.851031303405762]
"""Per-step losses of the run below, captured before the training loop was restructured."""
GOLDEN_LRS = [0.004570288237343631, 0.0034452882373436316, 0.002054711762656369, 0.0009297117626563687, 0.0005]
"""The learning rate after each step (cosine from 5e-3 down to a tenth of it over the five steps)."""


@pytest.fixture(scope="module")
def golden_run(tiny_model_dir, tmp_path_factory) -> dict[str, list[float]]:
    import ray

    from ray_ft.train import WorkerInput, build_trainer

    tmp = tmp_path_factory.mktemp("golden")
    data = write_jsonl(tmp / "qa.jsonl", QA_ROWS)
    overrides = {
        "model.name_or_path": tiny_model_dir,
        "data.path": data,
        "data.val_fraction": 0,
        "output_dir": tmp / "out",
        "tracking.mlflow_dir": tmp / "mlflow",
        "train.batch_size": 2,
        "train.grad_accum": 2,
        "train.lr": 5e-3,
        "train.max_steps": 5,
        "train.eval_every": 100,
        "train.seed": 7,
        "scaling.num_workers": 0,
    }
    cfg = load_config(REPO / "jobs/lora.yaml", [f"{k}={v}" for k, v in overrides.items()])
    uri, run_id = tracking.start_run(cfg, run_name="golden")
    inputs = WorkerInput(
        config=cfg, model_dir=str(tiny_model_dir), train_records=QA_ROWS, tracking_uri=uri, run_id=run_id
    )
    build_trainer(cfg, inputs).fit()
    assert not ray.is_initialized()  # local mode: the loop ran here, without a Ray cluster
    client = tracking.client(uri)
    return {
        key: [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
        for key in ("loss", "lr")
    }


def test_first_losses_match_the_golden_values(golden_run):
    assert golden_run["loss"] == pytest.approx(GOLDEN_LOSSES, rel=1e-4, abs=1e-5)


def test_learning_rates_match_the_golden_schedule(golden_run):
    assert golden_run["lr"] == pytest.approx(GOLDEN_LRS, rel=1e-6)
