"""What the driver hands every Ray Train worker: typed, built once, pickled across the Ray boundary."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ray_ft.config import ExperimentConfig
from ray_ft.data import DataSummary
from ray_ft.methods import TuningMethod


@dataclass(frozen=True)
class ProbeInputs:
    """The linear probe's cached features and label ids (``ray_ft.train.probe``)."""

    info: dict[str, Any]
    """Labels, pooling, layer, max_length, hidden_size: stored with the head (``probe.json``)."""
    train_features: np.ndarray
    train_label_ids: list[int]
    val_features: np.ndarray
    val_label_ids: list[int]


@dataclass(frozen=True)
class WorkerInput:
    """One run's inputs to the per-worker training function.

    Attributes:
        config: The resolved, validated experiment config (not validated again in the workers).
        method: The run's tuning method, resolved once by the driver.
        model_dir: Local directory of the base model.
        train_records: Training records; with ``data.streaming`` the driver's records or checked data set, which
            :func:`ray_ft.train.driver.build_trainer` turns into the shard ``train`` (the workers get none).
        val_records: Validation records (empty when streamed as the shard ``val``, see ``streamed_val``).
        tracking_uri: MLflow tracking URI that rank 0 logs steps into (``None``: not logged).
        run_id: The MLflow run.
        n_train: Training examples in all (streamed runs, where ``train_records`` is empty).
        streamed_val: The validation set comes as the Ray Data shard ``val``.
        probe: The linear probe's features (its own loop), else ``None``.
    """

    config: ExperimentConfig
    method: TuningMethod
    model_dir: str
    train_records: list[dict] | DataSummary = field(default_factory=list, repr=False)
    val_records: list[dict] = field(default_factory=list, repr=False)
    tracking_uri: str | None = None
    run_id: str | None = None
    n_train: int | None = None
    streamed_val: bool = False
    probe: ProbeInputs | None = field(default=None, repr=False)
