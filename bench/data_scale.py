"""How data checking scales: rows/s and peak memory of ``ray-ft data check`` on synthetic Q/A sets.

For each size (default 10k, 100k and 1M rows, about 316 bytes a row as JSON Lines) it writes the set once under
``--workdir`` and runs, each in a fresh process so peak RSS is that step's own:

- ``check``: what ``ray-ft data check FILE`` runs, ``ray_ft.data.check_data`` (one bounded-memory pass keeping
  only the split hashes; a process per CPU over 8 MiB pieces of the file), without the CLI's own imports;
- ``in-memory``: ``ray_ft.data.read_data`` (every record held, the small-data training path), with ``--in-memory``;
- ``parquet``: ``check_data`` on the same rows as Parquet (one file, read in one process), with ``--parquet``;
- ``tokenise``: ``encode_generation`` on the first 20k rows with ``--tokenizer DIR`` (examples/s, one process);
- ``first step``: ``ray-ft train jobs/lora.yaml data.path=SET train.max_steps=2`` (the embedded model, a local
  Ray, the reading path ray-ft picks for the size) from its start to the line of its first optimizer step, with
  the driver's peak RSS up to then (``VmHWM``) and the Ray Train worker's (its ``peak_mem_mb`` at step 1).
  ``--no-train`` leaves it out.

The last line is ``check_rss_mb_1m=<a> first_step_s_1m_over_10k=<b>``: the check's peak RSS on the 1M set, and
its time to the first step over the 10k set's (``nan`` where a size was not run).

Run: ``python bench/data_scale.py [--sizes 10000,100000,1000000] [--in-memory] [--parquet] [--tokenizer DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

WORDS = [
    "mô",
    "hình",
    "học",
    "máy",
    "dữ",
    "liệu",
    "huấn",
    "luyện",
    "tham",
    "số",
    "lớp",
    "trọng",
    "gradient",
    "tối",
    "ưu",
    "hóa",
    "mạng",
    "nơ",
    "ron",
    "ngôn",
    "ngữ",
    "model",
    "training",
    "data",
    "layer",
    "weight",
    "optimizer",
    "attention",
    "token",
    "batch",
    "epoch",
    "loss",
    "adapter",
    "rank",
]

MEASURE = """
import json, resource, sys, time
{setup}
t0 = time.perf_counter()
{body}
rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({{"s": time.perf_counter() - t0, "rss_mb": rss_mb}}))
"""


def write_qa(path: Path, rows: int, seed: int = 0) -> None:
    """``rows`` synthetic, distinct Q/A lines (question ~60 bytes, answer ~250)."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for i in range(rows):
            q = " ".join(rng.choices(WORDS, k=8))
            a = " ".join(rng.choices(WORDS, k=34))
            f.write(json.dumps({"question": f"{i}: {q}?", "answer": a + "."}, ensure_ascii=False) + "\n")


def measure(body: str, setup: str = "from ray_ft.data import check_data, read_data") -> dict[str, float]:
    """Run ``setup`` then ``body`` in a fresh Python; ``body``'s wall seconds and the process's peak RSS."""
    code = MEASURE.format(setup=setup, body=body)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _child(code: str) -> str:
    """Run ``code`` in a fresh Python and return its stdout.

    Heavy imports stay out of this process: a process's peak RSS survives fork and exec, so every measured child
    would otherwise start from this one's."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def _peak_rss_mb(pid: int) -> float:
    """``VmHWM`` of a live process (its own peak RSS), in MB; 0 once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    line = next((ln for ln in status.splitlines() if ln.startswith("VmHWM:")), "VmHWM: 0 kB")
    return int(line.split()[1]) / 1024


def first_step(path: Path, work: Path) -> dict[str, float | str]:
    """Train two steps on ``path``; seconds to the first step's line, driver and worker peak RSS, reading path."""
    out = work / f"run-{path.stem}"
    cmd = [
        sys.executable,
        "-m",
        "ray_ft.cli",
        "train",
        str(REPO / "jobs/lora.yaml"),
        f"data.path={path}",
        f"output_dir={out}",
        f"tracking.mlflow_dir={work / 'mlflow'}",
        "train.max_steps=2",
        "data.val_fraction=0",  # the last step would otherwise validate on the whole held-out share (50k rows at 1M)
        "eval.enabled=false",
        "tracking.registered_model=null",
    ]
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    seconds, driver_mb, reading, tail = float("nan"), 0.0, "?", []
    for line in proc.stdout:
        tail = [*tail[-30:], line]
        driver_mb = max(driver_mb, _peak_rss_mb(proc.pid))
        if "[ray-ft] data " in line and (" streamed " in line or " in memory" in line):
            reading = "streamed" if " streamed " in line else "in memory"
        if "step 1/" in line and seconds != seconds:
            seconds = time.perf_counter() - t0
            print(f"# {path.name}: first step after {seconds:.1f}s ({reading})", flush=True)
    if proc.wait() != 0:
        raise SystemExit(f"training on {path} failed:\n" + "".join(tail))
    peak = _child(
        "from ray_ft.tracking import RunRef, metric_history\n"
        f"print(metric_history(RunRef.load({str(out / 'run.json')!r}), 'peak_mem_mb').get(1, float('nan')))"
    )
    worker_mb = float(peak.strip().splitlines()[-1])
    return {"s": seconds, "driver_mb": driver_mb, "worker_mb": worker_mb, "reading": reading}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--workdir", default=None, help="where the data sets are written (default: a temp dir)")
    p.add_argument("--in-memory", action="store_true", help="also time read_data, which holds every record")
    p.add_argument("--parquet", action="store_true", help="also check the same rows as Parquet")
    p.add_argument("--tokenizer", default=None, help="a model directory whose tokenizer to time")
    p.add_argument("--no-train", action="store_true", help="leave out the time to the first training step")
    args = p.parse_args()
    check_rss: dict[int, float] = {}
    starts: dict[int, float] = {}
    if not args.no_train:
        # The embedded model's one-time conversion is not part of any size's start-up. It runs in a child: a
        # process's peak RSS survives fork and exec, so this one stays small for the measured children.
        _child("from ray_ft.config import ModelConfig\nfrom ray_ft.models import resolve_model_dir\n"
               "resolve_model_dir(ModelConfig())")  # fmt: skip
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ray-ft-data-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"# machine: {os.cpu_count()} CPUs; data under {work}")
    print(
        f"{'rows':>9} {'MB':>7} {'step':>10} {'seconds':>8} {'rows/s':>9} {'peak RSS MB':>12}  (RSS: the main process)"
    )
    for rows in [int(s) for s in args.sizes.split(",")]:
        path = work / f"qa-{rows}.jsonl"
        if not path.is_file():
            write_qa(path, rows)
        mb = path.stat().st_size / 1e6
        steps = {"check": f"check_data({str(path)!r})"}
        if args.in_memory:
            steps["in-memory"] = f"read_data({str(path)!r})"
        if args.parquet:
            pq_path = path.with_suffix(".parquet")
            if not pq_path.is_file():
                _child(
                    "import pyarrow.json as pj, pyarrow.parquet as pq\n"
                    f"pq.write_table(pj.read_json({str(path)!r}), {str(pq_path)!r})"
                )
            steps["parquet"] = f"check_data({str(pq_path)!r})"
        for name, body in steps.items():
            r = measure(body)
            print(
                f"{rows:>9} {mb:>7.1f} {name:>10} {r['s']:>8.2f} {rows / r['s']:>9.0f} {r['rss_mb']:>12.0f}", flush=True
            )
            if name == "check":
                check_rss[rows] = r["rss_mb"]
        if not args.no_train:
            r = first_step(path, work)
            starts[rows] = r["s"]
            print(
                f"{rows:>9} {mb:>7.1f} {'first step':>10} {r['s']:>8.2f} {'':>9} {r['driver_mb']:>12.0f}"
                f"  worker {r['worker_mb']:.0f} MB, {r['reading']}",
                flush=True,
            )
    if args.tokenizer:
        path = work / "qa-tokenise.jsonl"
        write_qa(path, 20_000, seed=1)
        body = (
            "from ray_ft.data import PromptFormat, encode_generation, read_data\n"
            "from ray_ft.models import load_tokenizer\n"
            f"tok = load_tokenizer({args.tokenizer!r}); recs = read_data({str(path)!r}).records\n"
            "t1 = time.perf_counter(); [encode_generation(r, tok, PromptFormat(), 512) for r in recs]\n"
            "print(json.dumps({'tok_s': time.perf_counter() - t1}))"
        )
        code = MEASURE.format(setup="", body=body)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        tok_s = json.loads(out.strip().splitlines()[-2])["tok_s"]
        print(f"# tokenise (encode_generation, one process): {20_000 / tok_s:.0f} examples/s")
    nan = float("nan")
    ratio = starts.get(1_000_000, nan) / starts.get(10_000, nan)
    print(f"check_rss_mb_1m={check_rss.get(1_000_000, nan):.0f} first_step_s_1m_over_10k={ratio:.2f}")


if __name__ == "__main__":
    main()
