"""One training job end to end: validate → train on Ray → export → evaluate → record.

This is what ``ray-ft train`` runs. Output layout under ``output_dir``::

    config.yaml      the resolved config        run.json     MLflow run id + tracking URI
    ray/             Ray Train checkpoints      trainable/   adapter / prompt / head weights
    merged/|export/  the servable artifact      eval.json    base vs tuned metrics
    loss_curve.png
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray_ft import tracking
from ray_ft.config import ExperimentConfig, save_config
from ray_ft.data import Dataset, PromptFormat, read_jsonl, split
from ray_ft.export import write_artifact
from ray_ft.methods import get_method
from ray_ft.models import resolve_model_dir


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


def load_dataset(cfg: ExperimentConfig) -> tuple[Dataset, list[dict], list[dict]]:
    """Validate the whole data file and split it (raises ``DataError`` before anything starts)."""
    ds = read_jsonl(cfg.data.path, cfg.data.format, cfg.data.dedupe)
    task = get_method(cfg.method.name).task
    if (ds.format == "classification") != (task == "classification"):
        want = "classification ({text, label})" if task == "classification" else "qa, io or chat"
        raise JobError(f"{cfg.data.path}: method {cfg.method.name!r} needs {want} data, got {ds.format!r}")
    train, val = split(ds.records, cfg.data.val_fraction, cfg.data.seed, cfg.data.limit)
    return ds, train, val


def artifact_metadata(cfg: ExperimentConfig, model_dir: str, run_id: str | None, **extra) -> dict[str, Any]:
    method = get_method(cfg.method.name)
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
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


class _Interrupted(Exception):
    pass


def _raise_interrupt(signum, frame):
    raise _Interrupted(signal.Signals(signum).name)


def run_training(cfg: ExperimentConfig, resume: bool = False, parent_run_id: str | None = None) -> JobSummary:
    """Train, export and evaluate one config; every step prints progress, the end prints a summary."""
    from ray_ft.train import existing_checkpoints, fit, storage_path

    t0 = time.time()
    method = get_method(cfg.method.name)
    ds, train, val = load_dataset(cfg)
    print(
        f"[ray-ft] data {ds.path}: {ds.format}, {ds.stats['examples']} examples "
        f"({ds.stats['duplicates_dropped']} duplicates dropped, {ds.stats['normalized']} normalised); "
        f"{f'a seeded sample of {len(train) + len(val)}; ' if cfg.data.limit else ''}"
        f"train {len(train)}, validation {len(val)}",
        flush=True,
    )
    out = Path(cfg.output_dir).resolve()
    if existing_checkpoints(cfg) and not resume:
        raise JobError(
            f"{out} already holds checkpoints of an earlier run; pass --resume to continue it, "
            "or choose another output_dir"
        )
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    model_dir = resolve_model_dir(cfg.model)

    run_file = out / "run.json"
    if resume and run_file.is_file():
        info = json.loads(run_file.read_text())
        uri, run_id = info["tracking_uri"], info["run_id"]
        tracking.client(uri).update_run(run_id, status="RUNNING")
        print(f"[ray-ft] resuming MLflow run {run_id}", flush=True)
    else:
        uri, run_id = tracking.start_run(cfg, run_name=out.name, parent_run_id=parent_run_id)
        run_file.write_text(json.dumps({"tracking_uri": uri, "run_id": run_id}))
    tracking.log_artifact(uri, run_id, out / "config.yaml")
    print(f"[ray-ft] MLflow {uri} run {run_id}", flush=True)

    previous = {s: signal.signal(s, _raise_interrupt) for s in (signal.SIGTERM,)}
    try:
        # A method may bring its own driver (``linear_probe``: features once, then a head); default: Ray Train loop.
        method_fit = getattr(method, "fit", fit)
        result = method_fit(cfg, model_dir, train, val, tracking_uri=uri, run_id=run_id)
        summary = _finish(cfg, method, model_dir, result, train, val, out, uri, run_id, ds)
    except (KeyboardInterrupt, SystemExit, _Interrupted) as e:
        # Ray Train turns SIGINT into a graceful abort that ends in SystemExit; SIGTERM arrives as _Interrupted.
        tracking.end_run(uri, run_id, "KILLED")
        print(
            f"\n[ray-ft] interrupted ({type(e).__name__}); checkpoints kept under {storage_path(cfg)}; "
            f"continue with: ray-ft train {out / 'config.yaml'} --resume",
            flush=True,
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
    cfg: ExperimentConfig, model_dir: str, checkpoint_dir: str | Path, out: Path, uri: str, run_id: str, **extra
) -> Path:
    """Copy a checkpoint's trained parameters to ``out/trainable`` and export the servable artifact beside it.

    Both are logged to the MLflow run, and the artifact is registered when ``tracking.registered_model`` is set.
    ``extra`` goes into the artifact metadata. Returns the artifact directory.
    """
    from ray_ft.train import TRAINABLE_DIR

    method = get_method(cfg.method.name)
    meta = artifact_metadata(cfg, model_dir, run_id, **extra)
    trained = Path(checkpoint_dir) / TRAINABLE_DIR
    write_artifact(
        out / "trainable", lambda d: shutil.copytree(trained, d, dirs_exist_ok=True), {**meta, "artifact": "trainable"}
    )
    tracking.log_artifact(uri, run_id, out / "trainable", "trainable")
    artifact_dir = out / method.artifact
    print(f"[ray-ft] exporting {method.name} → {artifact_dir}", flush=True)
    write_artifact(artifact_dir, lambda d: method.export(cfg, model_dir, out / "trainable", d), meta)
    tracking.log_artifact(uri, run_id, artifact_dir, method.artifact)
    if cfg.tracking.registered_model:
        name = cfg.tracking.registered_model.format(method=method.name)
        version = tracking.register_model(uri, run_id, name, method.artifact)
        print(f"[ray-ft] registered model {name} version {version}", flush=True)
    return artifact_dir


def _finish(cfg, method, model_dir, result, train, val, out: Path, uri: str, run_id: str, ds) -> JobSummary:
    if result.checkpoint_dir is None:
        raise JobError("training finished without a checkpoint (Ray Train local mode keeps none); use num_workers >= 1")
    artifact_dir = export_checkpoint(cfg, model_dir, result.checkpoint_dir, out, uri, run_id, labels=ds.labels or None)
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
        from ray_ft.evaluate import evaluate_run

        evaluation = getattr(method, "evaluate_run", evaluate_run)(cfg, model_dir, artifact_dir, train, val)
        (out / "eval.json").write_text(json.dumps(evaluation, indent=1, ensure_ascii=False))
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
