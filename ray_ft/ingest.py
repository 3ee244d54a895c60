"""Ray Data ingest for data that outgrows one machine: files checked by Ray tasks, records read by Ray Data.

The driver never holds the data set. :func:`scan_sources` runs :func:`ray_ft.data.scan_source` over every file
in parallel, as Ray tasks across a cluster (each returns 24 bytes a row: its split hashes and row numbers), and
:func:`ray_ft.data.check_data` turns those into the split plan. :func:`records_dataset` is then a Ray Data
dataset whose read tasks open the files again (in a random order each pass, for training), validate and clean
each row as the check did, and keep one side of the split; ``ray_ft.train.streaming_dataset`` tokenises it and Ray
Train streams each worker its shard, which the training loop mixes in a local shuffle buffer. Each pass re-reads
the files in bounded batches, so memory stays flat however large the data grows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from ray_ft.config import DataConfig
from ray_ft.data import (
    DataSummary,
    PromptFormat,
    SourceScan,
    encode_generation,
    scan_here,
    scan_source,
    summary_records,
)
from ray_ft.sources import Source

RECORDS_PER_BLOCK = 1024
SCAN_CPUS = 0.5
"""CPUs a scan or read task asks for (small shares, so they fit beside the training workers)."""
READ_TASKS = 2
"""Read tasks of a streamed data set running at once. One reads, validates and splits tens of thousands of records
a second, more than one tokenising actor takes; more only compete with the training workers for CPUs."""
CREDENTIAL_VARIABLES = ("AWS_", "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT", "AZURE_STORAGE_")
"""Environment variables (names or prefixes) that reach the scan and read tasks from the driver's environment."""


def storage_runtime_env() -> dict[str, Any] | None:
    """A Ray ``runtime_env`` carrying the driver's storage credentials to the tasks that read the files.

    Ray workers inherit the environment Ray was started with, which need not hold the credentials the driver has
    now (an existing cluster, a long-lived local Ray).
    """
    env = {k: v for k, v in os.environ.items() if k.startswith(CREDENTIAL_VARIABLES)}
    return {"env_vars": env} if env else None


def scan_sources(sources: list[Source], fmt: str, seed: int) -> list[SourceScan]:
    """:func:`ray_ft.data.scan_source` for every file or piece; results in file order.

    On a Ray cluster of more than one node, or for data on a remote store, they run as Ray tasks across the
    cluster. Local files on a one-node Ray are scanned by processes forked from this one, as ``ray-ft data check``
    does: the same work without starting a Ray worker per task (about 10 s less for 1M rows on 2 CPUs).
    """
    import ray

    if not any(s.remote for s in sources) and sum(1 for n in ray.nodes() if n.get("Alive")) <= 1:
        return scan_here(sources, fmt, seed)
    task = ray.remote(num_cpus=SCAN_CPUS, runtime_env=storage_runtime_env())(scan_source)
    return ray.get([task.remote(s, i, fmt, seed) for i, s in enumerate(sources)])


def records_dataset(summary: DataSummary, side: str, shuffle_seed: int | None = None):
    """A Ray Data dataset of the ``side`` (``"train"`` or ``"val"``) records of a checked data set, as JSON text in
    a ``record`` column; one read task per file or piece, each yielding blocks of :data:`RECORDS_PER_BLOCK` records.

    With ``shuffle_seed`` the files and pieces are read in a seeded random order that changes with every pass (Ray
    Data's ``randomize_block_order`` on the list of files, before anything is read): records stream out as soon as
    the first piece is read, with no pass over the whole data set first. Records within a piece keep their file
    order; the training loop mixes them further in a local shuffle buffer.
    """
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
    pieces = ray.data.from_items(files, override_num_blocks=len(files))
    if shuffle_seed is not None:
        pieces = pieces.randomize_block_order(seed=shuffle_seed)
    return pieces.map_batches(
        read,
        batch_size=1,
        num_cpus=SCAN_CPUS,
        compute=ray.data.TaskPoolStrategy(size=READ_TASKS),
        runtime_env=storage_runtime_env(),
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


class Encode:
    """Ray Data ``map_batches`` callable: JSON records -> ``input_ids`` / ``labels`` (one tokenizer per actor).

    Each record is tokenised once per epoch here, for all workers, as the training loop would
    (:func:`ray_ft.train.loop.train_fn_per_worker`). It lives here, not under ``ray_ft.train``, so that the actor
    imports only the tokenizer's dependencies (the training package pulls in PEFT and more: seconds per start).
    """

    def __init__(self, model_dir: str, trust_remote_code: bool, data: DataConfig):
        from ray_ft.models import load_tokenizer

        self.cfg = data
        self.tokenizer = load_tokenizer(model_dir, trust_remote_code)
        self.fmt = PromptFormat.from_config(self.cfg)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        enc = [
            encode_generation(json.loads(r), self.tokenizer, self.fmt, self.cfg.max_length, self.cfg.train_on)
            for r in batch["record"]
        ]
        return {"input_ids": [e["input_ids"] for e in enc], "labels": [e["labels"] for e in enc]}
