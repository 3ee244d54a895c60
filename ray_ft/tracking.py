"""MLflow, from one place: the only module of ray-ft that imports ``mlflow``.

The driver owns the run (params, artifacts, status, model registry); rank 0 of the Ray Train
worker group logs per-step metrics into the same run by id. One training is one MLflow run,
however many workers or restarts it takes. A search is one parent run with a child run per trial.

A run is named by a :class:`RunRef` (tracking URI + run id), which an output directory keeps as
``run.json`` (training) or ``search.json`` (search) so that ``--resume`` continues the same run.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray_ft.config import ExperimentConfig, TrackingConfig

PARAM_LIMIT = 6000
"""MLflow's longest param value; longer values are cut."""
_BATCH = 100
"""MLflow's most params per ``log_batch``."""


@dataclass(frozen=True)
class RunRef:
    """One MLflow run: where it is tracked and its id."""

    uri: str
    run_id: str

    def save(self, path: str | Path) -> None:
        """Write the reference as JSON (atomically; ``{"tracking_uri": ..., "run_id": ...}``)."""
        from ray_ft.outputs import write_file

        write_file(path, json.dumps({"tracking_uri": self.uri, "run_id": self.run_id}))

    @classmethod
    def load(cls, path: str | Path) -> RunRef:
        """The reference a run or search saved into its output directory."""
        info = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(uri=info["tracking_uri"], run_id=info["run_id"])


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
    """Nested config sections as dotted MLflow params (``train.lr``), values cut to MLflow's limit."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = str(v)[:PARAM_LIMIT]
    return out


def client(uri: str):
    """An ``MlflowClient`` for ``uri``."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _experiment_id(c, cfg: TrackingConfig, uri: str) -> str:
    exp = c.get_experiment_by_name(cfg.experiment)
    if exp:
        return exp.experiment_id
    return c.create_experiment(cfg.experiment, artifact_location=_artifact_root(cfg, uri))


def open_run(cfg: TrackingConfig, run_name: str, tags: dict[str, str], params: dict[str, Any]) -> RunRef:
    """Create a run in ``cfg``'s experiment with ``tags`` and ``params`` (a run that is no single training)."""
    uri = tracking_uri(cfg)
    c = client(uri)
    run = c.create_run(_experiment_id(c, cfg, uri), tags={"mlflow.runName": run_name, **tags}, run_name=run_name)
    ref = RunRef(uri, run.info.run_id)
    log_params(ref, params)
    return ref


def start_run(cfg: ExperimentConfig, run_name: str, parent_run_id: str | None = None) -> tuple[str, str]:
    """Create the MLflow run for one training (its flattened config as params); return ``(tracking_uri, run_id)``."""
    tags = {"ray_ft.method": cfg.method.name}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    ref = open_run(cfg.tracking, run_name, tags, flatten(cfg.to_dict()))
    return ref.uri, ref.run_id


def start_or_resume(
    cfg: ExperimentConfig,
    state_file: Path,
    resume: bool,
    run_name: str,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> tuple[RunRef, bool]:
    """The run of an output directory: the one ``state_file`` names when resuming, else a new one saved there.

    Returns:
        ``(run, resumed)``; a resumed run is marked ``RUNNING`` again, a new one gets ``tags``.
    """
    if resume and state_file.is_file():
        ref = RunRef.load(state_file)
        mark_running(ref)
        return ref, True
    ref = RunRef(*start_run(cfg, run_name=run_name, parent_run_id=parent_run_id))
    if tags:
        set_tags(ref, tags)
    ref.save(state_file)
    return ref, False


def mark_running(ref: RunRef) -> None:
    client(ref.uri).update_run(ref.run_id, status="RUNNING")


def run_status(ref: RunRef) -> str:
    """``RUNNING``, ``FINISHED``, ``FAILED`` or ``KILLED``."""
    return client(ref.uri).get_run(ref.run_id).info.status


def set_tags(ref: RunRef, tags: dict[str, str]) -> None:
    c = client(ref.uri)
    for key, value in tags.items():
        c.set_tag(ref.run_id, key, value)


def log_params(ref: RunRef, params: dict[str, Any]) -> None:
    """Log ``params`` (values as strings, cut to MLflow's limit) in batches."""
    from mlflow.entities import Param

    items = [Param(k, str(v)[:PARAM_LIMIT]) for k, v in params.items()]
    c = client(ref.uri)
    for i in range(0, len(items), _BATCH):
        c.log_batch(ref.run_id, params=items[i : i + _BATCH])


def logged_metrics(ref: RunRef) -> dict[str, float]:
    """The latest value of every metric of the run."""
    return dict(client(ref.uri).get_run(ref.run_id).data.metrics)


def metric_history(ref: RunRef, key: str) -> dict[int, float]:
    """Every logged value of ``key`` by step."""
    return {m.step: m.value for m in client(ref.uri).get_metric_history(ref.run_id, key)}


def child_runs(parent: RunRef, key_tag: str) -> dict[str, str]:
    """Run ids of ``parent``'s child runs carrying ``key_tag``, by that tag's value."""
    c = client(parent.uri)
    experiment_id = c.get_run(parent.run_id).info.experiment_id
    runs = c.search_runs(
        [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.run_id}'", max_results=1000
    )
    return {r.data.tags[key_tag]: r.info.run_id for r in runs if key_tag in r.data.tags}


class StepLogger:
    """Per-step metrics into an existing run (used on rank 0 inside the workers)."""

    def __init__(self, uri: str | None, run_id: str | None):
        self.run_id = run_id
        self._client = client(uri) if uri and run_id else None

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self._client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        )


def end_run(uri: str, run_id: str, status: str) -> None:
    """Close the run with ``status`` (``FINISHED``, ``FAILED``, ``KILLED``)."""
    client(uri).set_terminated(run_id, status=status)


def log_artifact(uri: str, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    """Log a file, or a directory's files, as artifacts of the run."""
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
