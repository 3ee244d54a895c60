"""Checkpoints of a run: where they live, how a step reports one to Ray Train (local mode writes it in place),
what a DeepSpeed checkpoint holds, and resuming from one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray_ft.checkpoints import seal_checkpoint, verify_checkpoint, weights_only_loading
from ray_ft.config import ExperimentConfig

TRAINABLE_DIR = "trainable"
STATE_FILE = "state.json"


def run_name(cfg: ExperimentConfig) -> str:
    return Path(cfg.output_dir).resolve().name or "run"


def storage_path(cfg: ExperimentConfig) -> str:
    return cfg.scaling.storage_path or str(Path(cfg.output_dir).resolve() / "ray")


def existing_checkpoints(cfg: ExperimentConfig) -> list[str]:
    root = Path(storage_path(cfg)) / run_name(cfg)
    return sorted(str(p) for p in root.glob("checkpoint_*")) if root.is_dir() else []


def local_checkpoint_dir(checkpoint) -> str | None:
    """A local directory for a Ray Train checkpoint (downloaded when ``storage_path`` is a cloud URI)."""
    if checkpoint is None:
        return None
    if os.path.isdir(checkpoint.path):
        return checkpoint.path
    return checkpoint.to_directory(tempfile.mkdtemp(prefix="ray-ft-checkpoint-"))


def report_checkpoint(
    cfg: ExperimentConfig,
    metrics: dict[str, Any],
    step: int,
    write: Callable[[Path], None],
    *,
    has_checkpoint: bool = True,
) -> None:
    """``ray.train.report(metrics)`` with a checkpoint directory that ``write`` fills (skipped when this rank has
    no ``has_checkpoint`` part to add).

    Ray Train persists a reported checkpoint into the run's storage. Local mode (``scaling.num_workers=0``) does
    not, so there the checkpoint is written straight into the same place (to a hidden sibling, then renamed) and
    the oldest beyond ``train.keep_checkpoints`` are removed.
    """
    import ray.train

    if cfg.scaling.num_workers > 0:
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if has_checkpoint:
                write(Path(tmp))
                seal_checkpoint(tmp, ray.train.get_context().get_world_rank())
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)
        return
    root = Path(storage_path(cfg)) / run_name(cfg)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint_local_{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    write(tmp)
    seal_checkpoint(tmp, 0)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(final)))
    for old in sorted(root.glob("checkpoint_local_*"))[: -cfg.train.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)


def report_step(
    cfg: ExperimentConfig,
    metrics: dict[str, Any],
    step: int,
    is_eval: bool,
    write: Callable[[Path], None],
    *,
    has_checkpoint: bool = True,
) -> None:
    """Report a finished step: with a checkpoint at evaluation steps, the metrics alone every ``train.log_every``."""
    import ray.train

    if is_eval:
        report_checkpoint(cfg, metrics, step, write, has_checkpoint=has_checkpoint)
    elif step % cfg.train.log_every == 0:
        ray.train.report(metrics)


def save_deepspeed_checkpoint(engine, method, tokenizer, metrics: dict[str, Any], rank: int, step: int, out: Path):
    """The engine's state (``ds/``, trainable parameters only), and on rank 0 the method's trained parameters
    (``trainable/``) and the step's metrics (``state.json``)."""
    import deepspeed

    state = {"step": step, "samples_seen": metrics["samples_seen"], "tokens_seen": metrics["tokens_seen"]}
    engine.save_checkpoint(str(out), tag="ds", client_state=state, exclude_frozen_parameters=True)
    params = [p for p in engine.module.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_stage() == 3):
        if rank == 0:
            method.save_trainable(engine.module, out / TRAINABLE_DIR, tokenizer)
            (out / STATE_FILE).write_text(json.dumps({"step": step, **metrics}))


def load_deepspeed_checkpoint(engine, checkpoint) -> tuple[int, dict[str, float]]:
    """Restore the engine from a Ray Train checkpoint; returns its step and the examples and tokens seen so far."""
    with checkpoint.as_directory() as d, weights_only_loading(engine):
        verify_checkpoint(d)  # before DeepSpeed unpickles anything from it
        _, client_state = engine.load_checkpoint(d, tag="ds", load_module_strict=False)
    seen = {k: float(client_state.get(k, 0.0)) for k in ("samples_seen", "tokens_seen")}
    return int(client_state["step"]), seen
