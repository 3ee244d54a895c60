"""Golden losses: the first training losses of a tiny seeded model through ray-ft's own training loop.

The run is Ray Train's local mode (``scaling.num_workers=0``: the worker function runs in this process, no Ray
cluster), with DeepSpeed ZeRO-2, LoRA, a cosine schedule and two micro-batches per step, so a change to batching,
the loss, the optimizer, the LR schedule or gradient accumulation changes these numbers and fails the test. The linear
probe's head loop is pinned the same way on fixed random features.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from conftest import QA_ROWS, write_jsonl

from ray_ft import tracking
from ray_ft.config import load_config
from ray_ft.methods import get_method

REPO = Path(__file__).resolve().parents[2]

GOLDEN_LOSSES = [5.992415428161621, 6.000719308853149, 5.8966898918151855, 5.899850606918335, 5.851031303405762]
"""Per-step losses of the run below, captured before the training loop was restructured."""
GOLDEN_LRS = [0.004570288237343631, 0.0034452882373436316, 0.002054711762656369, 0.0009297117626563687, 0.0005]
"""The learning rate after each step (cosine from 5e-3 down to a tenth of it over the five steps)."""


@pytest.fixture(scope="module")
def golden_run(tiny_model_dir, tmp_path_factory) -> dict[str, list[float]]:

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
        config=cfg,
        method=get_method("lora"),
        model_dir=str(tiny_model_dir),
        train_records=QA_ROWS,
        tracking_uri=uri,
        run_id=run_id,
    )
    build_trainer(cfg, inputs).fit()  # scaling.num_workers=0: Ray Train's local mode runs the loop in this process
    client = tracking.client(uri)
    return {
        key: [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
        for key in ("loss", "lr")
    }


def test_first_losses_match_the_golden_values(golden_run):
    assert golden_run["loss"] == pytest.approx(GOLDEN_LOSSES, rel=1e-4, abs=1e-5)


def test_learning_rates_match_the_golden_schedule(golden_run):
    assert golden_run["lr"] == pytest.approx(GOLDEN_LRS, rel=1e-6)


PROBE_LOSSES = [0.8551198840141296, 1.4205396175384521, 0.6935806274414062, 0.7754331827163696, 0.52264404296875]
PROBE_VAL_LOSSES = [0.3404526114463806, 0.2532734274864197, 0.23923280835151672]
"""The linear probe's head loop on fixed random features: losses per step, validation losses every 2 steps."""


def test_probe_head_losses_match_the_golden_values(tmp_path):
    import numpy as np

    from ray_ft.train import WorkerInput, build_trainer
    from ray_ft.train.inputs import ProbeInputs
    from ray_ft.train.probe import train_head_per_worker

    rng = np.random.default_rng(0)
    features = rng.normal(size=(10, 8)).astype(np.float32)
    label_ids = [i % 3 for i in range(10)]
    overrides = {
        "model.name_or_path": "unused",
        "output_dir": tmp_path / "out",
        "tracking.mlflow_dir": tmp_path / "mlflow",
        "train.batch_size": 4,
        "train.lr": 0.1,
        "train.max_steps": 5,
        "train.eval_every": 2,
        "train.log_every": 1,
        "train.seed": 3,
        "scaling.num_workers": 0,
    }
    cfg = load_config(REPO / "jobs/linear_probe.yaml", [f"{k}={v}" for k, v in overrides.items()])
    uri, run_id = tracking.start_run(cfg, run_name="golden-probe")
    info = {"labels": ["a", "b", "c"], "pooling": "mean", "layer": -1, "max_length": 64, "hidden_size": 8}
    probe = ProbeInputs(info, features[:8], label_ids[:8], features[8:], label_ids[8:])
    method = get_method("linear_probe")
    inputs = WorkerInput(config=cfg, method=method, model_dir="unused", tracking_uri=uri, run_id=run_id, probe=probe)
    build_trainer(cfg, inputs, train_fn=train_head_per_worker).fit()
    client = tracking.client(uri)

    def history(key: str) -> list[float]:
        return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]

    assert history("loss") == pytest.approx(PROBE_LOSSES, rel=1e-5)
    assert history("val_loss") == pytest.approx(PROBE_VAL_LOSSES, rel=1e-5)
    checkpoints = sorted((tmp_path / "out" / "ray" / "out").glob("checkpoint_local_*"))
    assert [c.name for c in checkpoints] == ["checkpoint_local_000004", "checkpoint_local_000005"]
    assert (checkpoints[-1] / "trainable" / "head.safetensors").is_file()


def test_a_local_run_leaves_no_rank_variables_behind():
    """A process started after a local run (or Hugging Face's Trainer in it) must not take itself for a rank of a
    distributed job."""
    import os

    from ray_ft.train.runtime import process_group

    before = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    with process_group():
        import torch.distributed as dist

        assert dist.get_world_size() == 1 and os.environ["LOCAL_RANK"] == "0"
    assert {k: os.environ.get(k) for k in before} == before


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedule_is_transformers_with_its_warm_up(tmp_path, kind):
    """With a warm-up, the rates are the Hugging Face ``Trainer``'s: from zero up to ``train.lr``, then down."""
    import torch

    from ray_ft.train.optim import adamw_with_schedule

    cfg = load_config(
        REPO / "jobs/lora.yaml",
        [f"data.path={tmp_path / 'x.jsonl'}", "train.lr=1.0", "train.warmup_ratio=0.1", f"train.lr_scheduler={kind}"],
    )
    optimizer, scheduler = adamw_with_schedule(cfg, [torch.nn.Parameter(torch.zeros(1))], total_steps=40)
    lrs = []
    for _ in range(40):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    final = {"cosine": 0.1, "linear": 1 / 36, "constant": 1.0}[kind]
    assert lrs[-1] == pytest.approx(final, rel=0.05)
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:]))
