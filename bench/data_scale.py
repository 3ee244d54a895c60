"""How data checking scales: rows/s and peak memory of ``ray-ft data check`` on synthetic Q/A sets.

For each size (default 10k, 100k and 1M rows, about 316 bytes a row as JSON Lines) it writes the set once under
``--workdir`` and runs, each in a fresh process so peak RSS is that step's own:

- ``check``: what ``ray-ft data check FILE`` runs, ``ray_ft.data.check_data`` (one bounded-memory pass keeping
  only the split hashes; a process per CPU over 8 MiB pieces of the file), without the CLI's own imports;
- ``in-memory``: ``ray_ft.data.read_data`` (every record held, the small-data training path), with ``--in-memory``;
- ``parquet``: ``check_data`` on the same rows as Parquet (one file, read in one process), with ``--parquet``;
- ``tokenise``: ``encode_generation`` on the first 20k rows with ``--tokenizer DIR`` (examples/s, one process).

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
from pathlib import Path

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--workdir", default=None, help="where the data sets are written (default: a temp dir)")
    p.add_argument("--in-memory", action="store_true", help="also time read_data, which holds every record")
    p.add_argument("--parquet", action="store_true", help="also check the same rows as Parquet")
    p.add_argument("--tokenizer", default=None, help="a model directory whose tokenizer to time")
    args = p.parse_args()
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
                import pyarrow.json as pj
                import pyarrow.parquet as pq

                pq.write_table(pj.read_json(path), pq_path)
            steps["parquet"] = f"check_data({str(pq_path)!r})"
        for name, body in steps.items():
            r = measure(body)
            print(
                f"{rows:>9} {mb:>7.1f} {name:>10} {r['s']:>8.2f} {rows / r['s']:>9.0f} {r['rss_mb']:>12.0f}", flush=True
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


if __name__ == "__main__":
    main()
