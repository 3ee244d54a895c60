"""``ray_ft.tracking`` against a real MLflow store (SQLite in a temp dir): run references, resume, child runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ray_ft import tracking
from ray_ft.config import load_config
from ray_ft.tracking import RunRef

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return load_config(REPO / "jobs/lora.yaml", [f"tracking.mlflow_dir={tmp_path / 'mlflow'}", "output_dir=x"])


def test_run_ref_file_keeps_the_format_earlier_runs_wrote(tmp_path):
    ref = RunRef("sqlite:///somewhere/mlflow.db", "abc123")
    ref.save(tmp_path / "run.json")
    assert json.loads((tmp_path / "run.json").read_text()) == {"tracking_uri": ref.uri, "run_id": "abc123"}
    assert RunRef.load(tmp_path / "run.json") == ref


def test_start_or_resume_continues_the_saved_run(cfg, tmp_path):
    state = tmp_path / "search.json"
    first, resumed = tracking.start_or_resume(cfg, state, resume=False, run_name="s", tags={"ray_ft.search": "true"})
    assert not resumed and RunRef.load(state) == first
    run = tracking.client(first.uri).get_run(first.run_id)
    assert run.data.tags["ray_ft.search"] == "true" and run.data.params["method.name"] == "lora"
    tracking.end_run(first.uri, first.run_id, "KILLED")

    again, resumed = tracking.start_or_resume(cfg, state, resume=True, run_name="s")
    assert resumed and again == first
    assert tracking.run_status(again) == "RUNNING"
    fresh, resumed = tracking.start_or_resume(cfg, state, resume=False, run_name="s")
    assert not resumed and fresh != first and RunRef.load(state) == fresh


def test_child_runs_params_and_metric_history(cfg):
    parent = tracking.open_run(cfg.tracking, "parent", {"ray_ft.method": "compare"}, {"long": "x" * 7000})
    assert len(tracking.client(parent.uri).get_run(parent.run_id).data.params["long"]) == tracking.PARAM_LIMIT
    children = {}
    for trial in ("a", "b"):
        child = RunRef(*tracking.start_run(cfg, run_name=f"trial_{trial}", parent_run_id=parent.run_id))
        tracking.set_tags(child, {"ray_ft.trial_id": trial})
        children[trial] = child.run_id
    tracking.start_run(cfg, run_name="untagged", parent_run_id=parent.run_id)
    tracking.start_run(cfg, run_name="elsewhere")
    assert tracking.child_runs(parent, "ray_ft.trial_id") == children

    run = RunRef(parent.uri, children["a"])
    tracking.log_params(run, {"hp.r": 8})
    for step, loss in ((1, 2.0), (2, 1.5)):
        tracking.StepLogger(run.uri, run.run_id).log({"loss": loss}, step=step)
    assert tracking.metric_history(run, "loss") == {1: 2.0, 2: 1.5}
    assert tracking.logged_metrics(run) == {"loss": 1.5}
    assert tracking.client(run.uri).get_run(run.run_id).data.params["hp.r"] == "8"
