"""The optimizer side of a run: the DeepSpeed config dict, AdamW and the learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any

import torch

from ray_ft.config import ExperimentConfig


def deepspeed_config(cfg: ExperimentConfig, world_size: int, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed config dict for this run (ZeRO stage, batch sizes, clipping, precision)."""
    zero: dict[str, Any] = {"stage": cfg.deepspeed.zero_stage}
    if cfg.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if cfg.deepspeed.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    ds = {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": cfg.train.batch_size * cfg.train.grad_accum * world_size,
        "gradient_clipping": cfg.train.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    return {**ds, **cfg.deepspeed.extra}


def lr_lambda(cfg: ExperimentConfig, total_steps: int):
    """The multiplier of ``train.lr`` after each optimizer step (``LambdaLR``).

    A linear warm-up over ``train.warmup_ratio`` of the steps that starts at ``1 / (warmup + 1)`` (the first step
    already learns), then ``cosine`` down to a tenth of ``train.lr``, ``linear`` down to zero, or ``constant``.
    Kept by hand: ``transformers.get_scheduler``'s warm-ups start at zero and its ``cosine_with_min_lr`` counts
    progress one step ahead, so it would change every run's learning rates (``tests/unit/test_golden_loss.py``).
    """
    warmup = int(total_steps * cfg.train.warmup_ratio)

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.train.lr_scheduler == "cosine":
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        if cfg.train.lr_scheduler == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return fn


def adamw_with_schedule(
    cfg: ExperimentConfig, params: list[torch.nn.Parameter], total_steps: int, fused: bool = False
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over ``params`` (``train.lr``, ``train.weight_decay``) and its schedule (:func:`lr_lambda`)."""
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=fused or None)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
