"""Training a method: the loop its ``TuningMethod.loop`` names, driven on Ray Train."""

from __future__ import annotations

from ray_ft.config import ExperimentConfig
from ray_ft.data import DataSummary
from ray_ft.methods import TuningMethod
from ray_ft.train.driver import FitResult, fit_causal_lm
from ray_ft.train.probe import fit_probe

DRIVERS = {"causal_lm": fit_causal_lm, "probe_head": fit_probe}


def fit(
    cfg: ExperimentConfig,
    method: TuningMethod,
    model_dir: str,
    train_records: list[dict] | DataSummary,
    val_records: list[dict],
    tracking_uri: str | None = None,
    run_id: str | None = None,
) -> FitResult:
    """Train ``method`` on Ray Train; returns the final checkpoint (its ``trainable/`` holds the trained
    parameters) and the last reported metrics."""
    driver = DRIVERS[method.loop]
    return driver(cfg, method, model_dir, train_records, val_records, tracking_uri=tracking_uri, run_id=run_id)
