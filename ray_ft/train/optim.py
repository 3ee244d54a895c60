"""The optimizer side of a run: the DeepSpeed config dict, AdamW and the learning-rate schedule."""

from __future__ import annotations

from typing import Any

import torch
from transformers import get_scheduler

from ray_ft.config import ExperimentConfig

# ``train.lr_scheduler`` → the name ``transformers.get_scheduler`` knows it by.
_SCHEDULES = {"cosine": "cosine_with_min_lr", "linear": "linear", "constant": "constant_with_warmup"}


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


def adamw_with_schedule(
    cfg: ExperimentConfig, params: list[torch.nn.Parameter], total_steps: int, fused: bool = False
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over ``params`` (``train.lr``, ``train.weight_decay``) and its learning-rate schedule.

    The schedule is ``transformers.get_scheduler``'s, as the Hugging Face ``Trainer`` builds it: a linear warm-up
    over ``train.warmup_ratio`` of the steps (from zero), then ``cosine`` down to a tenth of ``train.lr``,
    ``linear`` down to zero, or ``constant``.
    """
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=fused or None)
    scheduler = get_scheduler(
        _SCHEDULES[cfg.train.lr_scheduler],
        optimizer,
        num_warmup_steps=int(total_steps * cfg.train.warmup_ratio),
        num_training_steps=total_steps,
        scheduler_specific_kwargs={"min_lr_rate": 0.1} if cfg.train.lr_scheduler == "cosine" else None,
    )
    return optimizer, scheduler
