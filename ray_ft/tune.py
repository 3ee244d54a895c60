"""Hyper-parameter search over LoRA ``r``, ``alpha`` and learning rate with Ray Tune and ASHA.

Every Tune trial runs :func:`train_driver_fn`, a function trainable that builds one distributed
``TorchTrainer`` for its sampled hyper-parameters (``ray_ft.train.build_trainer``) and waits for it;
the Train workers' validation reports reach Tune through ``TuneReportCallback``, so ASHA can stop
weak trials after a few steps. The ``tune`` section of the experiment config
(:class:`ray_ft.config.SearchConfig`) holds the search space and the scheduler settings.

Output layout under ``output_dir``::

    config.yaml         the resolved search config     search.json   MLflow parent run id + tracking URI
    ray/<name>/         the Tune experiment (resume)   ray/<name>-trials/trial_<id>/   Train checkpoints
    trials.csv|.md      one row per trial              search_plot.png   metric vs each hyper-parameter
    best_config.yaml    the best trial's full config (``ray-ft train best_config.yaml``)
    trainable/ merged/  the best trial's trained parameters and servable model

MLflow: one parent run for the search and one nested child run per trial (tag ``mlflow.parentRunId``)
holding the trial's hyper-parameters, resolved config and per-step curves.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray_ft import tracking
from ray_ft.config import ConfigError, ExperimentConfig, SearchConfig, load_config, save_config

DRIVER_CPU = 0.25
"""CPU requested by each trial's driver function (it only builds the trainer and waits)."""
SEARCH_STATE_FILE = "search.json"
HYPERPARAMETERS = ("r", "alpha", "lr", "dropout")
SEARCH_METRICS = ("val_loss", "loss")
"""Metrics the training loop reports at every evaluation, which a search can optimise."""

FINISHED, EARLY_STOPPED, FAILED = "finished", "early-stopped", "failed"


# --------------------------------------------------------------------------- search space


def search_space(search: SearchConfig) -> dict[str, Any]:
    """The Tune ``param_space``: ``r`` and ``alpha`` (or ``alpha_multiple``) as choices, ``lr`` log-uniform."""
    from ray import tune

    space: dict[str, Any] = {"r": tune.choice(search.r)}
    if search.alpha:
        space["alpha"] = tune.choice(search.alpha)
    elif search.alpha_multiple:
        space["alpha_multiple"] = tune.choice(search.alpha_multiple)
    low, high = search.lr
    space["lr"] = tune.loguniform(low, high) if low < high else low
    if search.dropout:
        space["dropout"] = tune.choice(search.dropout)
    return space


def resolve_hyperparameters(sampled: dict[str, Any], base: ExperimentConfig) -> dict[str, Any]:
    """Turn a sampled point into concrete ``r``, ``alpha``, ``lr``, ``dropout`` (the rest from ``base``)."""
    r = int(sampled.get("r", base.method.r))
    if "alpha" in sampled:
        alpha = int(sampled["alpha"])
    elif "alpha_multiple" in sampled:
        alpha = max(1, round(float(sampled["alpha_multiple"]) * r))
    else:
        alpha = base.method.alpha
    return {
        "r": r,
        "alpha": alpha,
        "lr": float(sampled.get("lr", base.train.lr)),
        "dropout": float(sampled.get("dropout", base.method.dropout)),
    }


def trial_config(base: ExperimentConfig, hyperparameters: dict[str, Any]) -> ExperimentConfig:
    """``base`` with one trial's LoRA ``r``/``alpha``/``dropout`` and learning rate filled in."""
    data = base.to_dict()
    data["method"].update(r=hyperparameters["r"], alpha=hyperparameters["alpha"], dropout=hyperparameters["dropout"])
    data["train"]["lr"] = hyperparameters["lr"]
    return ExperimentConfig.model_validate(data)


def check_search(cfg: ExperimentConfig, n_val: int) -> None:
    """Refuse searches that cannot work, naming the field."""
    fields = type(cfg.method).model_fields
    if not {"r", "alpha", "dropout"} <= set(fields):
        raise ConfigError([f"method.name: ray-ft tune searches LoRA r/alpha; method {cfg.method.name!r} has no r"])
    if cfg.tune.metric not in SEARCH_METRICS:
        raise ConfigError(
            [f"tune.metric: {cfg.tune.metric!r} is not reported by training; choose one of {SEARCH_METRICS}"]
        )
    if cfg.tune.metric.startswith("val_") and n_val == 0:
        raise ConfigError([f"tune.metric: {cfg.tune.metric!r} needs validation data; set data.val_fraction > 0"])
    if cfg.tune.search_alg == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError(["tune.search_alg: 'optuna' needs the optuna package (pip install optuna)"]) from None


# --------------------------------------------------------------------------- trial side


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


def _child_run(context: SearchContext, cfg: ExperimentConfig, trial_id: str, hyperparameters: dict) -> str:
    """The trial's MLflow run under the search's parent run (the same run again when a trial restarts)."""
    client = tracking.client(context.tracking_uri)
    parent = client.get_run(context.parent_run_id)
    found = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`ray_ft.trial_id` = '{trial_id}' and tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
        max_results=1,
    )
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    _, run_id = tracking.start_run(cfg, run_name=f"trial_{trial_id}", parent_run_id=context.parent_run_id)
    client.set_tag(run_id, "ray_ft.trial_id", trial_id)
    from mlflow.entities import Param

    client.log_batch(run_id, params=[Param(f"hp.{k}", str(v)) for k, v in hyperparameters.items()])
    return run_id


def train_driver_fn(config: dict[str, Any], context: SearchContext) -> None:
    """One Tune trial: build the ``TorchTrainer`` for the sampled hyper-parameters and run it.

    Args:
        config: the point Tune sampled from :func:`search_space`.
        context: the data, base config and MLflow parent run shared by all trials.
    """
    import ray.tune

    from ray_ft.train import build_trainer

    trial_id = ray.tune.get_context().get_trial_id()
    base = ExperimentConfig.model_validate(context.base_config)
    hyperparameters = resolve_hyperparameters(config, base)
    cfg = trial_config(base, hyperparameters)
    run_id = _child_run(context, cfg, trial_id, hyperparameters)
    hp_text = ", ".join(f"{k} {v:g}" for k, v in hyperparameters.items())
    print(f"[ray-ft] trial {trial_id}: {hp_text}; MLflow run {run_id}", flush=True)
    loop_config = {
        "config": cfg.to_dict(),
        "model_dir": context.model_dir,
        "train_records": context.train_records,
        "val_records": context.val_records,
        "tracking_uri": context.tracking_uri,
        "run_id": run_id,
    }
    trainer = build_trainer(
        cfg,
        loop_config,
        callbacks=[_report_callback(base.tune.metric)],
        name=f"trial_{trial_id}",
        storage=context.train_storage,
    )
    try:
        trainer.fit()
    except BaseException:
        tracking.end_run(context.tracking_uri, run_id, "FAILED")
        raise
    tracking.end_run(context.tracking_uri, run_id, "FINISHED")


# --------------------------------------------------------------------------- driver side


def trial_resources(cfg: ExperimentConfig) -> dict[str, float]:
    """Logical resources one trial holds while it runs: its driver plus its Train workers."""
    need = {"CPU": DRIVER_CPU + cfg.scaling.num_workers * cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        need["GPU"] = float(cfg.scaling.num_workers)
    return need


def concurrent_trials(cfg: ExperimentConfig, cluster: dict[str, float]) -> int:
    """``tune.max_concurrent_trials``, else as many trials as the cluster's CPUs (and GPUs) hold at once."""
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    fits = [math.floor(cluster.get(k, 0.0) / v + 1e-9) for k, v in trial_resources(cfg).items() if v > 0]
    return max(1, min([*fits, cfg.tune.num_samples]))


def _init_ray(cfg: ExperimentConfig) -> None:
    """Connect to the configured cluster, or start a local Ray that can hold at least one trial."""
    import ray

    from ray_ft.train import init_ray

    if ray.is_initialized() or cfg.scaling.address or os.environ.get("RAY_ADDRESS"):
        init_ray(cfg)
        return
    need = trial_resources(cfg)["CPU"]
    ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(need)), log_to_driver=True)


@dataclass
class TrialOutcome:
    """One trial as the search ended."""

    trial_id: str
    status: str
    """``finished``, ``early-stopped`` or ``failed``."""
    hyperparameters: dict[str, Any]
    steps: int
    """The step of the trial's last report to Tune (where ASHA stopped it, for early-stopped trials)."""
    steps_run: int
    """Optimizer steps the trial's workers actually ran (they keep going while Tune decides to stop them)."""
    metrics: dict[str, Any]
    run_id: str | None
    checkpoint_path: str | None
    error: str | None = None


@dataclass
class SearchSummary:
    output_dir: str
    tracking_uri: str
    parent_run_id: str
    trials: list[TrialOutcome]
    best: TrialOutcome | None
    total_steps: int
    best_config_path: str | None = None
    artifact_dir: str | None = None
    top_adapters: list[str] = field(default_factory=list)
    """Training-output-like directories of the best trials' adapters, best first (``--deploy`` serves them)."""
    wall_s: float = 0.0
    interrupted: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def trial_steps(self) -> int:
        """Optimizer steps run over all trials."""
        return sum(t.steps_run for t in self.trials)

    def count(self, status: str) -> int:
        return sum(t.status == status for t in self.trials)


def _trial_name(trial) -> str:
    return f"trial_{trial.trial_id}"


def _tuner(cfg: ExperimentConfig, trainable, storage_root: str, name: str, total_steps: int, resume: bool):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    search = cfg.tune
    if resume:
        return tune.Tuner.restore(f"{storage_root.rstrip('/')}/{name}", trainable=trainable, resume_errored=True)
    scheduler = (
        ASHAScheduler(
            time_attr="step",
            max_t=total_steps,
            grace_period=min(search.grace_period, total_steps),
            reduction_factor=search.reduction_factor,
        )
        if search.scheduler == "asha"
        else FIFOScheduler()
    )
    # Tune applies max_concurrent_trials to a Searcher (Optuna); the random generator takes it directly.
    max_concurrent = search.max_concurrent_trials
    if search.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=search.seed)
    else:
        search_alg = BasicVariantGenerator(random_state=search.seed, max_concurrent=max_concurrent or 0)
        max_concurrent = None
    return tune.Tuner(
        trainable,
        param_space=search_space(search),
        tune_config=tune.TuneConfig(
            metric=search.metric,
            mode=search.mode,
            scheduler=scheduler,
            search_alg=search_alg,
            num_samples=search.num_samples,
            max_concurrent_trials=max_concurrent,
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage_root,
            failure_config=tune.FailureConfig(max_failures=search.max_failures),
        ),
    )


def _outcomes(results, base: ExperimentConfig, total_steps: int, uri: str, parent_run_id: str) -> list[TrialOutcome]:
    client = tracking.client(uri)
    child_runs = _child_runs(uri, parent_run_id)
    outcomes = []
    for result in results:
        trial_id = str(result.metrics.get("trial_id") or result.path.rstrip("/").rsplit("/", 1)[-1])
        trial_id = trial_id.removeprefix("trial_")
        steps = int(result.metrics.get("step", 0) or 0)
        if result.error is not None:
            status = FAILED
        elif steps < total_steps:
            status = EARLY_STOPPED
        else:
            status = FINISHED
        metrics = {
            k: v
            for k, v in result.metrics.items()
            if k in ("step", "epoch", "loss", "val_loss", "lr", "grad_norm", base.tune.metric)
            and isinstance(v, int | float)
        }
        error = _error_line(result.error) if result.error is not None else None
        run_id = child_runs.get(trial_id)
        logged = [m.step for m in client.get_metric_history(run_id, "loss")] if run_id else []
        outcomes.append(
            TrialOutcome(
                trial_id=trial_id,
                status=status,
                hyperparameters=resolve_hyperparameters(result.config or {}, base),
                steps=steps,
                steps_run=max([steps, *logged]),
                metrics=metrics,
                run_id=run_id,
                checkpoint_path=result.metrics.get("checkpoint_path"),
                error=error,
            )
        )
    return sorted(outcomes, key=lambda t: t.trial_id)


def _error_line(error: BaseException) -> str:
    """The last line of an error's message (the exception raised inside the worker, for Train failures)."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else repr(error))[:500]


def _child_runs(uri: str, parent_run_id: str) -> dict[str, str]:
    client = tracking.client(uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'", max_results=1000
    )
    return {r.data.tags["ray_ft.trial_id"]: r.info.run_id for r in runs if "ray_ft.trial_id" in r.data.tags}


def _ranked(outcomes: list[TrialOutcome], metric: str, mode: str) -> list[TrialOutcome]:
    """Trials that reported ``metric``, best first."""
    scored = [t for t in outcomes if t.status != FAILED and isinstance(t.metrics.get(metric), int | float)]
    scored = [t for t in scored if not math.isnan(t.metrics[metric])]
    return sorted(scored, key=lambda t: t.metrics[metric], reverse=mode == "max")


def _best(outcomes: list[TrialOutcome], metric: str, mode: str) -> TrialOutcome | None:
    ranked = _ranked(outcomes, metric, mode)
    return ranked[0] if ranked else None


TOP_ADAPTERS = 3
"""How many of the best trials' LoRA adapters a search keeps under ``OUTPUT_DIR/top/`` for serving."""


def export_top_adapters(
    cfg: ExperimentConfig, model_dir: str, ranked: list[TrialOutcome], storage_root: str, out: Path
) -> list[str]:
    """Write the best trials' adapters as ``OUTPUT_DIR/top/top<rank>-<trial>/trainable`` (no merge).

    Each directory is shaped like a training output, so ``ray-ft serve`` serves them together as LoRA adapters
    of one engine, named after their directories.
    """
    import shutil

    from ray_ft.export import write_artifact
    from ray_ft.job import artifact_metadata
    from ray_ft.train import TRAINABLE_DIR

    dirs: list[str] = []
    for rank, trial in enumerate([t for t in ranked if t.checkpoint_path][:TOP_ADAPTERS], start=1):
        source = Path(_checkpoint_dir(trial.checkpoint_path, storage_root)) / TRAINABLE_DIR
        meta = artifact_metadata(trial_config(cfg, trial.hyperparameters), model_dir, trial.run_id)
        meta.update(artifact="trainable", tune_trial_id=trial.trial_id, hyperparameters=trial.hyperparameters)
        run_dir = out / "top" / f"top{rank}-{trial.trial_id}"
        write_artifact(run_dir / "trainable", lambda d, src=source: shutil.copytree(src, d, dirs_exist_ok=True), meta)
        dirs.append(str(run_dir))
    return dirs


def _close_child_runs(uri: str, outcomes: list[TrialOutcome], best: TrialOutcome | None) -> None:
    """Give every child run its final status and tags (a trial stopped by ASHA never ends its own run)."""
    client = tracking.client(uri)
    for t in outcomes:
        if t.run_id is None:
            continue
        if t.status == FAILED:
            client.set_tag(t.run_id, "ray_ft.error", t.error or "")
            client.set_terminated(t.run_id, status="FAILED")
        else:
            if t.status == EARLY_STOPPED:
                client.set_tag(t.run_id, "ray_ft.early_stopped", "true")
            client.set_terminated(t.run_id, status="FINISHED")
        if best is not None and t.trial_id == best.trial_id:
            client.set_tag(t.run_id, "ray_ft.best_trial", "true")


def _write_table(outcomes: list[TrialOutcome], metric: str, out: Path) -> tuple[Path, Path]:
    columns = ["trial_id", "status", *HYPERPARAMETERS, "steps", "steps_run", metric, "loss", "mlflow_run_id", "error"]
    rows = [
        {
            "trial_id": t.trial_id,
            "status": t.status,
            **t.hyperparameters,
            "steps": t.steps,
            "steps_run": t.steps_run,
            metric: t.metrics.get(metric, ""),
            "loss": t.metrics.get("loss", ""),
            "mlflow_run_id": t.run_id or "",
            "error": t.error or "",
        }
        for t in outcomes
    ]
    csv_path = out / "trials.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace("|", "\\|")

    md_path = out / "trials.md"
    lines = ["| " + " | ".join(columns[:-1]) + " |", "|" + "---|" * (len(columns) - 1)]
    lines += ["| " + " | ".join(cell(r[c]) for c in columns[:-1]) + " |" for r in rows]
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return csv_path, md_path


def _plot(outcomes: list[TrialOutcome], metric: str, searched: list[str], path: Path) -> bool:
    scored = [t for t in outcomes if isinstance(t.metrics.get(metric), int | float)]
    if not scored or not searched:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(searched), figsize=(3.2 * len(searched), 3.2), squeeze=False)
    styles = {FINISHED: ("o", "tab:blue"), EARLY_STOPPED: ("x", "tab:orange"), FAILED: ("s", "tab:red")}
    for ax, name in zip(axes[0], searched, strict=True):
        for status, (marker, color) in styles.items():
            pts = [(t.hyperparameters[name], t.metrics[metric]) for t in scored if t.status == status]
            if pts:
                ax.scatter(*zip(*pts, strict=True), marker=marker, color=color, label=status)
        if name == "lr":
            ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel(metric)
    axes[0][0].legend(fontsize="small")
    fig.suptitle(f"{metric} at each trial's last report", fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _searched(search: SearchConfig) -> list[str]:
    names = ["r", "alpha"] if (search.alpha or search.alpha_multiple) else ["r"]
    if search.lr[0] < search.lr[1]:
        names.append("lr")
    if search.dropout:
        names.append("dropout")
    return names


def _parent_run(cfg: ExperimentConfig, out: Path, resume: bool) -> tuple[str, str]:
    state = out / SEARCH_STATE_FILE
    if resume and state.is_file():
        info = json.loads(state.read_text())
        tracking.client(info["tracking_uri"]).update_run(info["run_id"], status="RUNNING")
        print(f"[ray-ft] resuming MLflow search run {info['run_id']}", flush=True)
        return info["tracking_uri"], info["run_id"]
    uri, run_id = tracking.start_run(cfg, run_name=out.name)
    tracking.client(uri).set_tag(run_id, "ray_ft.search", "true")
    state.write_text(json.dumps({"tracking_uri": uri, "run_id": run_id}))
    return uri, run_id


def _checkpoint_dir(path: str, storage_root: str) -> str:
    """A local directory holding a checkpoint reported at ``path`` (downloaded when storage is remote)."""
    if Path(path).is_dir():
        return path
    import tempfile

    import pyarrow.fs
    from ray.train import Checkpoint

    fs, _ = pyarrow.fs.FileSystem.from_uri(storage_root)
    local = tempfile.mkdtemp(prefix="ray-ft-best-")
    return Checkpoint(path, filesystem=fs).to_directory(local)


def run_search(cfg: ExperimentConfig, resume: bool = False) -> SearchSummary:
    """Run the search in ``cfg.tune``; export the best trial; print progress and return a summary.

    Args:
        cfg: the experiment config; ``tune`` holds the search space and scheduler settings.
        resume: continue an interrupted search in ``output_dir`` (errored trials are retried from their
            last checkpoints) instead of refusing to overwrite it.

    Raises:
        JobError: ``output_dir`` holds an earlier search and ``resume`` is off, or every trial failed.
    """
    from ray import tune

    from ray_ft.job import JobError, load_dataset
    from ray_ft.models import resolve_model_dir
    from ray_ft.outputs import check_output_dir, prepare_output_dir
    from ray_ft.train import plan_steps, storage_path

    t0 = time.time()
    check_output_dir(cfg.output_dir, resume)
    ds, train, val = load_dataset(cfg)
    check_search(cfg, len(val))
    search = cfg.tune
    print(
        f"[ray-ft] data {ds.path}: {ds.format}, {ds.stats['examples']} examples; "
        f"train {len(train)}, validation {len(val)}",
        flush=True,
    )
    out = Path(cfg.output_dir).resolve()
    storage_root = storage_path(cfg)
    experiment_dir = f"{storage_root.rstrip('/')}/{out.name}"  # a local path or a URI (s3://...)
    if tune.Tuner.can_restore(experiment_dir):
        if not resume:
            raise JobError(
                f"{experiment_dir} holds an earlier search; pass --resume to continue it, or choose another output_dir"
            )
    elif resume:
        print(f"[ray-ft] nothing to resume in {experiment_dir}; starting a new search", flush=True)
        resume = False
    prepare_output_dir(out, resume)
    save_config(cfg, out / "config.yaml")
    model_dir = resolve_model_dir(cfg.model)
    _, total_steps = plan_steps(cfg, len(train), cfg.scaling.num_workers)

    uri, parent_run_id = _parent_run(cfg, out, resume)
    tracking.log_artifact(uri, parent_run_id, out / "config.yaml")
    print(f"[ray-ft] MLflow {uri} search run {parent_run_id}", flush=True)

    # Trials see absolute paths and a pinned tracking URI (Tune runs each trial in its own directory).
    pinned = cfg.model_copy(deep=True)
    pinned.output_dir = str(out)
    pinned.tracking.tracking_uri = uri
    context = SearchContext(
        base_config=pinned.to_dict(),
        model_dir=model_dir,
        train_records=train,
        val_records=val,
        tracking_uri=uri,
        parent_run_id=parent_run_id,
        train_storage=f"{storage_root.rstrip('/')}/{out.name}-trials",
    )
    _init_ray(cfg)
    import ray

    per_trial = trial_resources(cfg)
    if not search.max_concurrent_trials:
        search = search.model_copy(update={"max_concurrent_trials": concurrent_trials(cfg, ray.cluster_resources())})
        pinned.tune = search
    sched = (
        f"ASHA on {search.metric} ({search.mode}), grace {search.grace_period} steps, "
        f"reduction factor {search.reduction_factor}"
        if search.scheduler == "asha"
        else "FIFO (every trial runs to the end)"
    )
    print(
        f"[ray-ft] search: {search.num_samples} trials of {total_steps} steps, {search.search_alg} search over "
        f"{search_space_text(search)}; {sched}; each trial holds {per_trial} "
        f"({cfg.scaling.num_workers} worker(s)), up to {search.max_concurrent_trials} at once",
        flush=True,
    )
    print(f"[ray-ft] Tune experiment {experiment_dir}", flush=True)
    trainable = tune.with_resources(tune.with_parameters(train_driver_fn, context=context), {"CPU": DRIVER_CPU})
    tuner = _tuner(pinned, trainable, storage_root, out.name, total_steps, resume)
    try:
        results = tuner.fit()
        return _finish_search(
            cfg, search, results, ds, model_dir, out, storage_root, total_steps, uri, parent_run_id, t0
        )
    except BaseException:
        if tracking.client(uri).get_run(parent_run_id).info.status == "RUNNING":
            tracking.end_run(uri, parent_run_id, "FAILED")
        raise


def _finish_search(
    cfg: ExperimentConfig,
    search: SearchConfig,
    results,
    ds,
    model_dir: str,
    out: Path,
    storage_root: str,
    total_steps: int,
    uri: str,
    parent_run_id: str,
    t0: float,
) -> SearchSummary:
    """Classify the trials, close their MLflow runs, write the tables, plot and best config, export the best."""
    from ray_ft.job import JobError, export_checkpoint

    outcomes = _outcomes(results, cfg, total_steps, uri, parent_run_id)
    interrupted = results.num_terminated + results.num_errors < len(results) or len(results) < search.num_samples
    summary = SearchSummary(
        output_dir=str(out),
        tracking_uri=uri,
        parent_run_id=parent_run_id,
        trials=outcomes,
        best=None,
        total_steps=total_steps,
        interrupted=interrupted,
    )
    if interrupted:
        client = tracking.client(uri)
        for run_id in _child_runs(uri, parent_run_id).values():
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, status="KILLED")
        tracking.end_run(uri, parent_run_id, "KILLED")
        summary.wall_s = time.time() - t0
        return summary
    for t in outcomes:
        if t.status == FAILED:
            print(f"[ray-ft] trial {t.trial_id} failed: {t.error}", flush=True)

    best = _best(outcomes, search.metric, search.mode)
    summary.best = best
    _close_child_runs(uri, outcomes, best)
    csv_path, md_path = _write_table(outcomes, search.metric, out)
    client = tracking.client(uri)
    for path in (csv_path, md_path):
        tracking.log_artifact(uri, parent_run_id, path)
    if _plot(outcomes, search.metric, _searched(search), out / "search_plot.png"):
        tracking.log_artifact(uri, parent_run_id, out / "search_plot.png")
    tracking.StepLogger(uri, parent_run_id).log(
        {
            "trials": len(outcomes),
            "trials_early_stopped": summary.count(EARLY_STOPPED),
            "trials_failed": summary.count(FAILED),
            "trial_steps": summary.trial_steps,
        },
        step=0,
    )
    if best is None:
        tracking.end_run(uri, parent_run_id, "FAILED")
        raise JobError(f"every trial failed; see {md_path}")

    best_cfg = trial_config(cfg, best.hyperparameters)
    best_cfg.output_dir = str(Path(cfg.output_dir) / "best")
    save_config(best_cfg, out / "best_config.yaml")
    summary.best_config_path = str(out / "best_config.yaml")
    tracking.log_artifact(uri, parent_run_id, out / "best_config.yaml")
    tracking.StepLogger(uri, parent_run_id).log({f"best_{k}": v for k, v in best.metrics.items()}, step=0)
    for key, value in {"best_trial_id": best.trial_id, "best_run_id": best.run_id or ""}.items():
        client.set_tag(parent_run_id, f"ray_ft.{key}", value)
    from mlflow.entities import Param

    client.log_batch(parent_run_id, params=[Param(f"best.{k}", str(v)) for k, v in best.hyperparameters.items()])

    if best.checkpoint_path:
        checkpoint = _checkpoint_dir(best.checkpoint_path, storage_root)
        summary.artifact_dir = str(
            export_checkpoint(
                best_cfg,
                model_dir,
                checkpoint,
                out,
                uri,
                best.run_id or parent_run_id,
                labels=ds.labels or None,
                tune_trial_id=best.trial_id,
                hyperparameters=best.hyperparameters,
            )
        )
    else:
        summary.notes.append(f"trial {best.trial_id} reported no checkpoint; nothing exported")
    if cfg.method.name in ("lora", "qlora"):
        ranked = _ranked(outcomes, search.metric, search.mode)
        summary.top_adapters = export_top_adapters(cfg, model_dir, ranked, storage_root, out)
    tracking.end_run(uri, parent_run_id, "FINISHED")
    summary.wall_s = time.time() - t0
    return summary


def search_space_text(search: SearchConfig) -> str:
    """The search space in words, for progress lines."""
    parts = [f"r {search.r}"]
    if search.alpha:
        parts.append(f"alpha {search.alpha}")
    elif search.alpha_multiple:
        parts.append(f"alpha {search.alpha_multiple} x r")
    low, high = search.lr
    parts.append(f"lr log-uniform [{low:g}, {high:g}]" if low < high else f"lr {low:g}")
    if search.dropout:
        parts.append(f"dropout {search.dropout}")
    return ", ".join(parts)


def print_summary(s: SearchSummary, metric: str, resume_command: str = "ray-ft tune CONFIG ... --resume") -> None:
    print(f"\n[ray-ft] search {'interrupted' if s.interrupted else 'done'} in {s.wall_s:.0f}s")
    if s.interrupted:
        print(f"  trials:        {len(s.trials)} started; {s.trial_steps} trial-steps run so far")
    else:
        print(
            f"  trials:        {len(s.trials)} ({s.count(FINISHED)} finished, {s.count(EARLY_STOPPED)} stopped "
            f"early by ASHA, {s.count(FAILED)} failed); {s.trial_steps} trial-steps of {len(s.trials) * s.total_steps}"
        )
    if s.best is not None:
        hp = ", ".join(f"{k} {v:g}" for k, v in s.best.hyperparameters.items())
        print(f"  best trial:    {s.best.trial_id}: {hp} → {metric} {s.best.metrics.get(metric, float('nan')):.4f}")
    if s.best_config_path:
        print(f"  best config:   {s.best_config_path}")
    if s.artifact_dir:
        print(f"  artifact:      {s.artifact_dir}")
    if s.top_adapters:
        print(f"  top adapters:  {' '.join(s.top_adapters)}  (ray-ft serve serves them together)")
    print(f"  output dir:    {s.output_dir}")
    print(f"  MLflow:        {s.tracking_uri}  search run {s.parent_run_id}")
    for note in s.notes:
        print(f"  note:          {note}")
    if s.interrupted:
        print(f"  continue with: {resume_command}")


# --------------------------------------------------------------------------- command line


def _deploy(models: list[str], host: str, port: int) -> int:
    """Serve ``models`` with ``ray-ft serve`` until SIGINT/SIGTERM (on ``$RAY_ADDRESS`` or a new local Ray)."""
    import ray

    import ray_ft.serving as serving

    ray.shutdown()  # the search's Ray connection; serving starts or joins its own
    print(f"[ray-ft] deploying {', '.join(models)}", flush=True)
    parser = argparse.ArgumentParser(prog="ray-ft")
    serving.add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", *models, "--host", host, "--port", str(port)])
    return args.func(args)


def cmd_tune(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.deploy:
        from ray_ft.serving import check_port_free

        check_port_free(args.host, args.port)  # refuse now rather than after the search
    summary = run_search(cfg, resume=args.resume)
    again = ["ray-ft", "tune", args.config, *args.overrides, "--resume", *(["--deploy"] if args.deploy else [])]
    print_summary(summary, cfg.tune.metric, resume_command=" ".join(shlex.quote(a) for a in again))
    if summary.interrupted:
        return 130
    if args.deploy:
        # LoRA searches serve their best trials side by side as adapters of one engine; others the best model.
        models = summary.top_adapters or ([summary.artifact_dir] if summary.artifact_dir else [])
        if not models:
            print("error: --deploy: the search exported no model", file=sys.stderr)
            return 2
        return _deploy(models, args.host, args.port)
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``ray-ft tune CONFIG [key=value ...] [--resume] [--deploy]``."""
    p = subparsers.add_parser(
        "tune", help="search LoRA r/alpha/learning rate with Ray Tune + ASHA; export the best trial"
    )
    p.add_argument("config", help="YAML config with a `tune` section (see jobs/tune_lora.yaml)")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides (e.g. tune.num_samples=8)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search in output_dir")
    p.add_argument(
        "--deploy", action="store_true", help="serve the best trials' adapters (or the best model) after the search"
    )
    p.add_argument("--host", default="127.0.0.1", help="with --deploy: address to listen on")
    p.add_argument("--port", type=int, default=8000, help="with --deploy: port to listen on")
    p.set_defaults(func=cmd_tune)
