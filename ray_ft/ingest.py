"""Ray Data ingest for data that outgrows one machine: files checked by Ray tasks, records read by Ray Data.

The driver never holds the data set. :func:`scan_with_ray` runs :func:`ray_ft.data.scan_source` over every file
as parallel Ray tasks (each returns 24 bytes a row: its split hashes and row numbers), and
:func:`ray_ft.data.check_data` turns those into the split plan. :func:`records_dataset` is then a Ray Data
dataset whose read tasks open the files again, validate and clean each row as the check did, and keep one side
of the split; ``ray_ft.train.streaming_dataset`` shuffles and tokenises it and Ray Train streams each worker its
shard. Each pass re-reads the files in bounded batches, so memory stays flat however large the data grows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from ray_ft.data import DataSummary, SourceScan, scan_source, summary_records
from ray_ft.sources import Source

RECORDS_PER_BLOCK = 1024
SCAN_CPUS = 0.5
"""CPUs a scan or read task asks for (small shares, so they fit beside the training workers)."""
CREDENTIAL_VARIABLES = ("AWS_", "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT", "AZURE_STORAGE_")
"""Environment variables (names or prefixes) that reach the scan and read tasks from the driver's environment."""


def storage_runtime_env() -> dict[str, Any] | None:
    """A Ray ``runtime_env`` carrying the driver's storage credentials to the tasks that read the files.

    Ray workers inherit the environment Ray was started with, which need not hold the credentials the driver has
    now (an existing cluster, a long-lived local Ray).
    """
    env = {k: v for k, v in os.environ.items() if k.startswith(CREDENTIAL_VARIABLES)}
    return {"env_vars": env} if env else None


def scan_with_ray(sources: list[Source], fmt: str, seed: int) -> list[SourceScan]:
    """:func:`ray_ft.data.scan_source` for every file, as parallel Ray tasks; results in file order."""
    import ray

    task = ray.remote(num_cpus=SCAN_CPUS, runtime_env=storage_runtime_env())(scan_source)
    return ray.get([task.remote(s, i, fmt, seed) for i, s in enumerate(sources)])


def records_dataset(summary: DataSummary, side: str):
    """A Ray Data dataset of the ``side`` (``"train"`` or ``"val"``) records of a checked data set, as JSON text in
    a ``record`` column; one read task per file, each yielding blocks of :data:`RECORDS_PER_BLOCK` records."""
    import ray.data

    def read(batch: dict[str, Any]) -> Iterator[dict[str, list[str]]]:
        out: list[str] = []
        for index in batch["index"]:
            for found, rec in summary_records(summary, int(index)):
                if found == side:
                    out.append(json.dumps(rec, ensure_ascii=False))
                if len(out) >= RECORDS_PER_BLOCK:
                    yield {"record": out}
                    out = []
        if out:
            yield {"record": out}

    files = [{"index": i} for i in range(len(summary.sources))]
    return ray.data.from_items(files, override_num_blocks=len(files)).map_batches(
        read, batch_size=1, num_cpus=SCAN_CPUS, runtime_env=storage_runtime_env()
    )


def sample_records(summary: DataSummary, n: int) -> tuple[list[dict], list[dict]]:
    """The first ``n`` training and validation records in file order (for evaluation), reading no further."""
    want = {"train": min(n, summary.plan.n_train), "val": min(n, summary.plan.n_val)}
    found: dict[str, list[dict]] = {"train": [], "val": []}
    for index in range(len(summary.sources)):
        for side, rec in summary_records(summary, index):
            if len(found[side]) < want[side]:
                found[side].append(rec)
            if all(len(found[k]) >= want[k] for k in want):
                return found["train"], found["val"]
    return found["train"], found["val"]
