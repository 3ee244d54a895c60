"""Prompt tuning, linear probe and QLoRA on the tiny model, without Ray: refusals, builds, export round trips."""

import json

import pytest
import torch
from conftest import QA_ROWS, write_jsonl

from ray_ft.config import ConfigError, load_config
from ray_ft.export import read_metadata, write_artifact
from ray_ft.methods import get_method, method_names


def _cfg(model_dir, **extra):
    overrides = [f"model.name_or_path={model_dir}"] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, overrides)


def test_all_four_methods_are_registered():
    assert {"lora", "qlora", "prompt_tuning", "linear_probe"} <= set(method_names())
    for name, artifact, task in [
        ("qlora", "merged", "generation"),
        ("prompt_tuning", "export", "generation"),
        ("linear_probe", "export", "classification"),
    ]:
        method = get_method(name)
        assert (method.artifact, method.task) == (artifact, task)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"method.name": "qlora", "deepspeed.zero_stage": 3}, "deepspeed.zero_stage=3 is not supported"),
        ({"method.name": "qlora", "method.r": 0}, "method.r: must be >= 1"),
        ({"method.name": "prompt_tuning", "method.num_virtual_tokens": 0}, "method.num_virtual_tokens: must be >= 1"),
        (
            {"method.name": "prompt_tuning", "method.num_virtual_tokens": 64, "data.max_length": 64},
            "must be smaller than data.max_length",
        ),
        ({"method.name": "prompt_tuning", "method.init_text": "' '"}, "method.init_text must be non-empty"),
        ({"method.name": "prompt_tuning", "method.r": 4}, "method.r: unknown key"),
        ({"method.name": "linear_probe", "data.format": "qa"}, "needs classification data"),
        ({"method.name": "linear_probe", "method.pooling": "max"}, "method.pooling"),
        ({"method.name": "linear_probe", "method.feature_batch_size": 0}, "method.feature_batch_size: must be >= 1"),
        ({"method.name": "linear_probe", "train.grad_accum": 2}, "train.grad_accum must be 1"),
        ({"method.name": "linear_probe", "data.streaming": "true"}, "data.streaming must be false"),
        ({"method.name": "linear_probe", "train.compile": "true"}, "train.compile must be false"),
        ({"method.name": "prompt_tuning", "train.packing": "true"}, "train.packing does not work"),
    ],
)
def test_unsupported_combinations_are_refused_up_front(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    assert message in str(e.value)


def test_qlora_zero2_and_random_prompt_init_are_accepted():
    assert load_config(None, ["method.name=qlora", "deepspeed.zero_stage=2"]).method.name == "qlora"
    assert load_config(None, ["method.name=prompt_tuning", "method.init=random", "method.init_text="]).method.init


# --------------------------------------------------------------------------- prompt tuning


def _prompt_model(tiny_model_dir, **extra):
    cfg = _cfg(tiny_model_dir, **{"method.name": "prompt_tuning", "method.num_virtual_tokens": 6, **extra})
    return cfg, get_method("prompt_tuning").load_for_training(cfg, str(tiny_model_dir), torch.device("cpu"))


def test_prompt_tuning_trains_only_the_prompt_embeddings_initialised_from_text(tiny_model_dir):
    from transformers import AutoTokenizer

    _, model = _prompt_model(tiny_model_dir, **{"method.init_text": "Answer the question"})
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert list(trainable) == ["prompt_encoder.default.embedding.weight"]
    assert trainable["prompt_encoder.default.embedding.weight"].shape == (6, 64)
    ids = AutoTokenizer.from_pretrained(tiny_model_dir)("Answer the question")["input_ids"]
    expected = model.get_base_model().get_input_embeddings().weight[(ids * 6)[:6]]
    torch.testing.assert_close(trainable["prompt_encoder.default.embedding.weight"], expected)


def _export_prompt(tiny_model_dir, tmp_path, cfg, model):
    method = get_method("prompt_tuning")
    torch.manual_seed(3)
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.normal_(0, 1.0)
    method.save_trainable(model, tmp_path / "trainable", None)
    meta = {
        "method": "prompt_tuning",
        "task": "generation",
        "artifact": "export",
        "base_model": str(tiny_model_dir),
        "base_model_dir": str(tiny_model_dir),
        "prompt_format": {"template": "Human: {question} Assistant: {answer}", "use_chat_template": False},
    }
    return write_artifact(
        tmp_path / "export", lambda d: method.export(cfg, str(tiny_model_dir), tmp_path / "trainable", d), meta
    )


def test_prompt_tuning_export_serves_left_padded_batches_exactly(tiny_model_dir, tmp_path):
    from ray_ft.inference import Generator

    cfg, model = _prompt_model(tiny_model_dir)
    out = _export_prompt(tiny_model_dir, tmp_path, cfg, model)
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    gen = Generator.load(out)
    tok = gen.tokenizer
    tok.padding_side = "left"
    prompts = gen.prompts(["LoRA là gì?", "What is DeepSpeed ZeRO and why does it matter?"])

    def scores(batch):
        enc = tok(batch, return_tensors="pt", padding=True)
        res = gen.model.generate(
            **enc,
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            output_scores=True,
            return_dict_in_generate=True,
        )
        assert torch.equal(res.sequences[:, : enc["input_ids"].shape[1]], enc["input_ids"])
        return torch.stack(res.scores, 1)

    batched = scores(prompts)
    enc0 = tok(prompts[:1], return_tensors="pt")
    assert tok(prompts, return_tensors="pt", padding=True)["attention_mask"][0, 0] == 0, "row 0 is not padded"
    for i, prompt in enumerate(prompts):
        torch.testing.assert_close(batched[i], scores([prompt])[0], atol=1e-5, rtol=1e-5)
    # The first generated step matches the trained model's teacher-forced logits (same positions as training).
    model.eval()
    with torch.no_grad():
        trained_last = model(**enc0).logits[:, -1]
        served = gen.model(**enc0).logits
    assert served.shape[1] == enc0["input_ids"].shape[1], "served logits must align with input_ids"
    torch.testing.assert_close(served[:, -1], trained_last, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores(prompts[:1])[0, 0], trained_last[0], atol=1e-5, rtol=1e-5)
    assert len(gen.answer(["LoRA là gì?", "Ray Train dùng để làm gì?"], max_new_tokens=5)) == 2


def test_prompt_tuning_export_finds_its_base_when_the_recorded_dir_is_gone(tiny_model_dir, tmp_path):
    from ray_ft.methods.prompt_tuning import base_model_dir

    meta = {"base_model": str(tiny_model_dir), "base_model_dir": str(tmp_path / "moved-away")}
    assert base_model_dir(meta) == str(tiny_model_dir.resolve())
    with pytest.raises(ValueError, match="names no base model"):
        base_model_dir({"base_model_dir": str(tmp_path / "moved-away")})


# --------------------------------------------------------------------------- linear probe


def test_pooling_matches_each_text_alone(tiny_model_dir):
    from ray_ft.methods.linear_probe import load_backbone, pooled_features
    from ray_ft.models import load_tokenizer

    model, tok = load_backbone(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    texts = ["LoRA là gì?", "Ray Train chạy huấn luyện phân tán trên nhiều máy."]
    for pooling in ("mean", "last"):
        batch, tokens = pooled_features(model, tok, texts, pooling, -1, 128)
        assert batch.shape == (2, 64)
        for i, text in enumerate(texts):
            ids = tok(text, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                hidden = model.base_model(input_ids=ids).last_hidden_state[0]
            alone = hidden.mean(0) if pooling == "mean" else hidden[-1]
            torch.testing.assert_close(batch[i], alone, atol=1e-5, rtol=1e-5)
    assert tokens == sum(len(tok(t)["input_ids"]) for t in texts)
    middle, _ = pooled_features(model, tok, texts, "mean", 1, 128)
    assert not torch.allclose(middle, batch), "layer 1 must differ from the final normalised layer"


def test_probe_head_standardises_and_round_trips(tmp_path):
    from ray_ft.methods.linear_probe import ProbeHead, load_head, save_head

    info = {"labels": ["a", "b", "c"], "pooling": "mean", "layer": -1, "max_length": 32, "hidden_size": 4}
    head = ProbeHead(4, 3, info)
    head.feature_mean.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    head.feature_std.copy_(torch.tensor([2.0, 2.0, 2.0, 2.0]))
    x = torch.randn(5, 4)
    torch.testing.assert_close(head(x), head.linear((x - head.feature_mean) / 2.0))
    assert sum(p.numel() for p in head.parameters() if p.requires_grad) == 4 * 3 + 3
    save_head(head, tmp_path / "h")
    loaded = load_head(tmp_path / "h")
    assert loaded.info == info
    torch.testing.assert_close(loaded(x), head(x))


def test_classification_metrics_match_scikit_learn():
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    from ray_ft.evaluate import classification_metrics

    refs = ["a", "a", "b", "c", "c", "c", "b", "a"]
    preds = ["a", "b", "b", "c", "a", "c", "c", "a"]
    m = classification_metrics(preds, refs, ["a", "b", "c", "d"])
    assert m["accuracy"] == pytest.approx(accuracy_score(refs, preds))
    assert m["macro_f1"] == pytest.approx(f1_score(refs, preds, average="macro"))
    assert [row[:3] for row in m["confusion_matrix"][:3]] == confusion_matrix(
        refs, preds, labels=["a", "b", "c"]
    ).tolist()
    unseen = classification_metrics(["a", "a"], ["a", "z"], ["a", "b"])
    assert unseen["labels"] == ["a", "b", "z"] and unseen["macro_f1"] == pytest.approx(
        f1_score(["a", "z"], ["a", "a"], average="macro")
    )


def _export_probe(tiny_model_dir, tmp_path, pooling: str):
    """A linear-probe ``export`` artifact with an untrained 2-label head."""
    from ray_ft.methods.linear_probe import ProbeHead, save_head

    info = {"labels": ["no", "yes"], "pooling": pooling, "layer": -1, "max_length": 64, "hidden_size": 64}
    save_head(ProbeHead(64, 2, info), tmp_path / "trainable")
    cfg = _cfg(tiny_model_dir, **{"method.name": "linear_probe"})
    meta = {
        "method": "linear_probe",
        "task": "classification",
        "artifact": "export",
        "base_model_dir": str(tiny_model_dir),
    }
    return write_artifact(
        tmp_path / "export",
        lambda d: get_method("linear_probe").export(cfg, str(tiny_model_dir), tmp_path / "trainable", d),
        meta,
    )


def test_probe_classifier_predicts_labels_with_probabilities(tiny_model_dir, tmp_path):
    out = _export_probe(tiny_model_dir, tmp_path, "last")
    clf = get_method("linear_probe").load_classifier(out, read_metadata(out))
    results = clf.predict(["LoRA là gì?", "  LoRA   là gì? ", "MLflow lưu những gì?"])
    assert [set(r) for r in results] == [{"label", "probabilities"}] * 3
    for r in results:
        assert r["label"] in {"no", "yes"} and sum(r["probabilities"].values()) == pytest.approx(1.0)
        assert r["probabilities"][r["label"]] == max(r["probabilities"].values())
    assert results[0] == results[1], "texts are cleaned as the training data was"


def test_cli_eval_refuses_generation_data_for_a_classifier(tiny_model_dir, tmp_path, capsys):
    from ray_ft.cli import main

    out = _export_probe(tiny_model_dir, tmp_path, "mean")
    qa = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS)
    assert main(["eval", str(out), str(qa)]) == 2
    assert "needs {text, label} data" in capsys.readouterr().err
    cls = write_jsonl(
        tmp_path / "cls.jsonl", [{"text": "LoRA là gì?", "label": "yes"}, {"text": "xin chào", "label": "no"}]
    )
    assert main(["eval", str(out), str(cls)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"accuracy", "macro_f1", "confusion_matrix"} <= set(report) and report["n"] == 2


def test_cli_classify_prints_a_json_line_per_text_and_refuses_a_generation_model(tiny_model_dir, tmp_path, capsys):
    from ray_ft.cli import main

    out = _export_probe(tiny_model_dir, tmp_path, "mean")
    assert main(["classify", str(out), "LoRA là gì?", "xin chào"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in lines] == ["LoRA là gì?", "xin chào"]
    assert all(r["label"] in {"no", "yes"} for r in lines)
    merged = write_artifact(tmp_path / "merged", lambda d: None, {"method": "lora", "artifact": "merged"})
    assert main(["classify", str(merged), "hi"]) == 2
    err = capsys.readouterr().err
    assert "not a classifier" in err and len(err.strip().splitlines()) == 1


def test_hooks_that_do_not_apply_refuse_in_one_line(tmp_path):
    for name in ("lora", "qlora", "prompt_tuning"):
        with pytest.raises(ValueError, match="not a classifier"):
            get_method(name).load_classifier(tmp_path, {})
    for name in ("lora", "qlora", "linear_probe"):
        with pytest.raises(ValueError, match="writes no generation export"):
            get_method(name).load_export(tmp_path, {})


# --------------------------------------------------------------------------- QLoRA


def test_qlora_loads_4bit_trains_adapters_and_merges_into_full_precision(tiny_model_dir, tmp_path):
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = _cfg(tiny_model_dir, **{"method.name": "qlora", "method.r": 4, "method.alpha": 8, "method.dropout": 0.0})
    method = get_method("qlora")
    model = method.load_for_training(cfg, str(tiny_model_dir), torch.device("cpu"))
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit)
    assert q_proj.base_layer.weight.quant_state.quant_type == "nf4"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    torch.manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_B" in n:  # B starts at zero; give the adapter a real effect
            p.data.normal_(0, 0.2)
    model.eval()
    x = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        quantized_adapter = model(input_ids=x).logits
        with model.disable_adapter():
            quantized_base = model(input_ids=x).logits
    method.save_trainable(model, tmp_path / "adapter", None)
    out = write_artifact(
        tmp_path / "merged",
        lambda d: method.export(cfg, str(tiny_model_dir), tmp_path / "adapter", d),
        {"method": "qlora", "artifact": "merged", "task": "generation"},
    )
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert all(p.dtype == torch.float32 for p in merged.parameters()), "merged into quantised weights"
    full_base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        got = merged(input_ids=x).logits
        plain = full_base(input_ids=x).logits
        reference = PeftModel.from_pretrained(full_base, tmp_path / "adapter")(input_ids=x).logits
    # Merging is exact up to float rounding: the adapter on the full-precision base.
    torch.testing.assert_close(got, reference, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-3), "adapter had no effect"
    # The 4-bit model that trained the adapter differs from the merged one only by the NF4 error of the frozen
    # weights, so its gap to the merged model is of the size of the 4-bit base's gap to the fp32 base.
    quantization_gap = (quantized_base - plain).abs().max().item()
    assert quantization_gap > 0, "the base was not quantised"
    assert (quantized_adapter - got).abs().max().item() <= 2 * quantization_gap
    # ... and far smaller than what the adapter changed.
    assert (quantized_adapter - got).norm() < 0.5 * (got - plain).norm()


# --------------------------------------------------------------------------- ray-ft compare


def test_compare_overrides_apply_to_all_or_one_method():
    from ray_ft.compare import overrides_for

    given = ["train.max_steps=3", "lora:method.r=8", "linear_probe:train.lr=0.1", "data.path=a:b.jsonl"]
    assert overrides_for("lora", given) == ["train.max_steps=3", "method.r=8", "data.path=a:b.jsonl"]
    assert overrides_for("qlora", given) == ["train.max_steps=3", "data.path=a:b.jsonl"]
    with pytest.raises(ValueError, match="unknown method prefix 'lorra'"):
        overrides_for("lora", ["lorra:method.r=8"])


def test_compare_every_shipped_method_config_loads_with_the_compare_overrides(tmp_path):
    from ray_ft.compare import METHODS, config_dir, overrides_for

    for method in METHODS:
        cfg = load_config(config_dir() / f"{method}.yaml", [f"output_dir={tmp_path / method}", "train.max_steps=2"])
        assert cfg.method.name == method and cfg.train.max_steps == 2
    assert overrides_for("qlora", ["qlora:deepspeed.zero_stage=3"]) == ["deepspeed.zero_stage=3"]


def test_compare_table_has_one_row_per_method_and_marks_failures():
    from ray_ft.compare import format_table

    gen = {
        "method": "lora",
        "task": "generation",
        "artifact": "merged",
        "data": "vi_ai_qa.jsonl",
        "steps": 5,
        "trainable_params": 4884480.0,
        "peak_mem_mb": 1500.5,
        "train_s": 61.2,
        "total_s": 90.0,
        "tokens_per_s": 812.3,
        "base_train_rouge_l": 0.1,
        "tuned_train_rouge_l": 0.3,
        "base_val_rouge_l": 0.1,
        "tuned_val_rouge_l": None,
    }
    probe = {
        **gen,
        "method": "linear_probe",
        "task": "classification",
        "artifact": "export",
        **{f"{m}_{s}_{k}": 0.5 for m in ("base", "tuned") for s in ("train", "val") for k in ("accuracy", "macro_f1")},
    }
    lines = format_table([gen, probe, {"method": "qlora", "error": "ValueError: boom"}]).splitlines()
    assert len(lines) == 5 and len({line.count("|") for line in lines}) == 1
    assert "4,884,480" in lines[2] and "ROUGE-L" in lines[2] and "| – |" in lines[2]
    assert "0.500 / 0.500" in lines[3] and "failed: ValueError: boom" in lines[4]


def test_probe_refuses_a_layer_the_model_does_not_have(tiny_model_dir):
    from ray_ft.methods.linear_probe import check_layer

    cfg = _cfg(tiny_model_dir, **{"method.name": "linear_probe", "method.layer": 15})
    with pytest.raises(ValueError, match=r"method.layer: 15 is not a layer of .* \(2 decoder layers"):
        check_layer(cfg, str(tiny_model_dir))
    check_layer(_cfg(tiny_model_dir, **{"method.name": "linear_probe", "method.layer": 2}), str(tiny_model_dir))


def test_every_method_defines_every_hook_and_its_config_is_in_the_union():
    from ray_ft.config import METHOD_CONFIGS
    from ray_ft.methods import TuningMethod

    hooks = [n for n in vars(TuningMethod) if not n.startswith("_")]
    assert {"load_for_training", "save_trainable", "export", "load_export", "load_classifier"} <= set(hooks)
    assert {"evaluate_run"} <= set(hooks)
    for name in method_names():
        method = get_method(name)
        assert all(callable(getattr(type(method), hook)) for hook in hooks), name
        assert {method.artifact, method.task, method.loop} <= {
            "merged",
            "export",
            "generation",
            "classification",
            "causal_lm",
            "probe_head",
        }
        assert method.config_cls in METHOD_CONFIGS and method.config_cls.model_fields["name"].default == name
