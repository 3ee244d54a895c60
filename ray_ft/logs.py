"""Console output for ray-ft: every module logs through ``logging.getLogger(__name__)`` under the ``ray_ft`` tree.

``configure`` attaches the one handler (plain message lines on stdout, as a user reads progress); the CLI calls it
in the driver and the worker functions call it in each Ray worker, whose stdout Ray forwards to the driver.
``info_rank_zero`` keeps per-step lines to one copy when several Train workers run the same loop.
"""

from __future__ import annotations

import logging
import os
import sys

ROOT = "ray_ft"
_HANDLER_FLAG = "_ray_ft_console"


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at the time of each record (pytest's capture and Ray's redirection
    replace it after start-up)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure(level: int | str | None = None) -> logging.Logger:
    """Attach ray-ft's console handler once per process; ``RAY_FT_LOG_LEVEL`` overrides the default INFO."""
    logger = logging.getLogger(ROOT)
    level = level or os.environ.get("RAY_FT_LOG_LEVEL", "INFO")
    logger.setLevel(level)
    if not any(getattr(h, _HANDLER_FLAG, False) for h in logger.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        setattr(handler, _HANDLER_FLAG, True)
        logger.addHandler(handler)
        logger.propagate = False
    return logger


def world_rank() -> int:
    """This process's rank in the running Ray Train group, or in torch.distributed, else 0."""
    try:
        import ray.train

        return ray.train.get_context().get_world_rank()
    except Exception:  # not inside a Ray Train worker
        pass
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def info_rank_zero(logger: logging.Logger, msg: str, *args: object) -> None:
    """``logger.info`` on rank 0 only."""
    if world_rank() == 0:
        logger.info(msg, *args)
