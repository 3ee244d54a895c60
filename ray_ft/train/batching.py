"""What each step trains on: the step plan, the per-rank micro-batches (in memory or streamed through Ray Data),
and the packing check."""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ray_ft.config import ConfigError, ExperimentConfig
from ray_ft.data import DataSummary, length_grouped_batches
from ray_ft.ingest import Encode, records_dataset
from ray_ft.tensors import collate, pack


def plan_steps(cfg: ExperimentConfig, n_train: int, world_size: int) -> tuple[int, int]:
    """Return ``(steps_per_epoch, total_steps)`` in optimizer steps."""
    per_step = cfg.train.batch_size * cfg.train.grad_accum * world_size
    steps_per_epoch = max(1, math.ceil(n_train / per_step))
    total = cfg.train.max_steps or max(1, math.ceil(steps_per_epoch * cfg.train.epochs))
    return steps_per_epoch, total


def fit_batch_to_data(cfg: ExperimentConfig, n_train: int) -> tuple[ExperimentConfig, str | None]:
    """Shrink the global batch of an epoch-based run on a small training set to reach ``train.min_steps``.

    Tries ``grad_accum`` down to 1, then ``batch_size`` down to 1, and keeps the first (largest) global batch whose
    epochs give at least ``train.min_steps`` optimizer steps (the smallest batch when none does). Returns the
    config to train with and a line saying what was chosen and why (``None`` when nothing changed).
    """
    t = cfg.train
    if t.max_steps is not None or t.min_steps is None:
        return cfg, None
    world = max(1, cfg.scaling.num_workers)

    def total(batch: int, accum: int) -> int:
        return plan_steps(
            cfg.model_copy(update={"train": t.model_copy(update={"batch_size": batch, "grad_accum": accum})}),
            n_train,
            world,
        )[1]

    before = total(t.batch_size, t.grad_accum)
    if before >= t.min_steps:
        return cfg, None
    candidates = [(t.batch_size, a) for a in range(t.grad_accum - 1, 0, -1)] + [
        (b, 1) for b in range(t.batch_size - 1, 0, -1)
    ]
    batch, accum = next(((b, a) for b, a in candidates if total(b, a) >= t.min_steps), (1, 1))
    if (batch, accum) == (t.batch_size, t.grad_accum):  # already the smallest batch
        return cfg, None
    after = total(batch, accum)
    new = cfg.model_copy(update={"train": t.model_copy(update={"batch_size": batch, "grad_accum": accum})})
    line = (
        f"[ray-ft] {n_train} training examples: the configured global batch of {t.batch_size * t.grad_accum * world} "
        f"(batch_size {t.batch_size} x grad_accum {t.grad_accum} x {world} workers) gives {before} optimizer steps in "
        f"{t.epochs:g} epochs, under train.min_steps={t.min_steps}; training with batch_size {batch} x grad_accum "
        f"{accum} = {batch * accum * world} per step, {after} steps (train.min_steps=null keeps the configured batch)"
    )
    return new, line


class Batches:
    """Deterministic per-rank micro-batches, indexable by global micro-step (so resume is exact).

    Every micro-batch holds ``batch_size`` examples: the epoch's last global batch, when short, is filled with
    the shortest other examples (as ``DistributedSampler`` repeats examples to even out ranks). Constant batch
    sizes keep ranks in step and spare ``train.compile`` a recompile for a one-example batch.
    """

    def __init__(
        self, encoded: list[dict], batch_size: int, rank: int, world: int, seed: int, pad_id: int, packed: bool
    ):
        self.encoded, self.batch_size, self.rank, self.world = encoded, batch_size, rank, world
        self.seed, self.pad_id, self.packed = seed, pad_id, packed
        self._epoch, self._mine = -1, []
        self.lengths = [len(e["input_ids"]) for e in encoded]
        self.per_epoch = max(1, math.ceil(len(encoded) / (batch_size * world)))  # as many as length_grouped_batches
        self._shortest = sorted(range(len(encoded)), key=self.lengths.__getitem__)  # fillers for a short batch

    def get(self, micro_step: int) -> dict[str, torch.Tensor]:
        epoch, i = divmod(micro_step, self.per_epoch)
        if epoch != self._epoch:
            self._mine = [g[self.rank :: self.world] for g in self.global_batches(epoch)]
            self._epoch = epoch
        examples = [self.encoded[j] for j in self._mine[i]]
        return pack(examples) if self.packed else collate(examples, self.pad_id)

    def global_batches(self, epoch: int) -> list[list[int]]:
        """The epoch's global batches (example indices), each dealt round-robin to the ranks."""
        size = self.batch_size * self.world
        groups = length_grouped_batches(self.lengths, size, self.seed + epoch)
        for k, g in enumerate(groups):
            if len(g) < size:
                filler = [j for j in self._shortest if j not in g][: size - len(g)]
                groups[k] = ((g + filler) * size)[:size]  # repeats only when the set is smaller than a batch
        return groups


STREAM_WINDOW = 16
"""Micro-batches per length-grouping window of a streamed shard."""
STREAM_BLOCK_BYTES = 256 << 10
"""Largest block the streaming pipeline's tasks emit. Ray Data's default (128 MiB) lets a read or tokenise task hold
its whole output (a file piece: tens of thousands of records) before passing any of it on; small blocks pass each
thousand or so records on as soon as they are ready, so the first batch arrives in seconds."""
SHUFFLE_BUFFER_ROWS = 1024
"""Rows each worker's local shuffle buffer mixes (a streamed training shard arrives piece by piece, in file order
within a piece)."""


class StreamedBatches:
    """Micro-batches from this worker's Ray Data shard (``data.streaming``), read in order.

    Ray Data reads the files in a new random order and tokenises them each epoch, and gives every worker as many
    rows; they pass through a seeded local shuffle buffer of ``SHUFFLE_BUFFER_ROWS`` rows, then each window of
    ``STREAM_WINDOW`` micro-batches is sorted by length, cut into micro-batches, and those are shuffled.
    ``per_epoch`` (micro-batches in one pass over the shard) lets a resumed run start where its epoch was: the first
    :meth:`get` at micro-step ``m`` passes over the ``m % per_epoch`` micro-batches of that epoch already trained
    on (a fresh shuffle, so other examples than before, but the epochs stay aligned with the steps).

    :meth:`prefetch` starts the first epoch in the background (a fresh run, before the model loads), so that Ray
    Data's start-up (its read tasks, the tokenising actor) overlaps the worker's own.
    """

    def __init__(self, shard, batch_size: int, rank: int, seed: int, pad_id: int, packed: bool, per_epoch: int = 0):
        self.shard, self.batch_size, self.rank, self.seed = shard, batch_size, rank, seed
        self.pad_id, self.packed, self.per_epoch = pad_id, packed, per_epoch
        self._stream = None
        self._first: Future | None = None

    def prefetch(self) -> None:
        """Start micro-step 0's batch now, in a thread; the first :meth:`get` (which must be for step 0) takes it."""
        self._stream = self._micro_batches(0)
        self._first = ThreadPoolExecutor(1, thread_name_prefix="ray-ft-prefetch").submit(next, self._stream)

    def get(self, micro_step: int) -> dict[str, torch.Tensor]:
        if self._first is not None:
            if micro_step != 0:
                raise RuntimeError(f"prefetched micro-step 0, asked for {micro_step}")
            first, self._first = self._first, None
            return first.result()  # the thread's exception, if any, is raised here
        if self._stream is None:
            epoch, done = divmod(micro_step, self.per_epoch) if self.per_epoch else (0, 0)
            self._stream = self._micro_batches(epoch)
            for _ in range(done):
                next(self._stream)
        return next(self._stream)

    def _micro_batches(self, epoch: int = 0):
        import random

        while True:
            rng = random.Random(f"{self.seed}-{self.rank}-{epoch}")
            n = 0
            for window in self.shard.iter_batches(
                batch_size=self.batch_size * STREAM_WINDOW,
                batch_format="numpy",
                prefetch_batches=2,
                local_shuffle_buffer_size=SHUFFLE_BUFFER_ROWS,
                local_shuffle_seed=rng.randrange(2**32),
            ):
                pairs = zip(window["input_ids"], window["labels"], strict=True)
                rows = sorted(
                    ({"input_ids": list(i), "labels": list(j)} for i, j in pairs), key=lambda r: len(r["input_ids"])
                )
                chunks = [rows[k : k + self.batch_size] for k in range(0, len(rows), self.batch_size)]
                rng.shuffle(chunks)
                for chunk in chunks:
                    n += 1
                    yield pack(chunk) if self.packed else collate(chunk, self.pad_id)
            if not n:
                raise RuntimeError(f"rank {self.rank}: the streamed training shard is empty")
            epoch += 1


def read_shard(shard) -> list[dict[str, list[int]]]:
    """Every tokenised example of a Ray Data shard, as lists."""
    import numpy as np

    return [
        {"input_ids": np.asarray(i).tolist(), "labels": np.asarray(j).tolist()}
        for batch in shard.iter_batches(batch_size=256, batch_format="numpy")
        for i, j in zip(batch["input_ids"], batch["labels"], strict=True)
    ]


def streaming_dataset(cfg: ExperimentConfig, records: list[dict] | DataSummary, model_dir: str, side: str = "train"):
    """The Ray Data pipeline behind ``data.streaming``: read, shuffle (training side), tokenise in a small actor pool.

    ``records`` is either the records themselves, or a checked data set (:class:`ray_ft.data.DataSummary`) whose
    files Ray Data tasks read and split again on every pass, so no process holds the data set. A checked data set's
    training side is read file by file in a seeded order that changes every epoch, never shuffled as a whole: the
    first batch reaches the workers once the first piece is read, whatever the data's size (the workers then mix
    rows in a local buffer, see :class:`StreamedBatches`). Records held in the driver are shuffled whole.
    """
    import json

    import ray.data

    n = (
        (records.plan.n_train if side == "train" else records.plan.n_val)
        if isinstance(records, DataSummary)
        else len(records)
    )
    if side == "train" and n < max(cfg.scaling.num_workers, 1):
        raise ConfigError(
            [f"data.streaming: {n} training examples for {cfg.scaling.num_workers} workers; need one each"]
        )
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    default_block = context.target_max_block_size
    context.target_max_block_size = STREAM_BLOCK_BYTES  # the datasets made here keep it; others keep Ray's default
    try:
        if isinstance(records, DataSummary):
            rows = records_dataset(records, side, shuffle_seed=cfg.data.seed if side == "train" else None)
        else:
            rows = ray.data.from_items([{"record": json.dumps(r, ensure_ascii=False)} for r in records])
            if side == "train":
                rows = rows.random_shuffle(num_cpus=0.25)  # small shares: fits beside the workers in one CPU
        return rows.map_batches(
            Encode,
            fn_constructor_kwargs={
                "model_dir": model_dir,
                "trust_remote_code": cfg.model.trust_remote_code,
                "data": cfg.data,
            },
            batch_size=64,
            compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=0.5,
        )
    finally:
        context.target_max_block_size = default_block


def check_packing(model_dir: str, trust_remote_code: bool = False) -> None:
    """Refuse ``train.packing`` for an architecture whose examples would see each other once packed.

    Packing relies on the model building its attention mask from ``position_ids`` (transformers does this for
    most decoder LMs when no ``attention_mask`` is given). This is checked, not assumed: a one-layer random
    instance of the model's own architecture must give an example the same logits alone and packed behind another.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code, num_hidden_layers=1)
    refusal = f"train.packing: model type {config.model_type!r}"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code).eval()
    vocab = min(int(config.vocab_size), 1000)
    first, second = torch.randint(vocab, (1, 12)), torch.randint(vocab, (1, 9))
    positions = torch.cat([torch.arange(12), torch.arange(9)]).unsqueeze(0)
    try:
        with torch.no_grad():
            alone = model(input_ids=second, use_cache=False).logits[0]
            packed = model(input_ids=torch.cat([first, second], 1), position_ids=positions, use_cache=False)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ConfigError([f"{refusal} cannot take packed sequences ({e}); set train.packing=false"]) from e
    leak = float((packed.logits[0, 12:] - alone).abs().max() / alone.abs().max().clamp_min(1e-6))
    if leak > 1e-4:  # float32 round-off is ~1e-7
        raise ConfigError(
            [
                f"{refusal} lets packed examples attend to each other (relative logit change {leak:.2g}); "
                "set train.packing=false for this model"
            ]
        )
