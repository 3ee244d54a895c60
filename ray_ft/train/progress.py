"""Progress of the training loop: throughput (since the last report and in steady state), peak memory,
``train.compile`` recompiles, the ETA, and the per-step line rank 0 logs."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from ray_ft.logs import info_rank_zero
from ray_ft.train.runtime import peak_memory_mb

logger = logging.getLogger(__name__)

PROGRESS_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s", "val_loss")
"""Metrics shown in the per-step line (all of them go to MLflow)."""


def compiled_graphs() -> int:
    """Graphs ``torch.compile`` has built in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


class Progress:
    """Per-step throughput and timing for a loop over steps ``start_step .. total_steps - 1``.

    ``tokens_per_s`` covers the steps since it was last reported; the ``steady_*`` rates count from the end of
    the first (warm-up, maybe compiling) step, reports included.
    """

    def __init__(self, start_step: int, total_steps: int, device: torch.device, compiled: bool):
        self.start_step, self.total_steps, self.device, self.compiled = start_step, total_steps, device, compiled
        self.graphs_before = compiled_graphs()
        self.graphs_seen = 0
        self.t_start = self.t_last = time.time()
        self.tokens_since = 0.0
        self.steady = {"tokens": 0.0, "samples": 0.0, "since": 0.0}

    def count(self, step: int, tokens: float, samples: float) -> None:
        """Add a finished step's tokens and examples (summed over ranks)."""
        self.tokens_since += tokens
        if step == self.start_step:
            self.steady["since"] = time.time()
        else:
            self.steady["tokens"] += tokens
            self.steady["samples"] += samples

    def measure(self, step: int, metrics: dict[str, Any], report_rate: bool) -> None:
        """Add throughput, peak memory and graph counts to ``metrics`` (``tokens_per_s`` when ``report_rate``)."""
        if report_rate:
            metrics["tokens_per_s"] = self.tokens_since / max(time.time() - self.t_last, 1e-9)
            self.tokens_since, self.t_last = 0.0, time.time()
        metrics["peak_mem_mb"] = peak_memory_mb(self.device)
        if self.compiled:  # graphs dynamo built in this run; growth after the first step means recompiles
            metrics["compiled_graphs"] = compiled_graphs() - self.graphs_before
            if step > self.start_step and metrics["compiled_graphs"] > self.graphs_seen:
                info_rank_zero(
                    logger,
                    "[ray-ft] train.compile: step %d compiled again; TORCH_LOGS=recompiles names the cause",
                    step + 1,
                )
            self.graphs_seen = metrics["compiled_graphs"]
        if step > self.start_step:
            elapsed = max(time.time() - self.steady["since"], 1e-9)
            metrics["steady_tokens_per_s"] = self.steady["tokens"] / elapsed
            metrics["steady_samples_per_s"] = self.steady["samples"] / elapsed

    def line(self, metrics: dict[str, Any]) -> str:
        """``[ray-ft] step N/T epoch E loss ... eta Ss`` for the step that produced ``metrics``."""
        done = metrics["step"]
        eta = (time.time() - self.t_start) / (done - self.start_step) * (self.total_steps - done)
        shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k in PROGRESS_KEYS)
        return f"[ray-ft] step {done}/{self.total_steps} epoch {metrics['epoch']:.2f} {shown} eta {eta:.0f}s"
