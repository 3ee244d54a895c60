"""A 4-trial Ray Tune search (ASHA) over Ray Train runs on the tiny model: early stopping, a crashed trial,
MLflow parent/child runs, and the best config trained again with ``ray-ft train``'s job."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

from ray_ft.config import load_config
from ray_ft.job import run_training
from ray_ft.tune import EARLY_STOPPED, FAILED, FINISHED, concurrent_trials, run_search

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
MAX_STEPS = 6


class WorkerKiller:
    """SIGKILLs the Ray Train worker of one trial once it has written its first checkpoint, as a crashed node would.

    Only processes of this test's own Ray runtime (descendants of this process) are considered; a trial's
    worker runs in a working directory named after its Train run, ``trial_<trial id>``.
    """

    def __init__(self, trials_dir: Path, trial_suffix: str):
        self.trials_dir, self.trial_suffix = trials_dir, trial_suffix
        self.killed: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        import psutil

        me = psutil.Process(os.getpid())
        while not self._stop.wait(0.2):
            runs = [d for d in self.trials_dir.glob(f"trial_*{self.trial_suffix}") if any(d.glob("checkpoint_*"))]
            if not runs:
                continue
            for proc in me.children(recursive=True):
                try:
                    if "RayTrainWorker" in " ".join(proc.cmdline()) and proc.cwd().endswith(runs[0].name):
                        os.kill(proc.pid, signal.SIGKILL)
                        self.killed = runs[0].name
                        return
                except psutil.Error:
                    continue


def test_search_early_stops_survives_a_crash_and_exports_best(
    ray_local, tiny_model_dir, qa_file, tmp_path, mlflow_dir, capsys
):
    from mlflow import MlflowClient
    from transformers import AutoModelForCausalLM

    out = tmp_path / "search"
    overrides = [
        f"{k}={v}"
        for k, v in {
            "model.name_or_path": tiny_model_dir,
            "data.path": qa_file,
            "data.val_fraction": 0.25,
            "output_dir": out,
            "tracking.mlflow_dir": mlflow_dir,
            "train.batch_size": 2,
            "train.max_steps": MAX_STEPS,
            "train.eval_every": 1,
            "scaling.num_workers": 1,
            "scaling.cpus_per_worker": 0.5,
            "scaling.max_failures": 0,
            "tune.num_samples": 4,
            "tune.grace_period": 1,
            "tune.reduction_factor": 2,
            "tune.lr": "[1.0e-5,1.0e-1]",
            "tune.seed": 7,
            "tune.max_concurrent_trials": 2,
            "tune.max_failures": 0,
        }.items()
    ]
    cfg = load_config(REPO / "jobs/tune_lora.yaml", overrides)
    # Trials start in id order, two at a time; the last one loses its worker after its first step.
    with WorkerKiller(out / "ray" / "search-trials", "_00003") as killer:
        summary = run_search(cfg)
    assert killer.killed, "the last trial's worker was never seen training"
    printed = capsys.readouterr().out
    print(printed)  # keep the search log in the report if an assertion below fails

    by_status = {s: [t for t in summary.trials if t.status == s] for s in (FINISHED, EARLY_STOPPED, FAILED)}
    assert len(summary.trials) == 4
    assert [f"trial_{t.trial_id}" for t in by_status[FAILED]] == [killer.killed], summary.trials
    assert f"trial {by_status[FAILED][0].trial_id} failed" in printed
    assert by_status[EARLY_STOPPED], "ASHA stopped no trial"
    assert all(t.steps < MAX_STEPS for t in by_status[EARLY_STOPPED])
    assert all(t.steps == MAX_STEPS for t in by_status[FINISHED])
    assert summary.best is not None and summary.best.status != FAILED
    assert len({(t.hyperparameters["r"], t.hyperparameters["lr"]) for t in summary.trials}) == 4

    # MLflow: a parent run with one child per trial, statuses and tags set, per-step curves logged.
    client = MlflowClient(summary.tracking_uri)
    parent = client.get_run(summary.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best_val_loss"] == pytest.approx(summary.best.metrics["val_loss"])
    assert {"trials.csv", "trials.md", "search_plot.png", "best_config.yaml"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)
    }
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert len(children) == 4
    child = {r.data.tags["ray_ft.trial_id"]: r for r in children}
    for t in summary.trials:
        run = child[t.trial_id]
        assert run.info.status == ("FAILED" if t.status == FAILED else "FINISHED")
        assert (run.data.tags.get("ray_ft.early_stopped") == "true") == (t.status == EARLY_STOPPED)
        assert run.data.params["hp.r"] == str(t.hyperparameters["r"])
        assert run.data.params["method.r"] == str(t.hyperparameters["r"])
        if t.status != FAILED:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")]
            assert 1 in steps and max(steps) >= t.steps
    assert child[summary.best.trial_id].data.tags.get("ray_ft.best_trial") == "true"
    assert sum(r.data.tags.get("ray_ft.best_trial") == "true" for r in children) == 1

    # Outputs: the merged best model and a best config that `ray-ft train` runs.
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    # The best trials' adapters, best first, shaped so that `ray-ft serve` serves them on one engine.
    from ray_ft.serving.catalog import resolve_plan

    ranked = sorted(
        (t for t in summary.trials if t.status != FAILED and t.checkpoint_path), key=lambda t: t.metrics["val_loss"]
    )
    assert [Path(d).name for d in summary.top_adapters] == [f"top{i}-{t.trial_id}" for i, t in enumerate(ranked[:3], 1)]
    plan = resolve_plan(summary.top_adapters)
    assert plan.engine == "vllm" and [a.name for a in plan.adapters] == [Path(d).name for d in summary.top_adapters]
    assert [a.lora_rank for a in plan.adapters] == [t.hyperparameters["r"] for t in ranked[:3]]
    best_cfg = load_config(out / "best_config.yaml")
    assert best_cfg.method.r == summary.best.hyperparameters["r"]
    assert best_cfg.train.lr == pytest.approx(summary.best.hyperparameters["lr"])
    assert best_cfg.tune.num_samples == 4
    retrain = run_training(
        load_config(
            out / "best_config.yaml",
            [
                f"output_dir={tmp_path / 'best'}",
                f"tracking.mlflow_dir={mlflow_dir}",
                "train.max_steps=1",
                "eval.enabled=false",
                "tracking.registered_model=null",
            ],
        )
    )
    assert retrain.metrics["step"] == 1
    assert (tmp_path / "best" / "merged" / "model.safetensors").is_file()


def test_concurrency_follows_cluster_resources():
    cfg = load_config(REPO / "jobs/tune_lora.yaml", ["tune.max_concurrent_trials=null", "tune.num_samples=16"])
    # 0.25 CPU for each trial's driver + 1 worker x 0.5 CPU.
    assert concurrent_trials(cfg, {"CPU": 4.0}) == 5
    gpu = cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={"num_workers": 2, "use_gpu": True})})
    assert concurrent_trials(gpu, {"CPU": 64.0, "GPU": 8.0}) == 4
    assert concurrent_trials(gpu, {"CPU": 64.0, "GPU": 1.0}) == 1  # never 0: the trial waits for resources


def test_bad_search_input_exits_2_naming_the_field(qa_file, tmp_path, capsys):
    from ray_ft.cli import main

    base = ["tune", str(REPO / "jobs/tune_lora.yaml"), f"data.path={qa_file}", f"output_dir={tmp_path / 'x'}"]
    assert main([*base, "tune.lr=[1.0e-2,1.0e-4]"]) == 2
    assert "tune.lr: must be [low, high] with 0 < low <= high" in capsys.readouterr().err
    assert main([*base, "tune.metric=val_los"]) == 2
    assert "tune.metric: 'val_los' is not reported by training" in capsys.readouterr().err
    assert main([*base, "data.val_fraction=0.0"]) == 2
    assert "tune.metric: 'val_loss' needs validation data" in capsys.readouterr().err
    assert not (tmp_path / "x").exists(), "nothing may be written for a refused search"


def test_resume_continues_the_same_search_and_mlflow_runs(ray_local, tiny_model_dir, qa_file, tmp_path, mlflow_dir):
    """``--resume`` restores the Tune experiment and its MLflow parent run (``search.json``); without it an
    existing search is refused and nothing of it is touched."""
    from ray_ft.job import JobError
    from ray_ft.tracking import RunRef

    out = tmp_path / "search"
    overrides = [
        f"{k}={v}"
        for k, v in {
            "model.name_or_path": tiny_model_dir,
            "data.path": qa_file,
            "data.val_fraction": 0.25,
            "output_dir": out,
            "tracking.mlflow_dir": mlflow_dir,
            "tracking.registered_model": "null",
            "train.batch_size": 2,
            "train.max_steps": 2,
            "train.eval_every": 1,
            "scaling.num_workers": 1,
            "scaling.cpus_per_worker": 0.5,
            "tune.num_samples": 2,
            "tune.scheduler": "fifo",
            "tune.seed": 3,
            "tune.max_concurrent_trials": 2,
        }.items()
    ]
    cfg = load_config(REPO / "jobs/tune_lora.yaml", overrides)
    first = run_search(cfg)
    assert not first.interrupted and first.best is not None
    parent = RunRef.load(out / "search.json")
    assert parent == RunRef(first.tracking_uri, first.parent_run_id)
    trials_csv = (out / "trials.csv").read_text()

    with pytest.raises(JobError, match="holds an earlier search; pass --resume"):
        run_search(cfg)
    assert (out / "trials.csv").read_text() == trials_csv and RunRef.load(out / "search.json") == parent

    again = run_search(cfg, resume=True)
    assert again.parent_run_id == first.parent_run_id
    assert [(t.trial_id, t.status, t.run_id, t.hyperparameters) for t in again.trials] == [
        (t.trial_id, t.status, t.run_id, t.hyperparameters) for t in first.trials
    ]
    assert {t.status for t in again.trials} == {FINISHED}
    assert again.best.trial_id == first.best.trial_id
