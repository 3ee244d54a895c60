"""The linear probe's training: features from the frozen model once (Ray Data actors), then the head's loop on
every Ray Train worker (plain DDP over the cached features; DeepSpeed has nothing to shard in a linear layer).

The loop shares the causal-LM loop's parts: the step plan, AdamW and its schedule, the all-reduce, the
MLflow step logger and the per-step report with its checkpoint.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ray_ft.config import ExperimentConfig
from ray_ft.logs import configure, info_rank_zero
from ray_ft.methods import TuningMethod
from ray_ft.methods.linear_probe import ProbeHead, check_layer, extract_features, load_head, save_head
from ray_ft.tracking import StepLogger
from ray_ft.train.batching import plan_steps
from ray_ft.train.checkpointing import STATE_FILE, TRAINABLE_DIR, report_step
from ray_ft.train.driver import FitResult, run_trainer
from ray_ft.train.inputs import ProbeInputs, WorkerInput
from ray_ft.train.optim import adamw_with_schedule
from ray_ft.train.runtime import all_reduce, init_ray, quiet_report_log

logger = logging.getLogger(__name__)
OPTIMIZER_FILE = "optimizer.pt"


def train_head_per_worker(inputs: WorkerInput) -> None:
    """The head's training loop on every Ray Train worker (DDP; each rank takes its share of every batch)."""
    import ray.train
    import ray.train.torch

    configure()
    quiet_report_log()
    cfg = inputs.config
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.train.seed)
    data = _tensors(inputs.probe)
    head = _setup_head(inputs.probe, data["x_train"])
    model = ray.train.torch.prepare_model(head)
    steps_per_epoch, total_steps = plan_steps(cfg, len(data["x_train"]), world)
    optimizer, scheduler = adamw_with_schedule(cfg, list(head.parameters()), total_steps)
    resumed = _resume(head, optimizer, scheduler)
    start_step = resumed or 0
    if resumed is not None:
        info_rank_zero(logger, "[ray-ft] resumed the probe head from step %d/%d", start_step, total_steps)
    step_logger = StepLogger(inputs.tracking_uri, inputs.run_id) if rank == 0 else None
    if step_logger is not None:
        step_logger.log({"trainable_params": sum(p.numel() for p in head.parameters())}, step=start_step)

    global_batch = cfg.train.batch_size * world
    eval_every = cfg.train.eval_every or steps_per_epoch
    loss_fn = torch.nn.CrossEntropyLoss()
    order: torch.Tensor | None = None
    for step in range(start_step, total_steps):
        epoch, i = divmod(step, steps_per_epoch)
        if i == 0 or order is None:
            order = _epoch_order(len(data["x_train"]), steps_per_epoch * global_batch, cfg.train.seed + epoch)
        batch = order[i * global_batch : (i + 1) * global_batch][rank::world]
        model.train()
        loss = loss_fn(model(data["x_train"][batch]), data["y_train"][batch])
        optimizer.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        (loss_sum,) = all_reduce([loss.item()])
        done = step + 1
        metrics: dict[str, Any] = {
            "step": done,
            "epoch": done / steps_per_epoch,
            "loss": loss_sum / world,
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm),
        }
        is_eval = done % eval_every == 0 or done == total_steps
        if is_eval:
            metrics.update(_accuracy(head, loss_fn, data))
        if step_logger is not None and (is_eval or done % cfg.train.log_every == 0):
            shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k not in ("step", "epoch"))
            logger.info("[ray-ft] step %d/%d epoch %.2f %s", done, total_steps, metrics["epoch"], shown)
            step_logger.log({k: v for k, v in metrics.items() if k != "step"}, step=done)
        write = functools.partial(_save_probe_checkpoint, head, optimizer, scheduler, done)
        report_step(cfg, metrics, done, is_eval, write, has_checkpoint=rank == 0)


def _tensors(probe: ProbeInputs) -> dict[str, torch.Tensor]:
    """The cached features and label ids as tensors (``x_val`` keeps the feature width when empty)."""
    x_train = torch.tensor(np.asarray(probe.train_features), dtype=torch.float32)
    return {
        "x_train": x_train,
        "y_train": torch.tensor(probe.train_label_ids, dtype=torch.long),
        "x_val": torch.tensor(np.asarray(probe.val_features), dtype=torch.float32).reshape(-1, x_train.shape[1]),
        "y_val": torch.tensor(probe.val_label_ids, dtype=torch.long),
    }


def _setup_head(probe: ProbeInputs, x_train: torch.Tensor) -> ProbeHead:
    """A fresh head that standardises features with the training set's mean and standard deviation."""
    head = ProbeHead(x_train.shape[1], len(probe.info["labels"]), probe.info)
    head.feature_mean.copy_(x_train.mean(0))
    head.feature_std.copy_(x_train.std(0, unbiased=False).clamp(min=1e-6))
    return head


def _epoch_order(n: int, needed: int, seed: int) -> torch.Tensor:
    """One epoch's shuffle of ``n`` examples, repeated by wrapping to ``needed`` (every rank gets a full share of
    every batch)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm.repeat(math.ceil(needed / len(perm)))


def _save_probe_checkpoint(head: ProbeHead, optimizer, scheduler, step: int, out: Path) -> None:
    save_head(head, out / TRAINABLE_DIR)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, out / OPTIMIZER_FILE)
    (out / STATE_FILE).write_text(json.dumps({"step": step}))


def _resume(head: ProbeHead, optimizer, scheduler) -> int | None:
    """Restore the head, optimizer and schedule from Ray Train's checkpoint; its step, or ``None`` without one."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return None
    with checkpoint.as_directory() as d:
        head.load_state_dict(load_head(Path(d) / TRAINABLE_DIR).state_dict())
        state = torch.load(Path(d) / OPTIMIZER_FILE, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        return int(json.loads((Path(d) / STATE_FILE).read_text())["step"])


@torch.no_grad()
def _accuracy(head: ProbeHead, loss_fn, data: dict[str, torch.Tensor]) -> dict[str, float]:
    """Training accuracy, and validation loss and accuracy when there is a validation set."""
    head.eval()
    metrics = {"train_accuracy": float((head(data["x_train"]).argmax(1) == data["y_train"]).float().mean())}
    if len(data["x_val"]):
        val_logits = head(data["x_val"])
        metrics["val_loss"] = float(loss_fn(val_logits, data["y_val"]))
        metrics["val_accuracy"] = float((val_logits.argmax(1) == data["y_val"]).float().mean())
    return metrics


def fit_probe(
    cfg: ExperimentConfig,
    method: TuningMethod,
    model_dir: str,
    train_records: list[dict],
    val_records: list[dict],
    tracking_uri: str | None = None,
    run_id: str | None = None,
) -> FitResult:
    """Features once (Ray Data actors), then the head (Ray Train)."""
    check_layer(cfg, model_dir)
    init_ray(cfg)
    labels = sorted({str(r["label"]) for r in [*train_records, *val_records]})
    label_id = {label: i for i, label in enumerate(labels)}
    texts = [r["text"] for r in [*train_records, *val_records]]
    workers = cfg.method.feature_workers or cfg.scaling.num_workers
    if cfg.deepspeed.enabled:
        logger.info("[ray-ft] linear_probe: the head trains with plain DDP; deepspeed.* settings are not used")
    logger.info(
        "[ray-ft] features: %d texts through the frozen model on %d Ray Data actor(s), %s pooling, layer %d",
        len(texts),
        workers,
        cfg.method.pooling,
        cfg.method.layer,
    )
    t0 = time.time()
    features, stats = extract_features(cfg, model_dir, texts)
    logger.info(
        "[ray-ft] features: %d×%d in %.1fs (%.0f tokens/s, actor peak RSS %.0f MB)",
        features.shape[0],
        features.shape[1],
        stats["feature_s"],
        stats["tokens_per_s"],
        stats["peak_rss_mb"],
    )
    StepLogger(tracking_uri, run_id).log(stats, step=0)
    n_train = len(train_records)
    probe = ProbeInputs(
        info={
            "labels": labels,
            "pooling": cfg.method.pooling,
            "layer": cfg.method.layer,
            "max_length": cfg.data.max_length,
            "hidden_size": int(features.shape[1]),
        },
        train_features=features[:n_train],
        train_label_ids=[label_id[str(r["label"])] for r in train_records],
        val_features=features[n_train:],
        val_label_ids=[label_id[str(r["label"])] for r in val_records],
    )
    inputs = WorkerInput(
        config=cfg, method=method, model_dir=model_dir, tracking_uri=tracking_uri, run_id=run_id, probe=probe
    )
    result = run_trainer(cfg, inputs, train_head_per_worker)
    result.metrics = {
        **result.metrics,
        **stats,
        "peak_mem_mb": max(stats["peak_rss_mb"], result.metrics.get("peak_mem_mb", 0.0)),
    }
    result.wall_s = time.time() - t0
    return result
