"""One training job end to end: validate → train on Ray → export → evaluate → record.

This is what ``ray-ft train`` runs. Output layout under ``output_dir``::

    config.yaml      the resolved config        run.json     MLflow run id + tracking URI
    ray/             Ray Train checkpoints      trainable/   adapter / prompt / head weights
    merged/|export/  the servable artifact      eval.json    base vs tuned metrics
    loss_curve.png
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray_ft import tracking
from ray_ft.chat import choose_chat_template
from ray_ft.checkpoints import verify_checkpoints
from ray_ft.config import ExperimentConfig, save_config
from ray_ft.data import Dataset, DataSummary, PromptFormat, check_data, find_sources, read_data, split
from ray_ft.export import write_artifact
from ray_ft.ingest import sample_records, scan_sources
from ray_ft.methods import TuningMethod, get_method
from ray_ft.models import resolve_model_dir
from ray_ft.outputs import check_output_dir, prepare_output_dir, replacing, write_file
from ray_ft.sources import Source
from ray_ft.train import TRAINABLE_DIR, FitResult, existing_checkpoints, fit, init_ray, storage_path
from ray_ft.train.batching import fit_batch_to_data

logger = logging.getLogger(__name__)


class JobError(RuntimeError):
    pass


@dataclass
class JobSummary:
    output_dir: str
    artifact_dir: str
    tracking_uri: str
    run_id: str
    metrics: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0
    train_wall_s: float = 0.0
    """Seconds in the training driver (``fit``), without export and evaluation."""


STREAM_ABOVE_BYTES = 16 << 20
"""With ``data.streaming`` unset, local data larger than this on disk is streamed through Ray Data."""


def _check_task(cfg: ExperimentConfig, method: TuningMethod, fmt: str) -> None:
    task = method.task
    if (fmt == "classification") != (task == "classification"):
        want = "classification ({text, label})" if task == "classification" else "qa, io, chat, sharegpt or alpaca"
        raise JobError(f"{cfg.data.path}: method {cfg.method.name!r} needs {want} data, got {fmt!r}")


def load_dataset(
    cfg: ExperimentConfig, *, method: TuningMethod | None = None
) -> tuple[Dataset, list[dict], list[dict]]:
    """Validate all the data in memory and split it (raises ``DataError`` before anything starts).

    ``method`` is the run's resolved method (default: the one ``cfg.method.name`` names)."""
    ds = read_data(cfg.data.path, cfg.data.format, cfg.data.dedupe, cfg.data.file_format)
    _check_task(cfg, method or get_method(cfg.method.name), ds.format)
    train, val = split(ds.records, cfg.data.val_fraction, cfg.data.seed, cfg.data.limit)
    return ds, train, val


def choose_streaming(cfg: ExperimentConfig, method: TuningMethod, sources: list[Source]) -> tuple[bool, str]:
    """Whether the run streams its data through Ray Data, and why.

    ``data.streaming`` decides when set. Unset: methods that do not train the causal-LM loop (linear probe) read in
    memory;
    otherwise data on a remote store, or over :data:`STREAM_ABOVE_BYTES` on disk, is streamed, and smaller local
    data is read in memory (faster to start: no Ray Data pipeline, and each worker tokenises it in seconds; at 30 MB
    the workers' tokenising already cost more than streaming, see ``docs/data.md``).
    """
    if cfg.data.streaming is not None:
        return cfg.data.streaming, f"data.streaming={str(cfg.data.streaming).lower()}"
    if method.loop != "causal_lm":
        return False, f"method {cfg.method.name!r} reads its data in memory"
    remote = next((s.uri for s in sources if s.remote), None)
    if remote:
        return True, f"remote data ({remote})"
    size = sum(s.size for s in sources)
    limit = f"{STREAM_ABOVE_BYTES >> 20} MiB"
    if size > STREAM_ABOVE_BYTES:
        return True, f"{size / 2**20:.0f} MiB on disk, over {limit}"
    return False, f"{size / 2**20:.1f} MiB on disk, up to {limit}"


@dataclass
class TrainingData:
    """A run's data: what the training driver receives and what evaluation reads.

    Attributes:
        train: Training records, or the checked data set when streamed (read again by Ray Data).
        val: Validation records (empty when streamed: Ray Data streams them too).
        eval_train: Training records to evaluate on (the first ``eval.max_examples``).
        eval_val: Validation records to evaluate on.
        labels: Sorted label names (classification).
        format: Record format (``qa``, ``chat``, ...).
    """

    train: list[dict] | DataSummary
    val: list[dict]
    eval_train: list[dict]
    eval_val: list[dict]
    labels: list[str]
    format: str


def load_training_data(
    cfg: ExperimentConfig, *, method: TuningMethod | None = None
) -> tuple[ExperimentConfig, TrainingData]:
    """Check and split the data, choose in memory or streamed, and fit the batch to the training-set size.

    Returns the config to train with (``data.streaming`` resolved, the batch possibly shrunk) and the data. Logs
    one line on the data, one on the reading path, and one when the batch changed. ``method`` is the run's resolved
    method (default: the one ``cfg.method.name`` names).
    """
    method = method or get_method(cfg.method.name)
    streamed, why = choose_streaming(cfg, method, find_sources(cfg.data.path, cfg.data.file_format))
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"streaming": streamed})})
    if streamed:
        init_ray(cfg)
        d = cfg.data
        limits = {"seed": d.seed, "val_fraction": d.val_fraction, "limit": d.limit}
        summary = check_data(d.path, d.format, d.dedupe, d.file_format, **limits, scan=scan_sources)
        _check_task(cfg, method, summary.format)
        n_train, n_val = summary.plan.n_train, summary.plan.n_val
        eval_train, eval_val = sample_records(summary, cfg.eval.max_examples)
        data = TrainingData(summary, [], eval_train, eval_val, sorted(summary.labels), summary.format)
        fmt, stats, files = summary.format, summary.stats, len({s.uri for s in summary.sources})
    else:
        ds, train, val = load_dataset(cfg, method=method)
        n_train, n_val = len(train), len(val)
        data = TrainingData(train, val, train, val, ds.labels, ds.format)
        fmt, stats, files = ds.format, ds.stats, len({r.get("_source") for r in ds.records})
    logger.info(
        "[ray-ft] data %s%s: %s, %d examples (%d duplicates dropped, %d normalised); %strain %d, validation %d",
        cfg.data.path,
        f" ({files} files)" if files > 1 else "",
        fmt,
        stats["examples"],
        stats["duplicates_dropped"],
        stats["normalized"],
        f"a seeded sample of {n_train + n_val}; " if cfg.data.limit else "",
        n_train,
        n_val,
    )
    logger.info("[ray-ft] data %s: %s", "streamed through Ray Data" if streamed else "read in memory", why)
    cfg, line = fit_batch_to_data(cfg, n_train)
    if line:
        logger.info("%s", line)
    return cfg, data


def resolve_prompt_format(cfg: ExperimentConfig, record_format: str, model_dir: str) -> ExperimentConfig:
    """``cfg`` with ``data.use_chat_template`` decided (see :func:`ray_ft.chat.choose_chat_template`); logs the
    choice. Every later step (training, export metadata, evaluation, serving) renders prompts as chosen here."""
    if record_format == "classification":
        return cfg
    from ray_ft.models import load_tokenizer

    tokenizer = load_tokenizer(model_dir, cfg.model.trust_remote_code)
    chosen, why = choose_chat_template(cfg.data.use_chat_template, record_format, tokenizer)
    logger.info("[ray-ft] prompts: %s (%s)", "the model's chat template" if chosen else "data.template", why)
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"use_chat_template": chosen})})


def artifact_metadata(
    cfg: ExperimentConfig, model_dir: str, run_id: str | None, *, method: TuningMethod | None = None, **extra
) -> dict[str, Any]:
    """The ``ray_ft.json`` metadata of an artifact; ``extra`` is added to it."""
    method = method or get_method(cfg.method.name)
    return {
        "method": method.name,
        "task": method.task,
        "artifact": method.artifact,
        "base_model": cfg.model.name_or_path,
        "base_model_dir": model_dir,
        "prompt_format": PromptFormat.from_config(cfg.data).to_dict(),
        "mlflow_run_id": run_id,
        **extra,
    }


def _plot_history(history: list[dict[str, Any]], path: Path) -> bool:
    rows = [h for h in history if "loss" in h]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in rows], [h["loss"] for h in rows], label="train loss")
    val = [h for h in rows if "val_loss" in h]
    if val:
        ax.plot([h["step"] for h in val], [h["val_loss"] for h in val], "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return True


class _Interrupted(Exception):
    pass


def _raise_interrupt(signum, frame):
    raise _Interrupted(signal.Signals(signum).name)


def run_training(cfg: ExperimentConfig, resume: bool = False, parent_run_id: str | None = None) -> JobSummary:
    """Train, export and evaluate one config; every step logs progress, the end logs a summary."""
    t0 = time.time()
    method = get_method(cfg.method.name)  # resolved once; everything below receives the object
    check_output_dir(cfg.output_dir, resume)  # before anything else: a refused path costs nothing
    cfg, data = load_training_data(cfg, method=method)
    model_dir = resolve_model_dir(cfg.model)
    cfg = resolve_prompt_format(cfg, data.format, model_dir)
    out = Path(cfg.output_dir).resolve()
    if existing_checkpoints(cfg) and not resume:
        raise JobError(
            f"{out} already holds checkpoints of an earlier run; pass --resume to continue it, "
            "or choose another output_dir"
        )
    if resume:
        verify_checkpoints(existing_checkpoints(cfg))  # nothing is unpickled from a checkpoint ray-ft did not write
    prepare_output_dir(out, resume)
    save_config(cfg, out / "config.yaml")

    run_file = out / "run.json"
    if resume and run_file.is_file():
        info = json.loads(run_file.read_text())
        uri, run_id = info["tracking_uri"], info["run_id"]
        tracking.client(uri).update_run(run_id, status="RUNNING")
        logger.info("[ray-ft] resuming MLflow run %s", run_id)
    else:
        uri, run_id = tracking.start_run(cfg, run_name=out.name, parent_run_id=parent_run_id)
        write_file(run_file, json.dumps({"tracking_uri": uri, "run_id": run_id}))
    tracking.log_artifact(uri, run_id, out / "config.yaml")
    logger.info("[ray-ft] MLflow %s run %s", uri, run_id)

    previous = {s: signal.signal(s, _raise_interrupt) for s in (signal.SIGTERM,)}
    try:
        result = fit(cfg, method, model_dir, data.train, data.val, tracking_uri=uri, run_id=run_id)
        summary = _finish(cfg, method, model_dir, result, data.eval_train, data.eval_val, out, uri, run_id, data)
    except (KeyboardInterrupt, SystemExit, _Interrupted) as e:
        # Ray Train turns SIGINT into a graceful abort that ends in SystemExit; SIGTERM arrives as _Interrupted.
        tracking.end_run(uri, run_id, "KILLED")
        logger.info(
            "\n[ray-ft] interrupted (%s); checkpoints kept under %s; continue with: ray-ft train %s --resume",
            type(e).__name__,
            storage_path(cfg),
            out / "config.yaml",
        )
        raise KeyboardInterrupt from None
    except BaseException:
        tracking.end_run(uri, run_id, "FAILED")
        raise
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    tracking.end_run(uri, run_id, "FINISHED")
    summary.wall_s = time.time() - t0
    return summary


def export_checkpoint(
    cfg: ExperimentConfig,
    model_dir: str,
    checkpoint_dir: str | Path,
    out: Path,
    uri: str,
    run_id: str,
    *,
    method: TuningMethod | None = None,
    **extra,
) -> Path:
    """Copy a checkpoint's trained parameters to ``out/trainable`` and export the servable artifact beside it.

    Both are logged to the MLflow run, and the artifact is registered when ``tracking.registered_model`` is set.
    ``extra`` goes into the artifact metadata. ``method`` is the run's resolved method (default: the one
    ``cfg.method.name`` names). Returns the artifact directory.
    """
    method = method or get_method(cfg.method.name)
    meta = artifact_metadata(cfg, model_dir, run_id, method=method, **extra)
    trained = Path(checkpoint_dir) / TRAINABLE_DIR
    write_artifact(
        out / "trainable", lambda d: shutil.copytree(trained, d, dirs_exist_ok=True), {**meta, "artifact": "trainable"}
    )
    tracking.log_artifact(uri, run_id, out / "trainable", "trainable")
    artifact_dir = out / method.artifact
    logger.info("[ray-ft] exporting %s → %s", method.name, artifact_dir)
    write_artifact(artifact_dir, lambda d: method.export(cfg, model_dir, out / "trainable", d), meta)
    tracking.log_artifact(uri, run_id, artifact_dir, method.artifact)
    if cfg.tracking.registered_model:
        name = cfg.tracking.registered_model.format(method=method.name)
        version = tracking.register_model(uri, run_id, name, method.artifact)
        logger.info("[ray-ft] registered model %s version %s", name, version)
    return artifact_dir


def _finish(
    cfg: ExperimentConfig,
    method: TuningMethod,
    model_dir: str,
    result: FitResult,
    train: list[dict],
    val: list[dict],
    out: Path,
    uri: str,
    run_id: str,
    ds: TrainingData,
) -> JobSummary:
    if result.checkpoint_dir is None:
        raise JobError("training finished without a checkpoint (Ray Train local mode keeps none); use num_workers >= 1")
    artifact_dir = export_checkpoint(
        cfg, model_dir, result.checkpoint_dir, out, uri, run_id, method=method, labels=ds.labels or None
    )
    # Ray Train callbacks run in the controller process, so the curve is read back from the MLflow run.
    c = tracking.client(uri)
    curves = {k: {m.step: m.value for m in c.get_metric_history(run_id, k)} for k in ("loss", "val_loss")}
    history = [
        {"step": st, "loss": v, **({"val_loss": curves["val_loss"][st]} if st in curves["val_loss"] else {})}
        for st, v in sorted(curves["loss"].items())
    ]
    if _plot_history(history, out / "loss_curve.png"):
        tracking.log_artifact(uri, run_id, out / "loss_curve.png")

    evaluation: dict[str, Any] = {}
    if cfg.eval.enabled:
        evaluation = method.evaluate_run(cfg, model_dir, artifact_dir, train, val)
        write_file(out / "eval.json", json.dumps(evaluation, indent=1, ensure_ascii=False))
        tracking.log_artifact(uri, run_id, out / "eval.json")
        for name in evaluation.get("artifacts", []):  # files the evaluation wrote into output_dir (plots)
            tracking.log_artifact(uri, run_id, out / name)
        flat = {
            f"eval.{m}.{s}.{k}": v
            for m, splits in evaluation["metrics"].items()
            for s, vals in splits.items()
            for k, v in vals.items()
            if isinstance(v, int | float)
        }
        tracking.StepLogger(uri, run_id).log(flat, step=int(result.metrics.get("step", 0)))
    return JobSummary(
        output_dir=str(out),
        artifact_dir=str(artifact_dir),
        tracking_uri=uri,
        run_id=run_id,
        metrics=result.metrics,
        evaluation=evaluation,
        train_wall_s=result.wall_s,
    )
