"""A 2-worker Ray Train + DeepSpeed run on a tiny model: checkpoints, resume, MLflow run, merged model."""

import json
from pathlib import Path

import pytest
from conftest import tiny_overrides

from ray_ft.config import load_config
from ray_ft.job import JobError, run_training

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def test_train_checkpoint_resume_and_mlflow(ray_local, tiny_model_dir, qa_file, tmp_path, mlflow_dir):
    from mlflow import MlflowClient
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    common = tiny_overrides(tiny_model_dir, qa_file, out, mlflow_dir, **{"train.eval_every": 2})
    first = run_training(load_config(REPO / "jobs/lora.yaml", [*common, "train.max_steps=2"]))
    ckpts = sorted((out / "ray" / "run").glob("checkpoint_*"))
    assert ckpts, "no Ray Train checkpoint written"

    # A second run into the same output_dir must not silently start over.
    with pytest.raises(JobError, match="--resume"):
        run_training(load_config(REPO / "jobs/lora.yaml", [*common, "train.max_steps=4"]))

    second = run_training(load_config(REPO / "jobs/lora.yaml", [*common, "train.max_steps=4"]), resume=True)
    assert second.run_id == first.run_id, "resume must continue the same MLflow run"
    assert second.metrics["step"] == 4

    client = MlflowClient(second.tracking_uri)
    run = client.get_run(second.run_id)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(second.run_id, "loss")]
    assert sorted(steps) == [1, 2, 3, 4], steps  # resumed at step 3, no step logged twice
    assert {"lr", "grad_norm", "tokens_per_s", "val_loss"} <= set(run.data.metrics)
    assert run.data.params["method.r"] == "16"
    artifacts = {a.path for a in client.list_artifacts(second.run_id)}
    assert {"config.yaml", "trainable", "merged", "eval.json", "loss_curve.png"} <= artifacts
    versions = client.search_model_versions("name='ray-ft-lora'")
    assert any(v.run_id == second.run_id for v in versions)

    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    report = json.loads((out / "eval.json").read_text())
    assert set(report["metrics"]) == {"base", "tuned"}
    assert 0.0 <= report["metrics"]["tuned"]["train"]["rouge_l"] <= 1.0


@pytest.mark.parametrize("stage", [3])
def test_zero3_trains_and_merges(ray_local, tiny_model_dir, qa_file, tmp_path, mlflow_dir, stage):
    out = tmp_path / f"zero{stage}"
    ov = tiny_overrides(
        tiny_model_dir,
        qa_file,
        out,
        mlflow_dir,
        **{"train.max_steps": 2, "deepspeed.zero_stage": stage, "eval.enabled": "false"},
    )
    s = run_training(load_config(REPO / "jobs/lora.yaml", ov))
    assert s.metrics["step"] == 2
    assert (out / "merged" / "model.safetensors").is_file()


def test_local_mode_keeps_its_checkpoints_and_exports(ray_local, tiny_model_dir, qa_file, tmp_path, mlflow_dir):
    """``scaling.num_workers=0`` runs the same loop in the driver; its checkpoints persist like Ray Train's."""
    out = tmp_path / "local"
    ov = tiny_overrides(
        tiny_model_dir,
        qa_file,
        out,
        mlflow_dir,
        **{"scaling.num_workers": 0, "train.max_steps": 4, "train.eval_every": 2, "train.keep_checkpoints": 1},
    )
    result = run_training(load_config(REPO / "jobs/lora.yaml", ov))
    assert result.metrics["step"] == 4
    ckpts = sorted((out / "ray" / "local").glob("checkpoint_*"))
    assert [c.name for c in ckpts] == ["checkpoint_local_000004"], ckpts
    assert (ckpts[0] / "trainable").is_dir()
    assert (out / "merged" / "MANIFEST.json").is_file()


def test_compiled_training_matches_eager(ray_local, tiny_model_dir, qa_file, tmp_path, mlflow_dir):
    """``train.compile`` runs the same optimisation (per-step losses and validation losses equal the eager run's)
    and compiles once: two epochs of 5 examples in batches of 2 (a short last batch, filled) with validation at
    each epoch's end build no graph after the first step. Two local-mode runs in one process also check that the
    second starts from a clean process group."""
    from mlflow import MlflowClient
    from torch._dynamo.utils import counters

    history, graphs = {}, {}
    for compiled in (False, True):
        before = counters["stats"]["unique_graphs"]
        ov = tiny_overrides(
            tiny_model_dir,
            qa_file,
            tmp_path / f"compile-{compiled}",
            mlflow_dir,
            **{
                "scaling.num_workers": 0,
                "data.val_fraction": 0.375,  # 5 training examples, 3 for validation
                "train.epochs": 2,
                "train.compile": str(compiled).lower(),
                "eval.enabled": "false",
            },
        )
        summary = run_training(load_config(REPO / "jobs/lora.yaml", ov))
        client = MlflowClient(summary.tracking_uri)
        history[compiled] = {
            key: [m.value for m in sorted(client.get_metric_history(summary.run_id, key), key=lambda m: m.step)]
            for key in ("loss", "val_loss", "compiled_graphs")
        }
        graphs[compiled] = counters["stats"]["unique_graphs"] - before  # local mode runs in this process
    assert graphs == {False: 0, True: graphs[True]} and graphs[True] > 0, graphs
    assert history[False]["compiled_graphs"] == []
    assert history[True]["compiled_graphs"] == [graphs[True]] * 6  # 3 steps per epoch, all graphs from step 1
    assert len(history[True]["loss"]) == 6 and len(history[True]["val_loss"]) == 2
    for key in ("loss", "val_loss"):
        assert history[True][key] == pytest.approx(history[False][key], rel=1e-4), (key, history)


def test_streaming_input_feeds_every_example_once_per_epoch(ray_local, tiny_model_dir, qa_file, tmp_path, mlflow_dir):
    """``data.streaming``: Ray Data tokenises and streams each worker's shard; every epoch trains on every example."""
    from mlflow import MlflowClient

    from ray_ft.data import PromptFormat, encode_generation, read_jsonl, split
    from ray_ft.models import load_tokenizer

    overrides = {"data.streaming": "true", "train.batch_size": 1, "train.epochs": 2, "eval.enabled": "false"}
    cfg = load_config(
        REPO / "jobs/lora.yaml", tiny_overrides(tiny_model_dir, qa_file, tmp_path / "s", mlflow_dir, **overrides)
    )
    train, _ = split(read_jsonl(qa_file).records, cfg.data.val_fraction, cfg.data.seed)
    tokenizer, fmt = load_tokenizer(str(tiny_model_dir)), PromptFormat.from_config(cfg.data)
    tokens = sum(len(encode_generation(r, tokenizer, fmt, cfg.data.max_length)["input_ids"]) for r in train)
    assert len(train) == 6  # 6 examples / (2 workers x batch 1) = 3 steps per epoch

    summary = run_training(cfg)
    client = MlflowClient(summary.tracking_uri)
    seen = {
        key: {m.step: m.value for m in client.get_metric_history(summary.run_id, key)}
        for key in ("samples_seen", "tokens_seen")
    }
    assert sorted(seen["samples_seen"]) == list(range(1, 7))
    assert (seen["samples_seen"][3], seen["tokens_seen"][3]) == (6, tokens)
    assert (seen["samples_seen"][6], seen["tokens_seen"][6]) == (12, 2 * tokens)
    assert (tmp_path / "s" / "merged" / "model.safetensors").is_file()


class _OpensAFile:
    """Unpickling this creates ``path``: stands for any code a planted pickle would run."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_resume_refuses_a_tampered_checkpoint_and_runs_nothing(
    ray_local, tiny_model_dir, qa_file, tmp_path, mlflow_dir, capsys
):
    """A checkpoint file swapped for a code-running pickle is refused by ``--resume`` (checksum), and still refused
    when its manifest is rewritten to match (the pickle references a global outside the allow-list); the same
    checkpoint restored resumes through DeepSpeed's loader with ``weights_only=True``."""
    import torch

    from ray_ft.checkpoints import seal_checkpoint
    from ray_ft.cli import main

    out, marker = tmp_path / "run", tmp_path / "code-ran"
    common = tiny_overrides(
        tiny_model_dir,
        qa_file,
        out,
        mlflow_dir,
        **{
            "scaling.num_workers": 1,
            "train.eval_every": 2,
            "eval.enabled": "false",
            "tracking.registered_model": "null",
        },
    )
    run_training(load_config(REPO / "jobs/lora.yaml", [*common, "train.max_steps=2"]))
    (ckpt,) = (p for p in (out / "ray" / "run").glob("checkpoint_*") if p.is_dir())
    optim = next((ckpt / "ds").glob("*optim_states.pt"))
    original = optim.read_bytes()
    torch.save({"optimizer_state_dict": _OpensAFile(marker)}, optim)

    resume = ["train", str(REPO / "jobs/lora.yaml"), *common, "train.max_steps=4", "--resume"]
    capsys.readouterr()  # the first run's log lines
    assert main(resume) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not match its checksum" in err[0] and str(ckpt) in err[0], err
    assert not marker.exists()

    seal_checkpoint(ckpt, 0)  # the manifest rewritten to match the planted file
    assert main(resume) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "references io.open" in err[0], err
    assert not marker.exists()

    optim.write_bytes(original)
    seal_checkpoint(ckpt, 0)
    resumed = run_training(load_config(REPO / "jobs/lora.yaml", [*common, "train.max_steps=4"]), resume=True)
    assert resumed.metrics["step"] == 4
    assert not marker.exists()
