"""``ray-ft tune CONFIG [key=value ...] [--resume] [--deploy]``: :func:`tune_command` does the work from typed
arguments (parsed by ``ray_ft.cli``)."""

from __future__ import annotations

import logging
import shlex
import sys

from ray_ft import logs
from ray_ft.config import load_config
from ray_ft.tune.driver import run_search
from ray_ft.tune.export import deploy
from ray_ft.tune.report import print_summary

logger = logging.getLogger(__name__)


def tune_command(
    config: str,
    overrides: list[str],
    resume: bool = False,
    deploy_after: bool = False,
    host: str = "127.0.0.1",
    port: int = 8000,
) -> int:
    """Run the search of ``config``; with ``deploy_after``, serve its best adapters (or model) afterwards.

    Returns:
        The exit code: 0 done, 130 interrupted (the summary names the command that continues it), 2 when
        ``deploy_after`` finds nothing exported.
    """
    logs.configure()
    cfg = load_config(config, overrides)
    if deploy_after:
        from ray_ft.serving import check_port_free

        check_port_free(host, port)  # refuse now rather than after the search
    summary = run_search(cfg, resume=resume)
    again = ["ray-ft", "tune", config, *overrides, "--resume", *(["--deploy"] if deploy_after else [])]
    print_summary(summary, cfg.tune.metric, resume_command=" ".join(shlex.quote(a) for a in again))
    if summary.interrupted:
        return 130
    if not deploy_after:
        return 0
    # LoRA searches serve their best trials side by side as adapters of one engine; others the best model.
    models = summary.top_adapters or ([summary.artifact_dir] if summary.artifact_dir else [])
    if not models:
        print("error: --deploy: the search exported no model", file=sys.stderr)
        return 2
    return deploy(models, host, port)
