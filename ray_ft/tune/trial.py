"""One Tune trial: :func:`train_driver_fn` builds the distributed ``TorchTrainer`` for its sampled
hyper-parameters (``ray_ft.train.build_trainer``), opens the trial's MLflow child run and waits for the
training. The Train workers' evaluation reports reach Tune through ``TuneReportCallback``, so ASHA can stop
weak trials after a few steps."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ray_ft import logs, tracking
from ray_ft.config import ExperimentConfig
from ray_ft.methods import get_method
from ray_ft.tracking import RunRef
from ray_ft.train import WorkerInput, build_trainer
from ray_ft.tune.space import resolve_hyperparameters, trial_config

logger = logging.getLogger(__name__)

DRIVER_CPU = 0.25
"""CPU requested by each trial's driver function (it only builds the trainer and waits)."""
TRIAL_TAG = "ray_ft.trial_id"
"""Tag naming the Tune trial of a child run."""


@dataclass
class SearchContext:
    """What every trial needs besides its sampled hyper-parameters (shared through the object store)."""

    base_config: dict[str, Any]
    model_dir: str
    train_records: list[dict]
    val_records: list[dict]
    tracking_uri: str
    parent_run_id: str
    train_storage: str
    """Where each trial's Train run keeps its checkpoints (one run per trial, named ``trial_<id>``)."""


def trial_resources(cfg: ExperimentConfig) -> dict[str, float]:
    """Logical resources one trial holds while it runs: its driver plus its Train workers."""
    need = {"CPU": DRIVER_CPU + cfg.scaling.num_workers * cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        need["GPU"] = float(cfg.scaling.num_workers)
    return need


def _report_callback(metric: str):
    """A ``TuneReportCallback`` forwarding only the reports that carry the search metric.

    The workers also report plain training steps (no ``val_loss``); Tune insists that every result
    carries the metric it optimises, so only evaluation reports (which come with a checkpoint) go up.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    class SearchMetricReportCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metric in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    return SearchMetricReportCallback()


def child_run(context: SearchContext, cfg: ExperimentConfig, trial_id: str, hyperparameters: dict) -> RunRef:
    """The trial's MLflow run under the search's parent run (the same run again when a trial restarts)."""
    parent = RunRef(context.tracking_uri, context.parent_run_id)
    existing = tracking.child_runs(parent, TRIAL_TAG).get(trial_id)
    if existing:
        run = RunRef(parent.uri, existing)
        tracking.mark_running(run)
        return run
    run = RunRef(*tracking.start_run(cfg, run_name=f"trial_{trial_id}", parent_run_id=parent.run_id))
    tracking.set_tags(run, {TRIAL_TAG: trial_id})
    tracking.log_params(run, {f"hp.{k}": v for k, v in hyperparameters.items()})
    return run


def train_driver_fn(config: dict[str, Any], context: SearchContext) -> None:
    """One Tune trial: build the ``TorchTrainer`` for the sampled hyper-parameters and run it.

    Args:
        config: the point Tune sampled from :func:`ray_ft.tune.space.search_space`.
        context: the data, base config and MLflow parent run shared by all trials.
    """
    import ray.tune

    logs.configure()  # this runs in a Ray worker process, whose stdout Ray forwards to the driver
    trial_id = ray.tune.get_context().get_trial_id()
    base = ExperimentConfig.model_validate(context.base_config)
    hyperparameters = resolve_hyperparameters(config, base)
    cfg = trial_config(base, hyperparameters)
    run = child_run(context, cfg, trial_id, hyperparameters)
    hp_text = ", ".join(f"{k} {v:g}" for k, v in hyperparameters.items())
    logger.info("[ray-ft] trial %s: %s; MLflow run %s", trial_id, hp_text, run.run_id)
    inputs = WorkerInput(
        config=cfg,
        method=get_method(cfg.method.name),
        model_dir=context.model_dir,
        train_records=context.train_records,
        val_records=context.val_records,
        tracking_uri=run.uri,
        run_id=run.run_id,
    )
    trainer = build_trainer(
        cfg,
        inputs,
        callbacks=[_report_callback(base.tune.metric)],
        name=f"trial_{trial_id}",
        storage=context.train_storage,
    )
    try:
        trainer.fit()
    except BaseException:
        tracking.end_run(run.uri, run.run_id, "FAILED")
        raise
    tracking.end_run(run.uri, run.run_id, "FINISHED")
