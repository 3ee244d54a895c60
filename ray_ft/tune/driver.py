"""The search driver: one ``Tuner`` over :func:`ray_ft.tune.trial.train_driver_fn` with ASHA (or FIFO), random
or Optuna search, concurrency fitted to the cluster, and ``--resume`` through ``Tuner.restore``. It owns the
search's MLflow parent run and, once Tune returns, classifies the trials, closes their child runs, writes the
report and exports the best trial."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from ray_ft import logs, tracking
from ray_ft.config import ExperimentConfig, SearchConfig, save_config
from ray_ft.tracking import RunRef
from ray_ft.tune import report
from ray_ft.tune.export import export_best, export_top_adapters
from ray_ft.tune.report import EARLY_STOPPED, FAILED, SearchSummary, TrialOutcome
from ray_ft.tune.space import check_search, search_space, search_space_text, searched, trial_config
from ray_ft.tune.trial import DRIVER_CPU, TRIAL_TAG, SearchContext, train_driver_fn, trial_resources

logger = logging.getLogger(__name__)

SEARCH_STATE_FILE = "search.json"
"""The search's MLflow parent run (:class:`ray_ft.tracking.RunRef`), read back by ``--resume``."""


def concurrent_trials(cfg: ExperimentConfig, cluster: dict[str, float]) -> int:
    """``tune.max_concurrent_trials``, else as many trials as the cluster's CPUs (and GPUs) hold at once."""
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    fits = [math.floor(cluster.get(k, 0.0) / v + 1e-9) for k, v in trial_resources(cfg).items() if v > 0]
    return max(1, min([*fits, cfg.tune.num_samples]))


def _init_ray(cfg: ExperimentConfig) -> None:
    """Connect to the configured cluster, or start a local Ray that can hold at least one trial: its Train
    workers plus the trial's driver (``DRIVER_CPU``)."""
    from ray_ft.train import init_ray

    init_ray(cfg, extra_cpus=DRIVER_CPU)


def _trial_name(trial) -> str:
    return f"trial_{trial.trial_id}"


def _scheduler(search: SearchConfig, total_steps: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if search.scheduler != "asha":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="step",
        max_t=total_steps,
        grace_period=min(search.grace_period, total_steps),
        reduction_factor=search.reduction_factor,
    )


def _tuner(cfg: ExperimentConfig, trainable, storage_root: str, name: str, total_steps: int, resume: bool):
    """A new ``Tuner`` for ``cfg.tune``, or the one saved under ``storage_root/name`` when resuming."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    search = cfg.tune
    if resume:
        return tune.Tuner.restore(f"{storage_root.rstrip('/')}/{name}", trainable=trainable, resume_errored=True)
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
            scheduler=_scheduler(search, total_steps),
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


def _parent_run(cfg: ExperimentConfig, out: Path, resume: bool) -> RunRef:
    parent, resumed = tracking.start_or_resume(
        cfg, out / SEARCH_STATE_FILE, resume, run_name=out.name, tags={"ray_ft.search": "true"}
    )
    if resumed:
        logger.info("[ray-ft] resuming MLflow search run %s", parent.run_id)
    return parent


def _check_resume(experiment_dir: str, resume: bool) -> bool:
    """Whether to restore the Tune experiment at ``experiment_dir``; refuses to start over an earlier one."""
    from ray import tune

    from ray_ft.job import JobError

    if tune.Tuner.can_restore(experiment_dir):
        if not resume:
            raise JobError(
                f"{experiment_dir} holds an earlier search; pass --resume to continue it, or choose another output_dir"
            )
        return True
    if resume:
        logger.info("[ray-ft] nothing to resume in %s; starting a new search", experiment_dir)
    return False


def _log_plan(cfg: ExperimentConfig, search: SearchConfig, total_steps: int, experiment_dir: str) -> None:
    sched = (
        f"ASHA on {search.metric} ({search.mode}), grace {search.grace_period} steps, "
        f"reduction factor {search.reduction_factor}"
        if search.scheduler == "asha"
        else "FIFO (every trial runs to the end)"
    )
    logger.info(
        "[ray-ft] search: %s trials of %s steps, %s search over %s; %s; each trial holds %s "
        "(%s worker(s)), up to %s at once",
        search.num_samples,
        total_steps,
        search.search_alg,
        search_space_text(search),
        sched,
        trial_resources(cfg),
        cfg.scaling.num_workers,
        search.max_concurrent_trials,
    )
    logger.info("[ray-ft] Tune experiment %s", experiment_dir)


def _trial_context(
    cfg: ExperimentConfig,
    out: Path,
    parent: RunRef,
    model_dir: str,
    train: list[dict],
    val: list[dict],
    storage_root: str,
) -> tuple[ExperimentConfig, SearchContext]:
    """The base config every trial starts from, and what the trials share through the object store.

    Trials see absolute paths and a pinned tracking URI (Tune runs each trial in its own directory).
    """
    pinned = cfg.model_copy(deep=True)
    pinned.output_dir = str(out)
    pinned.tracking.tracking_uri = parent.uri
    context = SearchContext(
        base_config=pinned.to_dict(),
        model_dir=model_dir,
        train_records=train,
        val_records=val,
        tracking_uri=parent.uri,
        parent_run_id=parent.run_id,
        train_storage=f"{storage_root.rstrip('/')}/{out.name}-trials",
    )
    return pinned, context


def run_search(cfg: ExperimentConfig, resume: bool = False) -> SearchSummary:
    """Run the search in ``cfg.tune``; export the best trial; log progress and return a summary.

    Args:
        cfg: the experiment config; ``tune`` holds the search space and scheduler settings.
        resume: continue an interrupted search in ``output_dir`` (errored trials are retried from their
            last checkpoints) instead of refusing to overwrite it.

    Raises:
        JobError: ``output_dir`` holds an earlier search and ``resume`` is off, or every trial failed.
    """
    from ray import tune

    from ray_ft.job import load_dataset, resolve_prompt_format
    from ray_ft.models import resolve_model_dir
    from ray_ft.outputs import check_output_dir, prepare_output_dir
    from ray_ft.train import plan_steps, storage_path
    from ray_ft.train.batching import fit_batch_to_data

    logs.configure()
    t0 = time.time()
    check_output_dir(cfg.output_dir, resume)
    ds, train, val = load_dataset(cfg)
    check_search(cfg, len(val))
    model_dir = resolve_model_dir(cfg.model)
    cfg = resolve_prompt_format(cfg, ds.format, model_dir)
    cfg, line = fit_batch_to_data(cfg, len(train))  # every trial trains on the same batch
    if line:
        logger.info("%s", line)
    logger.info(
        "[ray-ft] data %s: %s, %s examples; train %s, validation %s",
        ds.path,
        ds.format,
        ds.stats["examples"],
        len(train),
        len(val),
    )
    out = Path(cfg.output_dir).resolve()
    storage_root = storage_path(cfg)
    experiment_dir = f"{storage_root.rstrip('/')}/{out.name}"  # a local path or a URI (s3://...)
    resume = _check_resume(experiment_dir, resume)
    prepare_output_dir(out, resume)
    save_config(cfg, out / "config.yaml")
    _, total_steps = plan_steps(cfg, len(train), cfg.scaling.num_workers)

    parent = _parent_run(cfg, out, resume)
    tracking.log_artifact(parent.uri, parent.run_id, out / "config.yaml")
    logger.info("[ray-ft] MLflow %s search run %s", parent.uri, parent.run_id)

    pinned, context = _trial_context(cfg, out, parent, model_dir, train, val, storage_root)
    _init_ray(cfg)
    import ray

    search = cfg.tune
    if not search.max_concurrent_trials:
        search = search.model_copy(update={"max_concurrent_trials": concurrent_trials(cfg, ray.cluster_resources())})
        pinned.tune = search
    _log_plan(cfg, search, total_steps, experiment_dir)
    trainable = tune.with_resources(tune.with_parameters(train_driver_fn, context=context), {"CPU": DRIVER_CPU})
    tuner = _tuner(pinned, trainable, storage_root, out.name, total_steps, resume)
    try:
        results = tuner.fit()
        summary = _finish_search(cfg, search, results, ds, model_dir, out, storage_root, total_steps, parent)
    except BaseException:
        if tracking.run_status(parent) == "RUNNING":
            tracking.end_run(parent.uri, parent.run_id, "FAILED")
        raise
    summary.wall_s = time.time() - t0
    return summary


def _close_runs(parent: RunRef, trials: list[TrialOutcome], best: TrialOutcome | None) -> None:
    """Give every child run its final status and tags (a trial stopped by ASHA never ends its own run)."""
    for t in trials:
        if t.run_id is None:
            continue
        run = RunRef(parent.uri, t.run_id)
        tags = {"ray_ft.best_trial": "true"} if best is not None and t.trial_id == best.trial_id else {}
        if t.status == FAILED:
            tracking.set_tags(run, {"ray_ft.error": t.error or "", **tags})
            tracking.end_run(run.uri, run.run_id, "FAILED")
            continue
        if t.status == EARLY_STOPPED:
            tags["ray_ft.early_stopped"] = "true"
        tracking.set_tags(run, tags)
        tracking.end_run(run.uri, run.run_id, "FINISHED")


def _kill_open_runs(parent: RunRef) -> None:
    """An interrupted search: its still-running child runs and itself end as ``KILLED``."""
    for run_id in tracking.child_runs(parent, TRIAL_TAG).values():
        run = RunRef(parent.uri, run_id)
        if tracking.run_status(run) == "RUNNING":
            tracking.end_run(run.uri, run.run_id, "KILLED")
    tracking.end_run(parent.uri, parent.run_id, "KILLED")


def _log_report(summary: SearchSummary, search: SearchConfig, out: Path, parent: RunRef) -> Path:
    """Write ``trials.csv``/``trials.md`` and the plot, log them and the counts to the parent run."""
    csv_path, md_path = report.write_table(summary.trials, search.metric, out)
    for path in (csv_path, md_path):
        tracking.log_artifact(parent.uri, parent.run_id, path)
    if report.plot(summary.trials, search.metric, searched(search), out / "search_plot.png"):
        tracking.log_artifact(parent.uri, parent.run_id, out / "search_plot.png")
    counts = {
        "trials": len(summary.trials),
        "trials_early_stopped": summary.count(EARLY_STOPPED),
        "trials_failed": summary.count(FAILED),
        "trial_steps": summary.trial_steps,
    }
    tracking.StepLogger(parent.uri, parent.run_id).log(counts, step=0)
    return md_path


def _finish_search(
    cfg: ExperimentConfig,
    search: SearchConfig,
    results,
    ds,
    model_dir: str,
    out: Path,
    storage_root: str,
    total_steps: int,
    parent: RunRef,
) -> SearchSummary:
    """Classify the trials, close their MLflow runs, write the tables, plot and best config, export the best."""
    from ray_ft.job import JobError

    trials = report.outcomes(results, cfg, total_steps, parent)
    interrupted = results.num_terminated + results.num_errors < len(results) or len(results) < search.num_samples
    summary = SearchSummary(
        output_dir=str(out),
        tracking_uri=parent.uri,
        parent_run_id=parent.run_id,
        trials=trials,
        best=None,
        total_steps=total_steps,
        interrupted=interrupted,
    )
    if interrupted:
        _kill_open_runs(parent)
        return summary
    for t in trials:
        if t.status == FAILED:
            logger.info("[ray-ft] trial %s failed: %s", t.trial_id, t.error)

    best = summary.best = report.best(trials, search.metric, search.mode)
    _close_runs(parent, trials, best)
    md_path = _log_report(summary, search, out, parent)
    if best is None:
        tracking.end_run(parent.uri, parent.run_id, "FAILED")
        raise JobError(f"every trial failed; see {md_path}")

    best_cfg = trial_config(cfg, best.hyperparameters)
    best_cfg.output_dir = str(Path(cfg.output_dir) / "best")
    save_config(best_cfg, out / "best_config.yaml")
    summary.best_config_path = str(out / "best_config.yaml")
    tracking.log_artifact(parent.uri, parent.run_id, out / "best_config.yaml")
    tracking.StepLogger(parent.uri, parent.run_id).log({f"best_{k}": v for k, v in best.metrics.items()}, step=0)
    tracking.set_tags(parent, {"ray_ft.best_trial_id": best.trial_id, "ray_ft.best_run_id": best.run_id or ""})
    tracking.log_params(parent, {f"best.{k}": v for k, v in best.hyperparameters.items()})

    if best.checkpoint_path:
        summary.artifact_dir = export_best(
            best_cfg, best, model_dir, storage_root, out, parent.uri, parent.run_id, ds.labels
        )
    else:
        summary.notes.append(f"trial {best.trial_id} reported no checkpoint; nothing exported")
    if cfg.method.name in ("lora", "qlora"):
        ranked = report.ranked(trials, search.metric, search.mode)
        summary.top_adapters = export_top_adapters(cfg, model_dir, ranked, storage_root, out)
    tracking.end_run(parent.uri, parent.run_id, "FINISHED")
    return summary
