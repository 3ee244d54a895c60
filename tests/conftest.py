"""Shared fixtures: a tiny random Llama with an in-process tokenizer (no downloads), data files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from ray_ft.logs import configure

configure()  # progress lines reach stdout (and capsys) as they do under the CLI

REPO = Path(__file__).resolve().parents[1]
QA_ROWS = [
    {"question": "LoRA là gì?", "answer": "LoRA thêm ma trận hạng thấp vào các lớp của mô hình."},
    {"question": "QLoRA lượng tử hóa mô hình gốc thế nào?", "answer": "QLoRA dùng NF4 bốn bit cho trọng số gốc."},
    {"question": "Ray Train dùng để làm gì?", "answer": "Ray Train chạy huấn luyện phân tán trên nhiều máy."},
    {"question": "What is prompt tuning?", "answer": "Prompt tuning learns a few virtual token embeddings."},
    {"question": "What does a linear probe train?", "answer": "A linear probe trains only a linear head on features."},
    {"question": "What is DeepSpeed ZeRO?", "answer": "ZeRO partitions optimizer states, gradients and weights."},
    {"question": "Tại sao cần tập kiểm định?", "answer": "Tập kiểm định phát hiện quá khớp khi huấn luyện."},
    {"question": "MLflow lưu những gì?", "answer": "MLflow lưu tham số, chỉ số và mô hình của mỗi lần chạy."},
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def build_tiny_model_dir(path: Path, model_type: str = "llama", hidden_size: int = 64, heads: int = 4) -> Path:
    """A 2-layer, ``hidden_size``-wide random causal LM + a byte-level BPE tokenizer trained in-process.

    vLLM's CPU attention needs heads of at least 32 dimensions: ``hidden_size=128, heads=2`` serves there.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    corpus = [r["question"] + " " + r["answer"] for r in QA_ROWS] * 4 + ["Human: Assistant: hello world"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(path)
    kwargs = {"vocab_size": len(fast), "eos_token_id": fast.eos_token_id, "pad_token_id": fast.eos_token_id}
    if model_type == "llama":
        cfg = AutoConfig.for_model(
            "llama",
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=2,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            max_position_embeddings=256,
            tie_word_embeddings=True,
            **kwargs,
        )
    else:
        cfg = AutoConfig.for_model(model_type, hidden_size=64, n_layer=2, n_head=4, **kwargs)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def qa_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "qa.jsonl", QA_ROWS)


@pytest.fixture
def mlflow_dir(tmp_path) -> Path:
    return tmp_path / "mlflow"


def tiny_overrides(model_dir: Path, data: Path, out: Path, mlflow: Path, **extra) -> list[str]:
    """Overrides that make jobs/lora.yaml run in seconds on the tiny model."""
    base = {
        "model.name_or_path": str(model_dir),
        "data.path": str(data),
        "data.val_fraction": 0.25,
        "output_dir": str(out),
        "tracking.mlflow_dir": str(mlflow),
        "train.batch_size": 2,
        "train.lr": 5e-3,
        "eval.max_examples": 4,
        "eval.max_new_tokens": 8,
        "scaling.num_workers": 2,
        "scaling.cpus_per_worker": 0.5,
        "train.min_steps": "null",  # keep the configured batch on these few examples
        **extra,
    }
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray runtime with more logical CPUs than cores (driver + workers fit on 2 cores).

    Yields the ``RayContext``; ``f"http://{ctx.dashboard_url}"`` is this Ray's state API (pass it
    explicitly: other Ray instances may run on the same machine).
    """
    import ray

    ctx = ray.init(num_cpus=4, log_to_driver=True, include_dashboard=True)
    yield ctx
    ray.shutdown()
