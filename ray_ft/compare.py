"""``ray-ft compare``: train every tuning method on the shipped data and tabulate what each costs and gains.

Each method runs its own job config (``jobs/<method>.yaml``) through :func:`ray_ft.job.run_training` as a child
MLflow run under one parent run. The table (markdown + JSON, also logged to the parent run) holds, per method:
trainable parameters, peak memory (resident set of the rank-0 training worker; for the linear probe the larger
of the feature actors' and the head worker's), training and total wall time, throughput (steady-state
training tokens/s; for the probe, tokens/s through the frozen model while computing features), and quality base
vs tuned on the training and validation splits (ROUGE-L for generation, accuracy and macro-F1 for the probe).

Overrides apply to every method (``train.max_steps=5``), or to one with a prefix (``lora:method.r=8``).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

from ray_ft import logs, tracking
from ray_ft.config import load_config
from ray_ft.tracking import RunRef

logger = logging.getLogger(__name__)

METHODS = ("lora", "qlora", "prompt_tuning", "linear_probe")


def config_dir() -> Path:
    """``jobs/`` beside the package (a source checkout), else ``./jobs``."""
    beside = Path(__file__).resolve().parents[1] / "jobs"
    return beside if beside.is_dir() else Path("jobs")


def overrides_for(method: str, overrides: list[str]) -> list[str]:
    """The overrides that apply to ``method``: unprefixed ones, and ``method:key=value`` without the prefix."""
    chosen = []
    for item in overrides:
        prefix, sep, rest = item.partition(":")
        if sep and "=" not in prefix:
            if prefix not in METHODS:
                raise ValueError(f"override {item!r}: unknown method prefix {prefix!r}; choose one of {list(METHODS)}")
            if prefix == method:
                chosen.append(rest)
        else:
            chosen.append(item)
    return chosen


def _machine() -> str:
    try:
        with open("/proc/meminfo") as f:
            mem = int(next(line for line in f if line.startswith("MemTotal")).split()[1]) / 2**20
    except (OSError, StopIteration, ValueError):
        mem = float("nan")
    cpu = platform.processor() or platform.machine()
    return f"{platform.system()} {cpu}, {os.cpu_count()} CPU cores, {mem:.0f} GiB RAM"


def summarize(method: str, summary, cfg) -> dict[str, Any]:
    """One table row from a finished job: cost from its metrics and MLflow run, quality from its evaluation."""
    from ray_ft.methods import get_method

    run = RunRef(summary.tracking_uri, summary.run_id)
    logged = tracking.logged_metrics(run)
    metrics = summary.metrics
    task = get_method(method).task
    if task == "classification":
        tokens_per_s = metrics.get("tokens_per_s")
    else:
        tokens_per_s = metrics.get("steady_tokens_per_s")
        if tokens_per_s is None:
            history = list(tracking.metric_history(run, "tokens_per_s").values())
            tokens_per_s = sum(history) / len(history) if history else None
    row: dict[str, Any] = {
        "method": method,
        "task": task,
        "artifact": get_method(method).artifact,
        "data": Path(cfg.data.path).name,
        "steps": metrics.get("step"),
        "trainable_params": logged.get("trainable_params"),
        "peak_mem_mb": metrics.get("peak_mem_mb"),
        "train_s": summary.train_wall_s,
        "total_s": summary.wall_s,
        "tokens_per_s": tokens_per_s,
        "run_id": summary.run_id,
        "artifact_dir": summary.artifact_dir,
    }
    quality = summary.evaluation.get("metrics", {})
    names = ("accuracy", "macro_f1") if task == "classification" else ("rouge_l",)
    for model in ("base", "tuned"):
        for split_name, short in (("train", "train"), ("validation", "val")):
            values = quality.get(model, {}).get(split_name, {})
            for name in names:
                row[f"{model}_{short}_{name}"] = values.get(name)
    return row


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}" if abs(value) < 100 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    """The comparison as a markdown table (quality cells: ROUGE-L, or accuracy / macro-F1)."""
    header = (
        "| method | data | served as | steps | trainable params | peak RSS (MB) | train s | total s | tokens/s "
        "| metric | base train | tuned train | base val | tuned val |"
    )
    columns = header.count("|") - 1
    lines = [header, "|" + "---|" * columns]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['method']} | failed: {r['error'][:80]} |" + " |" * (columns - 2))
            continue
        if r["task"] == "classification":
            metric = "accuracy / macro-F1"

            def cell(model: str, split: str, r=r) -> str:
                return f"{_fmt(r[f'{model}_{split}_accuracy'])} / {_fmt(r[f'{model}_{split}_macro_f1'])}"
        else:
            metric = "ROUGE-L"

            def cell(model: str, split: str, r=r) -> str:
                return _fmt(r[f"{model}_{split}_rouge_l"])

        trainable = r["trainable_params"]
        lines.append(
            f"| {r['method']} | {r['data']} | {r['artifact']} | {_fmt(r['steps'])} "
            f"| {_fmt(int(trainable) if trainable is not None else None)} | {_fmt(r['peak_mem_mb'])} "
            f"| {_fmt(r['train_s'], 0)} | {_fmt(r['total_s'], 0)} | {_fmt(r['tokens_per_s'], 0)} | {metric} "
            f"| {cell('base', 'train')} | {cell('tuned', 'train')} | {cell('base', 'val')} | {cell('tuned', 'val')} |"
        )
    return "\n".join(lines)


def run_comparison(
    methods: list[str], output_dir: str | Path, overrides: list[str], configs: Path | None = None
) -> list[dict[str, Any]]:
    """Train every method in turn (child MLflow runs of one parent); write and log ``compare.md``/``.json``."""
    from ray_ft.job import run_training
    from ray_ft.outputs import check_output_dir, prepare_output_dir, write_file

    logs.configure()
    configs = configs or config_dir()
    out = check_output_dir(output_dir)
    cfgs = {}
    for method in methods:  # every config is validated before anything trains
        path = configs / f"{method}.yaml"
        cfgs[method] = load_config(path, [f"output_dir={out / method}", *overrides_for(method, overrides)])
    prepare_output_dir(out)  # marked as ray-ft's before the method runs fill it
    first = cfgs[methods[0]]
    stamp = time.strftime("%Y-%m-%d %H:%M %Z")
    machine = _machine()
    params = {"methods": ",".join(methods), "overrides": " ".join(overrides), "machine": machine}
    parent = tracking.open_run(first.tracking, f"compare-{out.name}", {"ray_ft.method": "compare"}, params)
    uri = parent.uri
    logger.info("[ray-ft] compare %s → %s (MLflow %s parent run %s)", ", ".join(methods), out, uri, parent.run_id)
    rows: list[dict[str, Any]] = []
    status = "FINISHED"
    try:
        for method in methods:
            logger.info("\n[ray-ft] ===== %s =====", method)
            try:
                summary = run_training(cfgs[method], parent_run_id=parent.run_id)
            except KeyboardInterrupt:
                status = "KILLED"
                raise
            except Exception as e:  # one failing method must not hide the others' figures
                logger.info("[ray-ft] %s failed: %s: %s", method, type(e).__name__, e)
                rows.append({"method": method, "error": f"{type(e).__name__}: {e}"})
                status = "FAILED"
                continue
            row = summarize(method, summary, cfgs[method])
            rows.append(row)
            numeric = {f"{method}.{k}": v for k, v in row.items() if isinstance(v, int | float) and v is not None}
            tracking.StepLogger(uri, parent.run_id).log(numeric, step=0)
    finally:
        if rows:
            table = format_table(rows)
            note = f"Measured {stamp} on {machine}; overrides: {' '.join(overrides) or '(none)'}."
            write_file(out / "compare.md", f"{table}\n\n{note}\n")
            write_file(
                out / "compare.json",
                json.dumps({"date": stamp, "machine": machine, "overrides": overrides, "rows": rows}, indent=1),
            )
            tracking.log_artifact(uri, parent.run_id, out / "compare.md")
            tracking.log_artifact(uri, parent.run_id, out / "compare.json")
            logger.info("\n%s\n\n%s\n[ray-ft] table: %s", table, note, out / "compare.md")
        tracking.end_run(uri, parent.run_id, status)
    return rows


def compare(methods: list[str], output_dir: str, overrides: list[str], config_dir: str | None = None) -> int:
    """``ray-ft compare``: exit code 1 when any method failed."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise ValueError(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    rows = run_comparison(methods, output_dir, overrides, Path(config_dir) if config_dir else None)
    return 1 if any(r.get("error") for r in rows) else 0
