"""MLflow, from one place.

The driver owns the run (params, artifacts, status, model registry); rank 0 of the Ray Train
worker group logs per-step metrics into the same run by id. One training is one MLflow run,
however many workers or restarts it takes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ray_ft.config import ExperimentConfig, TrackingConfig


def tracking_uri(cfg: TrackingConfig) -> str:
    """``tracking.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else a local SQLite store."""
    if cfg.tracking_uri:
        return cfg.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = Path(cfg.mlflow_dir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def _artifact_root(cfg: TrackingConfig, uri: str) -> str | None:
    if uri.startswith("sqlite:"):
        return (Path(cfg.mlflow_dir).expanduser().resolve() / "artifacts").as_uri()
    return None


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = str(v)[:6000]
    return out


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def start_run(cfg: ExperimentConfig, run_name: str, parent_run_id: str | None = None) -> tuple[str, str]:
    """Create the MLflow run for one training; return ``(tracking_uri, run_id)``."""
    uri = tracking_uri(cfg.tracking)
    c = client(uri)
    exp = c.get_experiment_by_name(cfg.tracking.experiment)
    exp_id = (
        exp.experiment_id
        if exp
        else c.create_experiment(cfg.tracking.experiment, artifact_location=_artifact_root(cfg.tracking, uri))
    )
    tags = {"mlflow.runName": run_name, "ray_ft.method": cfg.method.name}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(exp_id, tags=tags, run_name=run_name)
    params = flatten(cfg.to_dict())
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):
        c.log_batch(run.info.run_id, params=items[i : i + 100])
    return uri, run.info.run_id


class StepLogger:
    """Per-step metrics into an existing run (used on rank 0 inside the workers)."""

    def __init__(self, uri: str | None, run_id: str | None):
        self.run_id = run_id
        self._client = client(uri) if uri and run_id else None

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self._client is None:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        )


def end_run(uri: str, run_id: str, status: str) -> None:
    client(uri).set_terminated(run_id, status=status)


def log_artifact(uri: str, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    path = Path(path)
    c = client(uri)
    if path.is_dir():
        c.log_artifacts(run_id, str(path), artifact_path)
    else:
        c.log_artifact(run_id, str(path), artifact_path)


def register_model(uri: str, run_id: str, name: str, artifact_path: str) -> str | None:
    """Register ``runs:/<run_id>/<artifact_path>`` as a new version of ``name``."""
    c = client(uri)
    try:
        c.get_registered_model(name)
    except Exception:
        c.create_registered_model(name)
    mv = c.create_model_version(name, f"runs:/{run_id}/{artifact_path}", run_id=run_id)
    return mv.version
