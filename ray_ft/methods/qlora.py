"""QLoRA: LoRA adapters trained on top of a base model held in 4-bit NF4 (bitsandbytes, double quantisation).

Use it when the base model's weights do not fit in memory at full precision: the frozen weights take about a
quarter of their bf16 size, the adapters train in full precision. It computes slower than LoRA (every layer
de-quantises its weights on the fly), so on a model that fits, prefer LoRA. The export never merges into
quantised weights: the base is reloaded at full precision and the adapter merged into it (``merge_adapter``),
so the artifact is the same standalone ``OUTPUT_DIR/merged`` model LoRA produces.

Runs on CPU (bitsandbytes >= 0.48 has CPU 4-bit kernels; fp32 compute) and on CUDA (bf16 compute). DeepSpeed
ZeRO stages 0-2 work; ZeRO-3 is refused (see :meth:`ray_ft.config.QLoraMethodConfig.check`).
"""

from __future__ import annotations

import torch

from ray_ft.config import ExperimentConfig, QLoraMethodConfig
from ray_ft.methods import register_method
from ray_ft.methods.lora import LoraMethod, lora_config
from ray_ft.models import attention_kwargs, load_causal_lm, torch_dtype


def quantization_config(cfg: QLoraMethodConfig, use_gpu: bool):
    """NF4 4-bit weights with double quantisation, computing in ``compute_dtype``."""
    from transformers import BitsAndBytesConfig

    if cfg.compute_dtype == "auto":
        compute = torch.bfloat16 if use_gpu else torch.float32
    else:
        compute = getattr(torch, cfg.compute_dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=compute,
    )


def load_quantized(cfg: ExperimentConfig, model_dir: str, device: torch.device):
    """The base model with its linear layers in 4-bit NF4, placed on ``device``."""
    use_gpu = device.type == "cuda"
    return load_causal_lm(
        model_dir,
        torch_dtype(cfg.model, use_gpu),
        trust_remote_code=cfg.model.trust_remote_code,
        allow_pickle=cfg.model.allow_pickle,
        quantization_config=quantization_config(cfg.method, use_gpu),
        device_map={"": device.index or 0} if use_gpu else {"": "cpu"},
        **attention_kwargs(cfg.train.attention),
    )


class QLoraMethod(LoraMethod):
    """LoRA's adapters, save and export (the merge reloads the base at full precision); only loading differs."""

    name = "qlora"
    config_cls = QLoraMethodConfig

    def load_for_training(self, cfg: ExperimentConfig, model_dir: str, device: torch.device):
        from peft import get_peft_model, prepare_model_for_kbit_training

        model = load_quantized(cfg, model_dir, device)
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.train.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        return get_peft_model(model, lora_config(cfg.method, model))


register_method(QLoraMethod())
