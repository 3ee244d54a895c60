"""Prompt tuning, QLoRA and the linear probe through real Ray Train (and Ray Data), MLflow and the CLI.

Each test trains a few steps on the tiny model via ``ray_ft.job.run_training`` and the shipped job YAML, then
loads the exported artifact exactly as serving does and predicts with it.
"""

import json
from pathlib import Path

import pytest
from conftest import tiny_overrides, write_jsonl

from ray_ft.cli import main
from ray_ft.config import load_config
from ray_ft.export import read_metadata
from ray_ft.job import run_training

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def _mlflow(summary):
    from mlflow import MlflowClient

    client = MlflowClient(summary.tracking_uri)
    run = client.get_run(summary.run_id)
    artifacts = {a.path for a in client.list_artifacts(summary.run_id)}
    return client, run, artifacts


@pytest.mark.parametrize("stage", [2, 3])
def test_prompt_tuning_trains_exports_and_generates(ray_local, tiny_model_dir, qa_file, tmp_path, mlflow_dir, stage):
    from safetensors.torch import load_file

    from ray_ft.inference import Generator

    out = tmp_path / f"pt{stage}"
    ov = tiny_overrides(
        tiny_model_dir,
        qa_file,
        out,
        mlflow_dir,
        **{
            "train.max_steps": 3,
            "train.lr": 0.05,
            "method.num_virtual_tokens": 4,
            "method.init_text": "Answer the question",
            "deepspeed.zero_stage": stage,
            "eval.enabled": stage == 2,
            # ZeRO-3 partitions the prompt across two workers; stage 2 runs in Ray Train's local mode.
            "scaling.num_workers": 2 if stage == 3 else 0,
        },
    )
    s = run_training(load_config(REPO / "jobs/prompt_tuning.yaml", ov))
    assert s.metrics["step"] == 3
    export = out / "export"
    meta = read_metadata(export)
    assert (meta["method"], meta["artifact"], meta["base_model_dir"]) == (
        "prompt_tuning",
        "export",
        str(tiny_model_dir),
    )
    assert not (out / "merged").exists()

    trained = load_file(export / "adapter_model.safetensors")
    (prompt,) = trained.values()
    assert prompt.shape == (4, 64)
    gen = Generator.load(export)
    init = (
        gen.model.peft_model.get_base_model()
        .get_input_embeddings()
        .weight[(gen.tokenizer("Answer the question")["input_ids"] * 4)[:4]]
    )
    assert (prompt - init).abs().max() > 1e-3, "the prompt did not train"
    answers = gen.answer(["LoRA là gì?", "What is DeepSpeed ZeRO?"], max_new_tokens=6)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert main(["generate", str(export), "LoRA là gì?", "--max-new-tokens", "4"]) == 0

    _, run, artifacts = _mlflow(s)
    assert run.data.metrics["trainable_params"] == 4 * 64
    assert {"trainable", "export", "config.yaml"} <= artifacts
    if stage == 2:
        report = json.loads((out / "eval.json").read_text())
        assert set(report["metrics"]) == {"base", "tuned"}
        assert report["metrics"]["tuned"]["train"]["loss"] > 0


def test_qlora_trains_on_4bit_and_exports_a_merged_model(ray_local, tiny_model_dir, qa_file, tmp_path, mlflow_dir):
    from transformers import AutoModelForCausalLM

    from ray_ft.inference import Generator

    out = tmp_path / "qlora"
    extra = {"train.max_steps": 2, "method.r": 4, "scaling.num_workers": 0}  # Ray Train's local mode
    ov = tiny_overrides(tiny_model_dir, qa_file, out, mlflow_dir, **extra)
    s = run_training(load_config(REPO / "jobs/qlora.yaml", ov))
    assert s.metrics["step"] == 2
    merged = out / "merged"
    assert read_metadata(merged)["method"] == "qlora"
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert getattr(model.config, "quantization_config", None) is None, "the merged model must be full precision"
    assert len(Generator.load(merged).answer(["LoRA là gì?"], max_new_tokens=4)) == 1

    _, run, artifacts = _mlflow(s)
    # r=4 on 7 projections × 2 layers of the 64-wide tiny llama (q,o: 64→64, k,v: 64→32, gate,up: 64→128, down: 128→64)
    per_layer = 4 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 3)
    assert run.data.metrics["trainable_params"] == 2 * per_layer
    assert run.data.params["method.name"] == "qlora"
    assert {"merged", "trainable", "eval.json"} <= artifacts


def test_linear_probe_features_head_export_classify_and_eval(ray_local, tiny_model_dir, tmp_path, mlflow_dir, capsys):
    rows = [json.loads(line) for line in (REPO / "ray_ft/datasets/vi_email_intent.jsonl").read_text().splitlines()]
    data = write_jsonl(tmp_path / "intent.jsonl", rows[:40])
    labels = sorted({r["label"] for r in rows[:40]})
    out = tmp_path / "probe"
    ov = tiny_overrides(
        tiny_model_dir,
        data,
        out,
        mlflow_dir,
        **{
            "train.max_steps": 30,
            "train.batch_size": 8,
            "train.lr": 0.05,
            "train.eval_every": 15,
            "train.log_every": 5,
            "data.max_length": 128,
            "method.feature_workers": 2,
            "method.layer": 1,
            "eval.max_examples": 64,
        },
    )
    s = run_training(load_config(REPO / "jobs/linear_probe.yaml", ov))
    assert s.metrics["step"] == 30
    export = out / "export"
    meta = read_metadata(export)
    assert (meta["method"], meta["task"], meta["artifact"], meta["labels"]) == (
        "linear_probe",
        "classification",
        "export",
        labels,
    )
    assert {"head.safetensors", "probe.json", "tokenizer.json"} <= {p.name for p in export.iterdir()}

    report = json.loads((out / "eval.json").read_text())
    tuned, base = report["metrics"]["tuned"], report["metrics"]["base"]
    assert tuned["train"]["accuracy"] > base["train"]["accuracy"], "the head learned nothing"
    # Serving recomputes features from text; they must be the ones the head trained on.
    assert tuned["train"]["accuracy"] == pytest.approx(s.metrics["train_accuracy"], abs=1 / 30 + 1e-9)
    assert (out / "confusion_matrix.png").stat().st_size > 1000

    _, run, artifacts = _mlflow(s)
    assert run.data.metrics["trainable_params"] == 64 * len(labels) + len(labels)
    assert {"tokens_per_s", "feature_s", "val_accuracy", "loss", "eval.tuned.validation.macro_f1"} <= set(
        run.data.metrics
    )
    assert {"export", "trainable", "eval.json", "confusion_matrix.png", "loss_curve.png"} <= artifacts

    capsys.readouterr()
    texts = [rows[0]["text"], "Tôi muốn đổi size áo vừa mua."]
    assert main(["classify", str(export), *texts]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["text"] for line in lines] == texts
    assert all(line["label"] in labels and set(line["probabilities"]) == set(labels) for line in lines)

    assert main(["eval", str(export), str(data)]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["n"] == 40 and 0.0 <= evaluated["macro_f1"] <= 1.0
    assert evaluated["accuracy"] > base["train"]["accuracy"]

    assert main(["generate", str(export), "hello"]) == 2
    assert "classifier" in capsys.readouterr().err
