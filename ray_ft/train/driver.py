"""The driver side of a run: the ``TorchTrainer`` for a worker function and its inputs, and running it."""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ray_ft.config import ExperimentConfig
from ray_ft.data import DataSummary
from ray_ft.methods import TuningMethod
from ray_ft.train.batching import check_packing, streaming_dataset
from ray_ft.train.checkpointing import local_checkpoint_dir, run_name, storage_path
from ray_ft.train.inputs import WorkerInput
from ray_ft.train.loop import train_fn_per_worker
from ray_ft.train.runtime import init_ray


@dataclass
class FitResult:
    checkpoint_dir: str | None
    metrics: dict[str, Any]
    wall_s: float


def build_trainer(
    cfg: ExperimentConfig,
    inputs: WorkerInput,
    callbacks: list | None = None,
    name: str | None = None,
    storage: str | None = None,
    train_fn: Callable[[WorkerInput], None] = train_fn_per_worker,
):
    """The ``TorchTrainer`` running ``train_fn`` on ``inputs`` (also used per trial by ``ray-ft tune``).

    With ``data.streaming`` the records go into a Ray Data pipeline (the shards ``train`` and ``val``) instead of
    travelling to every worker.
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    datasets = None
    if cfg.data.streaming and train_fn is train_fn_per_worker:
        records = inputs.train_records
        datasets = {"train": streaming_dataset(cfg, records, inputs.model_dir)}
        if isinstance(records, DataSummary):
            inputs = dataclasses.replace(inputs, train_records=[], n_train=records.plan.n_train)
            if records.plan.n_val:
                datasets["val"] = streaming_dataset(cfg, records, inputs.model_dir, side="val")
                inputs = dataclasses.replace(inputs, val_records=[], streamed_val=True)
        else:
            inputs = dataclasses.replace(inputs, train_records=[], n_train=len(records))
    return TorchTrainer(
        # Bound here rather than passed as ``train_loop_config``: Ray Train keeps that as a JSON-able dict of
        # run settings, and the worker function takes the typed object itself.
        functools.partial(train_fn, inputs),
        datasets=datasets,
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if cfg.scaling.use_gpu else {})},
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name or run_name(cfg),
            storage_path=storage or storage_path(cfg),
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            callbacks=callbacks,
            # Progress lines are logged once by rank 0; keep Ray's per-report INFO lines out.
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


def run_trainer(
    cfg: ExperimentConfig, inputs: WorkerInput, train_fn: Callable[[WorkerInput], None] = train_fn_per_worker
) -> FitResult:
    """Start (or connect to) Ray, run the trainer, and return its final checkpoint as a local directory."""
    init_ray(cfg)
    t0 = time.time()
    result = build_trainer(cfg, inputs, train_fn=train_fn).fit()
    return FitResult(
        checkpoint_dir=local_checkpoint_dir(result.checkpoint),
        metrics=dict(result.metrics or {}),
        wall_s=time.time() - t0,
    )


def fit_causal_lm(
    cfg: ExperimentConfig,
    method: TuningMethod,
    model_dir: str,
    train_records: list[dict] | DataSummary,
    val_records: list[dict],
    tracking_uri: str | None = None,
    run_id: str | None = None,
) -> FitResult:
    """Train a causal-LM method (:mod:`ray_ft.train.loop`) on Ray Train."""
    if cfg.train.packing:
        check_packing(model_dir, cfg.model.trust_remote_code)
    inputs = WorkerInput(
        config=cfg,
        method=method,
        model_dir=model_dir,
        train_records=train_records,
        val_records=val_records,
        tracking_uri=tracking_uri,
        run_id=run_id,
    )
    return run_trainer(cfg, inputs)
