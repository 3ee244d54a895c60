"""LoRA: low-rank adapters on the attention/MLP projections of a frozen base model.

Use it when the model must learn new content or style cheaply: a few million trainable
parameters, any ZeRO stage, and a merged standalone model at the end (``merge_and_unload``),
so serving pays no adapter overhead. Its config is :class:`ray_ft.config.LoraMethodConfig`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ray_ft.config import ExperimentConfig, LoraMethodConfig
from ray_ft.device import select_device
from ray_ft.methods import not_an_export, register_method
from ray_ft.methods.generation import GenerationMethod
from ray_ft.models import default_lora_targets, load_base_for_training, load_causal_lm, load_tokenizer


def _layers(cfg: LoraMethodConfig, model) -> list[int] | None:
    if cfg.top_layers is None:
        return cfg.layers_to_transform
    n = model.config.num_hidden_layers
    return list(range(max(0, n - cfg.top_layers), n))


def lora_config(cfg: LoraMethodConfig, model):
    """PEFT's ``LoraConfig`` for ``model`` (QLoRA's config is a ``LoraMethodConfig`` too)."""
    from peft import LoraConfig, TaskType

    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules or default_lora_targets(model),
        layers_to_transform=_layers(cfg, model),
        task_type=TaskType.CAUSAL_LM,
    )


def merge_adapter(cfg: ExperimentConfig, model_dir: str, adapter_dir: Path, out_dir: Path) -> None:
    """Load the base in full precision (or ``model.dtype`` when set), merge the adapter, save a standalone model
    to ``out_dir``. The merge runs where :func:`ray_ft.device.select_device` places it (the GPU when there is one)."""
    from peft import PeftModel

    placement = select_device(dtype=None if cfg.model.dtype == "auto" else cfg.model.dtype)
    base = load_causal_lm(
        model_dir, placement.dtype, trust_remote_code=cfg.model.trust_remote_code, allow_pickle=cfg.model.allow_pickle
    ).to(placement.device)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)
    load_tokenizer(model_dir, cfg.model.trust_remote_code).save_pretrained(out_dir)


class LoraMethod(GenerationMethod):
    """LoRA; :class:`ray_ft.methods.qlora.QLoraMethod` is this method on a 4-bit base."""

    name = "lora"
    config_cls = LoraMethodConfig
    artifact = "merged"

    def load_for_training(self, cfg: ExperimentConfig, model_dir: str, device: torch.device):
        from peft import get_peft_model

        model = load_base_for_training(cfg, model_dir, device)
        return get_peft_model(model, lora_config(cfg.method, model))

    def save_trainable(self, model, path: Path, tokenizer) -> None:
        model.save_pretrained(path, safe_serialization=True)

    def export(self, cfg: ExperimentConfig, model_dir: str, trained_dir: Path, out_dir: Path) -> None:
        merge_adapter(cfg, model_dir, trained_dir, out_dir)

    def load_export(self, export_dir: Path, meta: dict[str, Any]):
        raise not_an_export(self, export_dir)


register_method(LoraMethod())
