"""Training on Ray Train (V2) with DeepSpeed.

``train_fn_per_worker`` is the explicit loop each Ray Train worker runs; :func:`fit` is the
driver that validates inputs, builds the ``TorchTrainer``, and returns the final checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ray_ft.checkpoints import seal_checkpoint, verify_checkpoint, weights_only_loading
from ray_ft.config import ConfigError, ExperimentConfig
from ray_ft.data import (
    IGNORE_INDEX,
    DataSummary,
    PromptFormat,
    batch_counts,
    collate,
    encode_generation,
    length_grouped_batches,
    pack,
)
from ray_ft.device import select_device
from ray_ft.methods import get_method

TRAINABLE_DIR = "trainable"
PROGRESS_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s", "val_loss")
STATE_FILE = "state.json"


# --------------------------------------------------------------------------- worker side


def deepspeed_config(cfg: ExperimentConfig, world_size: int, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed config dict for this run (ZeRO stage, batch sizes, clipping, precision)."""
    zero: dict[str, Any] = {"stage": cfg.deepspeed.zero_stage}
    if cfg.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if cfg.deepspeed.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    ds = {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": cfg.train.batch_size * cfg.train.grad_accum * world_size,
        "gradient_clipping": cfg.train.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    return {**ds, **cfg.deepspeed.extra}


def lr_lambda(cfg: ExperimentConfig, total_steps: int):
    warmup = int(total_steps * cfg.train.warmup_ratio)

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.train.lr_scheduler == "cosine":
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        if cfg.train.lr_scheduler == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return fn


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


class _Batches:
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


class _StreamedBatches:
    """Micro-batches from this worker's Ray Data shard (``data.streaming``), read in order.

    Ray Data shuffles and tokenises each epoch and gives every worker as many rows; each window of
    ``STREAM_WINDOW`` micro-batches is sorted by length, cut into micro-batches, and those are shuffled.
    ``per_epoch`` (micro-batches in one pass over the shard) lets a resumed run start where its epoch was: the first
    :meth:`get` at micro-step ``m`` passes over the ``m % per_epoch`` micro-batches of that epoch already trained
    on (a fresh shuffle, so other examples than before, but the epochs stay aligned with the steps).
    """

    def __init__(self, shard, batch_size: int, rank: int, seed: int, pad_id: int, packed: bool, per_epoch: int = 0):
        self.shard, self.batch_size, self.rank, self.seed = shard, batch_size, rank, seed
        self.pad_id, self.packed, self.per_epoch = pad_id, packed, per_epoch
        self._stream = None

    def get(self, micro_step: int) -> dict[str, torch.Tensor]:
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
                batch_size=self.batch_size * STREAM_WINDOW, batch_format="numpy", prefetch_batches=2
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


class _Encode:
    """Ray Data ``map_batches`` callable: JSON records -> ``input_ids`` / ``labels`` (one tokenizer per actor).

    Each record is tokenised once per epoch here, for all workers, as :func:`train_fn_per_worker` would.
    """

    def __init__(self, model_dir: str, trust_remote_code: bool, data: dict[str, Any]):
        from ray_ft.config import DataConfig
        from ray_ft.models import load_tokenizer

        self.cfg = DataConfig.model_validate(data)
        self.tokenizer = load_tokenizer(model_dir, trust_remote_code)
        self.fmt = PromptFormat.from_config(self.cfg)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        import json

        enc = [
            encode_generation(json.loads(r), self.tokenizer, self.fmt, self.cfg.max_length, self.cfg.train_on)
            for r in batch["record"]
        ]
        return {"input_ids": [e["input_ids"] for e in enc], "labels": [e["labels"] for e in enc]}


def _read_shard(shard) -> list[dict[str, list[int]]]:
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
    files Ray Data tasks read and split again on every pass, so no process holds the data set.
    """
    import json

    import ray.data

    from ray_ft.ingest import records_dataset

    n = (
        (records.plan.n_train if side == "train" else records.plan.n_val)
        if isinstance(records, DataSummary)
        else len(records)
    )
    if side == "train" and n < max(cfg.scaling.num_workers, 1):
        raise ConfigError(
            [f"data.streaming: {n} training examples for {cfg.scaling.num_workers} workers; need one each"]
        )
    ray.data.DataContext.get_current().enable_progress_bars = False
    if isinstance(records, DataSummary):
        rows = records_dataset(records, side)
    else:
        rows = ray.data.from_items([{"record": json.dumps(r, ensure_ascii=False)} for r in records])
    if side == "train":
        rows = rows.random_shuffle(num_cpus=0.25)  # small shares: the pipeline fits beside the workers in one CPU
    return rows.map_batches(
        _Encode,
        fn_constructor_kwargs={
            "model_dir": model_dir,
            "trust_remote_code": cfg.model.trust_remote_code,
            "data": cfg.data.model_dump(),
        },
        batch_size=64,
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=0.5,
    )


def _all_reduce(values: list[float]) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        t = t.to(_comm_device())
        dist.all_reduce(t)
    return t.cpu().tolist()


GLIBC_MALLOPT = {"M_TRIM_THRESHOLD": (-1, 2**31 - 1), "M_TOP_PAD": (-2, 1 << 28), "M_MMAP_THRESHOLD": (-3, 1 << 25)}
"""glibc ``mallopt`` settings for CPU training: (parameter number, C ``int`` value)."""


def keep_freed_memory() -> bool:
    """Have glibc keep freed memory in the process instead of handing it back to the OS.

    A CPU training step allocates and frees the same activation buffers every step. glibc's defaults serve
    large blocks with fresh ``mmap`` pages and trim the heap after each free, so every step page-faults its
    activations back in (zeroed by the kernel): a few percent of a step in system time. Here blocks up to
    32 MiB come from the heap and the heap is never trimmed, so the process stays at its peak size (what it
    peaks at anyway). Skipped where the user chose an allocator (``LD_PRELOAD``, ``MALLOC_*``/``GLIBC_TUNABLES``
    variables) or the C library is not glibc. Returns whether the settings were applied.
    """
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc" or any(
        k == "LD_PRELOAD" or k == "GLIBC_TUNABLES" or k.startswith("MALLOC_") for k in os.environ
    ):
        return False
    libc = ctypes.CDLL(None)
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return all(libc.mallopt(param, value) == 1 for param, value in GLIBC_MALLOPT.values())


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory on GPU, else this process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextlib.contextmanager
def _process_group():
    """DeepSpeed needs a process group; Ray Train makes one, local mode (``num_workers=0``) does not.

    One made here is destroyed through DeepSpeed on the way out, which also drops DeepSpeed's cached groups, so a
    second local run in the same process starts clean.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    # An in-process store: no port to pick, so concurrent local runs on one machine cannot collide.
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        import deepspeed.comm

        if dist.is_initialized():
            deepspeed.comm.destroy_process_group()


def _comm_device() -> torch.device:
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _compiled_graphs() -> int:
    """Graphs ``torch.compile`` has built in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def answer_only_logits(model) -> bool:
    """Whether :func:`causal_lm_loss` may project only the positions that carry a label.

    Needs a forward that takes ``logits_to_keep``; prompt learning prepends virtual tokens, which shifts the
    positions, so it keeps the model's own loss.
    """
    import inspect

    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and peft_config.is_prompt_learning:
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def labelled_hidden_states(model, batch: dict[str, torch.Tensor]):
    """``(hidden, targets, head)``: the final hidden states at the positions whose next token is labelled, those
    tokens, and the output projection, for a loss that applies the projection itself (fused)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = base.get_decoder()(**inputs, use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    return hidden[:, :-1][keep], targets[keep], base.get_output_embeddings()


def fused_linear_cross_entropy(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token loss over labelled tokens through Liger-Kernel's fused linear + cross-entropy (CUDA): the
    projection runs chunk by chunk inside the loss, so the (tokens x vocabulary) logits never exist at once."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    hidden, targets, head = labelled_hidden_states(model, batch)
    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX)(head.weight, hidden, targets, head.bias)


def causal_lm_loss(model, batch: dict[str, torch.Tensor], answer_only: bool, fused: bool = False) -> torch.Tensor:
    """Mean next-token loss over labelled tokens (the model's own loss, same value).

    With ``answer_only`` the vocabulary projection and softmax run only at positions whose next token is
    labelled (answers), not at prompt and padding positions: with a large vocabulary this is a good part of a
    step on CPU and of activation memory everywhere. ``fused`` (``train.fused_linear_cross_entropy``) computes the
    same loss at the same positions with :func:`fused_linear_cross_entropy`.
    """
    if fused:
        return fused_linear_cross_entropy(model, batch)
    if not answer_only:
        return model(**batch, use_cache=False).loss
    targets = batch["labels"][:, 1:]
    keep = torch.nonzero((targets != IGNORE_INDEX).any(0)).flatten()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
    return torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), targets[:, keep].flatten(), ignore_index=IGNORE_INDEX
    )


@torch.no_grad()
def _validation_loss(engine, batches: list[dict[str, torch.Tensor]], device, answer_only: bool) -> float:
    engine.eval()
    total = count = 0.0
    # Eager even under train.compile: a no-grad eval graph (and its odd-sized last batch) would each cost a
    # compile, more than the few validation forwards gain from it.
    with torch.compiler.set_stance("force_eager"):
        for b in batches:
            b = {k: v.to(device) for k, v in b.items()}
            loss = causal_lm_loss(engine, b, answer_only)
            n = float((b["labels"][:, 1:] != IGNORE_INDEX).sum())
            if n:  # a filler batch (see train_fn_per_worker) runs the forward but counts for nothing
                total += loss.item() * n
                count += n
    engine.train()
    total, count = _all_reduce([total, count])
    return total / max(count, 1.0)


def quiet_report_log() -> None:
    """Silence Ray Train's per-report INFO line (it dumps every metrics dict next to the progress line).

    Its logger is named after the module's file path, so ``LoggingConfig(log_level=...)`` does not reach it.
    """
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # a Ray without Train V2 internals at that path: keep its default logging
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def train_fn_per_worker(loop_config: dict[str, Any]) -> None:
    """The training loop run by every Ray Train worker.

    ``loop_config`` holds the resolved config (``config``), the base model directory
    (``model_dir``), the train/validation records, and the MLflow run to log into.
    """
    with _process_group():
        _train_loop(ExperimentConfig.model_validate(loop_config["config"]), loop_config)


def _train_loop(cfg: ExperimentConfig, loop_config: dict[str, Any]) -> None:
    import deepspeed
    import ray.train
    import ray.train.torch

    quiet_report_log()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # Ray assigned this worker its device; the dtype rules live in ray_ft.device with every other placement.
    placement = select_device(cfg.scaling.use_gpu, cfg.model.dtype, training=True, device=ray.train.torch.get_device())
    device, use_gpu = placement.device, placement.on_gpu
    if not use_gpu:
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
        keep_freed_memory()
    torch.manual_seed(cfg.train.seed)
    method = get_method(cfg.method.name)
    from ray_ft.models import load_tokenizer

    tokenizer = load_tokenizer(loop_config["model_dir"], cfg.model.trust_remote_code)
    fmt = PromptFormat.from_config(cfg.data)
    train_on = cfg.data.train_on
    train_enc = [
        encode_generation(r, tokenizer, fmt, cfg.data.max_length, train_on) for r in loop_config["train_records"]
    ]
    if loop_config.get("streamed_val"):  # this rank's share of the validation set, tokenised by Ray Data
        val_enc = _read_shard(ray.train.get_dataset_shard("val"))
        first, stride = 0, cfg.train.batch_size
    else:
        val_enc = [
            encode_generation(r, tokenizer, fmt, cfg.data.max_length, train_on) for r in loop_config["val_records"]
        ]
        first, stride = rank * cfg.train.batch_size, cfg.train.batch_size * world
    val_batches = [
        collate(val_enc[i : i + cfg.train.batch_size], tokenizer.pad_token_id)
        for i in range(first, len(val_enc), stride)
    ]
    # ZeRO-3 gathers parameters collectively in every forward, so all ranks must run as many validation
    # forwards: a rank short of data repeats a batch without answer tokens (it adds nothing to the loss).
    if val_enc:
        filler = collate(val_enc[:1], tokenizer.pad_token_id)
        filler["labels"].fill_(-100)
        val_batches += [filler] * (math.ceil(len(val_enc) / stride) - len(val_batches))

    model = method.load_for_training(cfg, loop_config["model_dir"], device)
    bf16 = next(model.parameters()).dtype == torch.bfloat16
    steps_per_epoch, total_steps = plan_steps(cfg, loop_config.get("n_train", len(train_enc)), world)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=use_gpu or None
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, world, bf16),
        dist_init_required=False,
    )

    if cfg.train.compile:
        if rank == 0:
            print("[ray-ft] train.compile: compiling the model; the first step includes compile time", flush=True)
        engine.compile(backend="inductor", compile_kwargs={"dynamic": True})
    graphs_before = _compiled_graphs()

    start_step = 0
    seen = {"samples_seen": 0.0, "tokens_seen": 0.0}  # examples and answer+prompt tokens trained on, all ranks
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d, weights_only_loading(engine):
            verify_checkpoint(d)  # before DeepSpeed unpickles anything from it
            _, client_state = engine.load_checkpoint(d, tag="ds", load_module_strict=False)
            start_step = int(client_state["step"])
            seen = {k: float(client_state.get(k, 0.0)) for k in ("samples_seen", "tokens_seen")}
        if rank == 0:
            print(f"[ray-ft] resumed from step {start_step}/{total_steps}", flush=True)

    from ray_ft.tracking import StepLogger

    logger = StepLogger(loop_config.get("tracking_uri"), loop_config.get("run_id")) if rank == 0 else None
    if logger is not None:
        # ZeRO-3 has partitioned the parameters by now; ``ds_numel`` is the full size.
        logger.log({"trainable_params": sum(getattr(p, "ds_numel", p.numel()) for p in trainable)}, step=start_step)
    if cfg.data.streaming:  # batches come from this worker's Ray Data shard (see build_trainer)
        batches = _StreamedBatches(
            ray.train.get_dataset_shard("train"),
            cfg.train.batch_size,
            rank,
            cfg.train.seed,
            tokenizer.pad_token_id,
            cfg.train.packing,
            per_epoch=math.ceil(loop_config["n_train"] // world / cfg.train.batch_size),
        )
    else:
        batches = _Batches(
            train_enc, cfg.train.batch_size, rank, world, cfg.train.seed, tokenizer.pad_token_id, cfg.train.packing
        )
    eval_every = cfg.train.eval_every or steps_per_epoch
    answer_only = answer_only_logits(engine.module)
    fused_ce = cfg.train.fused_linear_cross_entropy
    if fused_ce and not use_gpu:
        raise ConfigError(["train.fused_linear_cross_entropy: this worker has no CUDA GPU (Liger's kernels need one)"])
    accum = cfg.train.grad_accum
    engine.train()
    t_start, tokens_since, t_last = time.time(), 0.0, time.time()
    # Steady-state throughput: wall time from the end of the first (warm-up) step, reports included.
    steady = {"tokens": 0.0, "samples": 0.0, "since": 0.0}
    graphs_seen = 0
    for step in range(start_step, total_steps):
        loss_sum = 0.0
        tokens = samples = 0
        for micro in range(accum):
            batch = {k: v.to(device) for k, v in batches.get(step * accum + micro).items()}
            loss = causal_lm_loss(engine, batch, answer_only, fused_ce)
            engine.backward(loss)
            engine.step()
            loss_sum += loss.item()
            n_tokens, n_examples = batch_counts(batch)
            tokens += n_tokens
            samples += n_examples
        loss_mean, tokens_all, samples_all = _all_reduce([loss_sum / accum, float(tokens), float(samples)])
        loss_mean /= world
        tokens_since += tokens_all
        seen["samples_seen"] += samples_all
        seen["tokens_seen"] += tokens_all
        if step == start_step:
            steady["since"] = time.time()
        else:
            steady["tokens"] += tokens_all
            steady["samples"] += samples_all
        done = step + 1
        metrics: dict[str, Any] = {
            "step": done,
            "epoch": done / steps_per_epoch,
            "loss": loss_mean,
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": float(engine.get_global_grad_norm() or 0.0),
            **seen,
        }
        is_eval = done % eval_every == 0 or done == total_steps
        if done % cfg.train.log_every == 0 or is_eval:
            elapsed = time.time() - t_last
            metrics["tokens_per_s"] = tokens_since / max(elapsed, 1e-9)
            tokens_since, t_last = 0.0, time.time()
        metrics["peak_mem_mb"] = peak_memory_mb(device)
        if cfg.train.compile:  # graphs dynamo built in this run; growth after the first step means recompiles
            metrics["compiled_graphs"] = _compiled_graphs() - graphs_before
            if step > start_step and metrics["compiled_graphs"] > graphs_seen and rank == 0:
                print(
                    f"[ray-ft] train.compile: step {done} compiled again; TORCH_LOGS=recompiles names the cause",
                    flush=True,
                )
            graphs_seen = metrics["compiled_graphs"]
        if step > start_step:
            elapsed_steady = max(time.time() - steady["since"], 1e-9)
            metrics["steady_tokens_per_s"] = steady["tokens"] / elapsed_steady
            metrics["steady_samples_per_s"] = steady["samples"] / elapsed_steady
        if is_eval and val_enc:
            metrics["val_loss"] = _validation_loss(engine, val_batches, device, answer_only)
        if rank == 0:
            eta = (time.time() - t_start) / (done - start_step) * (total_steps - done)
            line = " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k in PROGRESS_KEYS)
            print(f"[ray-ft] step {done}/{total_steps} epoch {metrics['epoch']:.2f} {line} eta {eta:.0f}s", flush=True)
            logger.log({k: v for k, v in metrics.items() if k != "step"}, step=done)
        if is_eval:
            write = functools.partial(_save_checkpoint, engine, method, tokenizer, metrics, rank, done)
            report_checkpoint(cfg, metrics, done, write)
        elif done % cfg.train.log_every == 0:
            ray.train.report(metrics)


def report_checkpoint(
    cfg: ExperimentConfig,
    metrics: dict[str, Any],
    step: int,
    write: Callable[[Path], None],
    *,
    has_checkpoint: bool = True,
) -> None:
    """``ray.train.report(metrics)`` with a checkpoint directory that ``write`` fills (skipped when this rank has
    no ``has_checkpoint`` part to add).

    Ray Train persists a reported checkpoint into the run's storage. Local mode (``scaling.num_workers=0``) does
    not, so there the checkpoint is written straight into the same place (to a hidden sibling, then renamed) and
    the oldest beyond ``train.keep_checkpoints`` are removed.
    """
    import ray.train

    if cfg.scaling.num_workers > 0:
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if has_checkpoint:
                write(Path(tmp))
                seal_checkpoint(tmp, ray.train.get_context().get_world_rank())
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)
        return
    import shutil

    root = Path(storage_path(cfg)) / run_name(cfg)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint_local_{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    write(tmp)
    seal_checkpoint(tmp, 0)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(final)))
    for old in sorted(root.glob("checkpoint_local_*"))[: -cfg.train.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)


def _save_checkpoint(engine, method, tokenizer, metrics: dict[str, Any], rank: int, step: int, out: Path) -> None:
    import json

    import deepspeed

    state = {"step": step, "samples_seen": metrics["samples_seen"], "tokens_seen": metrics["tokens_seen"]}
    engine.save_checkpoint(str(out), tag="ds", client_state=state, exclude_frozen_parameters=True)
    params = [p for p in engine.module.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_stage() == 3):
        if rank == 0:
            method.save_trainable(engine.module, out / TRAINABLE_DIR, tokenizer)
            (out / STATE_FILE).write_text(json.dumps({"step": step, **metrics}))


# --------------------------------------------------------------------------- driver side


@dataclass
class FitResult:
    checkpoint_dir: str | None
    metrics: dict[str, Any]
    wall_s: float


def init_ray(cfg: ExperimentConfig) -> None:
    """Connect to ``scaling.address`` / ``RAY_ADDRESS``, or start a local Ray sized for the run."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.scaling.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # data.streaming runs Ray Data's shuffle tasks and tokenising actor beside the workers.
    need = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + (1 if cfg.data.streaming else 0)
    ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(need)), log_to_driver=True)


def run_name(cfg: ExperimentConfig) -> str:
    return Path(cfg.output_dir).resolve().name or "run"


def storage_path(cfg: ExperimentConfig) -> str:
    return cfg.scaling.storage_path or str(Path(cfg.output_dir).resolve() / "ray")


def existing_checkpoints(cfg: ExperimentConfig) -> list[str]:
    root = Path(storage_path(cfg)) / run_name(cfg)
    return sorted(str(p) for p in root.glob("checkpoint_*")) if root.is_dir() else []


def build_trainer(
    cfg: ExperimentConfig,
    loop_config: dict[str, Any],
    callbacks: list | None = None,
    name: str | None = None,
    storage: str | None = None,
    train_fn=None,
):
    """The ``TorchTrainer`` for one run (also used per trial by ``ray-ft tune``).

    ``train_fn`` replaces :func:`train_fn_per_worker` for methods that bring their own loop (``linear_probe``).
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    datasets = None
    if cfg.data.streaming and train_fn is None:
        # The records travel once, into the Ray Data pipeline, not to every worker (or stay in their files).
        records = loop_config["train_records"]
        datasets = {"train": streaming_dataset(cfg, records, loop_config["model_dir"])}
        if isinstance(records, DataSummary):
            loop_config = {**loop_config, "train_records": [], "n_train": records.plan.n_train}
            if records.plan.n_val:
                datasets["val"] = streaming_dataset(cfg, records, loop_config["model_dir"], side="val")
                loop_config = {**loop_config, "val_records": [], "streamed_val": True}
        else:
            loop_config = {**loop_config, "train_records": [], "n_train": len(records)}
    return TorchTrainer(
        train_fn or train_fn_per_worker,
        train_loop_config=loop_config,
        datasets=datasets,
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if cfg.scaling.use_gpu else {})},
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name or run_name(cfg),
            storage_path=storage or storage_path(cfg),
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            callbacks=callbacks,
            # Progress lines are printed once by rank 0; keep Ray's per-report INFO lines out.
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


def _local_checkpoint_dir(checkpoint) -> str | None:
    """A local directory for the checkpoint (downloaded when ``storage_path`` is a cloud URI)."""
    if checkpoint is None:
        return None
    if os.path.isdir(checkpoint.path):
        return checkpoint.path
    return checkpoint.to_directory(tempfile.mkdtemp(prefix="ray-ft-checkpoint-"))


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


def fit(
    cfg: ExperimentConfig,
    model_dir: str,
    train_records: list[dict],
    val_records: list[dict],
    tracking_uri: str | None = None,
    run_id: str | None = None,
    train_fn=None,
    extra_loop_config: dict[str, Any] | None = None,
) -> FitResult:
    """Run the Ray Train job; return the final checkpoint and the last reported metrics.

    ``train_fn`` and ``extra_loop_config`` let a method run its own worker loop with extra inputs.
    """
    if cfg.train.packing:
        check_packing(model_dir, cfg.model.trust_remote_code)
    init_ray(cfg)
    loop_config = {
        "config": cfg.to_dict(),
        "model_dir": model_dir,
        "train_records": train_records,
        "val_records": val_records,
        "tracking_uri": tracking_uri,
        "run_id": run_id,
        **(extra_loop_config or {}),
    }
    t0 = time.time()
    result = build_trainer(cfg, loop_config, train_fn=train_fn).fit()
    return FitResult(
        checkpoint_dir=_local_checkpoint_dir(result.checkpoint),
        metrics=dict(result.metrics or {}),
        wall_s=time.time() - t0,
    )
