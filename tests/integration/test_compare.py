"""``ray-ft compare`` on the tiny model: one parent MLflow run holding each method's run as a child, the table
written and logged, cost and quality read back from the runs."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_overrides

from ray_ft.compare import run_comparison

pytestmark = pytest.mark.integration


def test_compare_runs_each_method_as_a_child_of_one_parent(
    ray_local, tiny_model_dir, qa_file, tmp_path, mlflow_dir, capsys
):
    from mlflow import MlflowClient

    out = tmp_path / "compare"
    overrides = [
        o
        for o in tiny_overrides(tiny_model_dir, qa_file, tmp_path / "unused", mlflow_dir, **{"train.max_steps": 2})
        if not o.startswith("output_dir=")
    ]
    overrides.append("tracking.registered_model=null")
    rows = run_comparison(["lora"], out, overrides)
    printed = capsys.readouterr().out
    assert "[ray-ft] ===== lora =====" in printed and f"[ray-ft] table: {out / 'compare.md'}" in printed

    (row,) = rows
    assert "error" not in row, row
    assert row["steps"] == 2 and row["trainable_params"] > 0 and row["tokens_per_s"] > 0
    assert row["tuned_val_rouge_l"] is not None
    assert json.loads((out / "compare.json").read_text())["rows"][0]["run_id"] == row["run_id"]
    assert "| lora |" in (out / "compare.md").read_text()

    client = MlflowClient(f"sqlite:///{mlflow_dir / 'mlflow.db'}")
    child = client.get_run(row["run_id"])
    parent = client.get_run(child.data.tags["mlflow.parentRunId"])
    assert parent.info.run_name == "compare-compare" and parent.info.status == "FINISHED"
    assert parent.data.tags["ray_ft.method"] == "compare"
    assert parent.data.params["methods"] == "lora" and "train.max_steps=2" in parent.data.params["overrides"]
    assert parent.data.metrics["lora.steps"] == 2
    assert {"compare.md", "compare.json"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
