"""A finished search in tables and a plot: each trial's outcome read from ``ResultGrid.get_dataframe()``
(its last report to Tune and sampled point), the ranking, ``trials.csv``/``trials.md``, ``search_plot.png`` and
the summary printed at the end."""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray_ft import tracking
from ray_ft.config import ExperimentConfig
from ray_ft.tracking import RunRef
from ray_ft.tune.space import HYPERPARAMETERS, resolve_hyperparameters
from ray_ft.tune.trial import TRIAL_TAG

logger = logging.getLogger(__name__)

FINISHED, EARLY_STOPPED, FAILED = "finished", "early-stopped", "failed"
REPORTED_METRICS = ("step", "epoch", "loss", "val_loss", "lr", "grad_norm")
"""Training metrics kept from each trial's last report (besides the search metric)."""
CONFIG_PREFIX = "config/"
"""How ``get_dataframe()`` names the sampled point's columns."""


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


def error_line(error: BaseException) -> str:
    """The last line of an error's message (the exception raised inside the worker, for Train failures)."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else repr(error))[:500]


def _last_reports(results) -> dict[str, dict[str, Any]]:
    """Each reporting trial's last result and sampled point, by trial id (cells a trial never filled dropped)."""
    rows: dict[str, dict[str, Any]] = {}
    for row in results.get_dataframe().to_dict("records"):
        kept = {k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))}
        rows[str(kept["trial_id"])] = kept
    return rows


def _errors(results) -> dict[str, tuple[BaseException, dict[str, Any]]]:
    """Errored trials' exceptions and sampled points, by trial id.

    A trial that failed before its first report has no row in the frame and no ``trial_id`` metric; its id is
    its directory's, which :func:`ray_ft.tune.driver` names ``trial_<id>``.
    """
    errors = {}
    for result in results:
        if result.error is not None:
            trial_id = result.metrics.get("trial_id") or Path(result.path).name.removeprefix("trial_")
            errors[str(trial_id)] = (result.error, result.config or {})
    return errors


def outcomes(results, base: ExperimentConfig, total_steps: int, parent: RunRef) -> list[TrialOutcome]:
    """Every trial of ``results`` (a ``ResultGrid``) classified as finished, stopped early by ASHA, or failed."""
    reports = _last_reports(results)
    errors = _errors(results)
    child_runs = tracking.child_runs(parent, TRIAL_TAG)
    keep = {*REPORTED_METRICS, base.tune.metric}
    found = []
    for trial_id in sorted({*reports, *errors}):
        report = reports.get(trial_id, {})
        error, sampled = errors.get(trial_id, (None, {}))
        if report:
            sampled = {k.removeprefix(CONFIG_PREFIX): v for k, v in report.items() if k.startswith(CONFIG_PREFIX)}
        steps = int(report.get("step", 0) or 0)
        status = FAILED if error is not None else EARLY_STOPPED if steps < total_steps else FINISHED
        run_id = child_runs.get(trial_id)
        logged = tracking.metric_history(RunRef(parent.uri, run_id), "loss") if run_id else {}
        found.append(
            TrialOutcome(
                trial_id=trial_id,
                status=status,
                hyperparameters=resolve_hyperparameters(sampled, base),
                steps=steps,
                steps_run=max([steps, *logged]),
                metrics={k: v for k, v in report.items() if k in keep and isinstance(v, int | float)},
                run_id=run_id,
                checkpoint_path=report.get("checkpoint_path"),
                error=error_line(error) if error is not None else None,
            )
        )
    return found


def ranked(trials: list[TrialOutcome], metric: str, mode: str) -> list[TrialOutcome]:
    """Trials that reported ``metric``, best first."""
    scored = [t for t in trials if t.status != FAILED and isinstance(t.metrics.get(metric), int | float)]
    scored = [t for t in scored if not math.isnan(t.metrics[metric])]
    return sorted(scored, key=lambda t: t.metrics[metric], reverse=mode == "max")


def best(trials: list[TrialOutcome], metric: str, mode: str) -> TrialOutcome | None:
    order = ranked(trials, metric, mode)
    return order[0] if order else None


def write_table(trials: list[TrialOutcome], metric: str, out: Path) -> tuple[Path, Path]:
    """``trials.csv`` (every column) and ``trials.md`` (without the error text), one row per trial."""
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
        for t in trials
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


def plot(trials: list[TrialOutcome], metric: str, searched: list[str], path: Path) -> bool:
    """``metric`` against each searched hyper-parameter, one marker per status; ``False`` when nothing to plot."""
    scored = [t for t in trials if isinstance(t.metrics.get(metric), int | float)]
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


def summary_text(s: SearchSummary, metric: str, resume_command: str = "ray-ft tune CONFIG ... --resume") -> str:
    """The end-of-search summary: trial counts, the best trial, where the outputs and MLflow runs are."""
    lines = [f"\n[ray-ft] search {'interrupted' if s.interrupted else 'done'} in {s.wall_s:.0f}s"]
    if s.interrupted:
        lines.append(f"  trials:        {len(s.trials)} started; {s.trial_steps} trial-steps run so far")
    else:
        lines.append(
            f"  trials:        {len(s.trials)} ({s.count(FINISHED)} finished, {s.count(EARLY_STOPPED)} stopped "
            f"early by ASHA, {s.count(FAILED)} failed); {s.trial_steps} trial-steps of {len(s.trials) * s.total_steps}"
        )
    if s.best is not None:
        hp = ", ".join(f"{k} {v:g}" for k, v in s.best.hyperparameters.items())
        lines.append(
            f"  best trial:    {s.best.trial_id}: {hp} → {metric} {s.best.metrics.get(metric, float('nan')):.4f}"
        )
    if s.best_config_path:
        lines.append(f"  best config:   {s.best_config_path}")
    if s.artifact_dir:
        lines.append(f"  artifact:      {s.artifact_dir}")
    if s.top_adapters:
        lines.append(f"  top adapters:  {' '.join(s.top_adapters)}  (ray-ft serve serves them together)")
    lines.append(f"  output dir:    {s.output_dir}")
    lines.append(f"  MLflow:        {s.tracking_uri}  search run {s.parent_run_id}")
    lines += [f"  note:          {note}" for note in s.notes]
    if s.interrupted:
        lines.append(f"  continue with: {resume_command}")
    return "\n".join(lines)


def print_summary(s: SearchSummary, metric: str, resume_command: str = "ray-ft tune CONFIG ... --resume") -> None:
    """Log :func:`summary_text` (the console shows it on stdout)."""
    logger.info("%s", summary_text(s, metric, resume_command))
