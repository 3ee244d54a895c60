"""``ray-ft tune CONFIG [key=value ...] [--resume] [--deploy]``: :func:`tune_command` does the work from typed
arguments; :func:`add_cli` and :func:`cmd_tune` connect it to ``ray_ft.cli``'s parser."""

from __future__ import annotations

import argparse
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


def cmd_tune(args: argparse.Namespace) -> int:
    return tune_command(args.config, args.overrides, args.resume, args.deploy, args.host, args.port)


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``ray-ft tune CONFIG [key=value ...] [--resume] [--deploy]``."""
    p = subparsers.add_parser(
        "tune", help="search LoRA r/alpha/learning rate with Ray Tune + ASHA; export the best trial"
    )
    p.add_argument("config", help="YAML config with a `tune` section (see jobs/tune_lora.yaml)")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides (e.g. tune.num_samples=8)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search in output_dir")
    p.add_argument(
        "--deploy", action="store_true", help="serve the best trials' adapters (or the best model) after the search"
    )
    p.add_argument("--host", default="127.0.0.1", help="with --deploy: address to listen on")
    p.add_argument("--port", type=int, default=8000, help="with --deploy: port to listen on")
    p.set_defaults(func=cmd_tune)
