"""The process around a training run: ``init_ray`` (the only ``ray.init`` of the package), the process group of a
local run, collectives, and the CPU allocator and memory readings."""

from __future__ import annotations

import contextlib
import logging
import math
import os

import torch

from ray_ft.config import ExperimentConfig

logger = logging.getLogger(__name__)

GLIBC_MALLOPT = {"M_TRIM_THRESHOLD": (-1, 2**31 - 1), "M_TOP_PAD": (-2, 1 << 28), "M_MMAP_THRESHOLD": (-3, 1 << 25)}
"""glibc ``mallopt`` settings for CPU training: (parameter number, C ``int`` value)."""


def start_ray(
    address: str | None = None, cpus_needed: float = 0, gpus_needed: float = 0, log_to_driver: bool = True
) -> bool:
    """Join ``address`` (else ``$RAY_ADDRESS``), or start a local Ray declaring at least ``cpus_needed`` logical
    CPUs (more than the machine's cores where a driver and its workers must fit beside each other) and
    ``gpus_needed`` GPUs. Nothing happens when this process is already connected.

    Returns:
        Whether the Ray is this process's own (started here, to be shut down by it) rather than joined.
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        logger.info("[ray-ft] connecting to Ray at %s", address)
        ray.init(address=address, log_to_driver=log_to_driver)
        return False
    gpus = {"num_gpus": math.ceil(gpus_needed)} if gpus_needed else {}
    cpus = max(os.cpu_count() or 1, math.ceil(cpus_needed))
    logger.info("[ray-ft] starting a local Ray (%d logical CPUs%s)", cpus, f", {gpus['num_gpus']} GPUs" if gpus else "")
    ray.init(address="local", num_cpus=cpus, log_to_driver=log_to_driver, **gpus)
    return True


def init_ray(cfg: ExperimentConfig, extra_cpus: float = 0) -> None:
    """Connect to ``scaling.address`` / ``RAY_ADDRESS``, or start a local Ray sized for the run's workers (plus
    ``extra_cpus``, e.g. Tune's per-trial drivers)."""
    # data.streaming runs Ray Data's shuffle tasks and tokenising actor beside the workers.
    need = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + (1 if cfg.data.streaming else 0) + extra_cpus
    start_ray(cfg.scaling.address, need)


@contextlib.contextmanager
def process_group():
    """DeepSpeed needs a process group; Ray Train makes one, local mode (``num_workers=0``) does not.

    One made here is destroyed through DeepSpeed on the way out, which also drops DeepSpeed's cached groups, so a
    second local run in the same process starts clean.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    # An in-process store: no port to pick, so concurrent local runs on one machine cannot collide. The rank
    # variables DeepSpeed reads are set for the run only: left behind, they would make a later process started
    # from this one (or Hugging Face's Trainer in it) believe it is a rank of a distributed job.
    saved = {key: os.environ.get(key) for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
    try:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        yield
    finally:
        import deepspeed.comm

        if deepspeed.comm.is_initialized():
            deepspeed.comm.destroy_process_group()
        elif dist.is_initialized():  # the run failed before DeepSpeed started
            dist.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _comm_device() -> torch.device:
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce(values: list[float]) -> list[float]:
    """The sum of ``values`` over all ranks (the values themselves outside a process group)."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        t = t.to(_comm_device())
        dist.all_reduce(t)
    return t.cpu().tolist()


def keep_freed_memory() -> bool:
    """Have glibc keep freed memory in the process instead of handing it back to the OS.

    A CPU training step allocates and frees the same activation buffers every step. glibc's defaults serve
    large blocks with fresh ``mmap`` pages and trim the heap after each free, so every step page-faults its
    activations back in (zeroed by the kernel). Here blocks up to 32 MiB come from the heap and the heap is never
    trimmed, so the process stays at its peak size (what it peaks at anyway). Skipped where the user chose an
    allocator (``LD_PRELOAD``, ``MALLOC_*``/``GLIBC_TUNABLES`` variables) or the C library is not glibc. Returns
    whether the settings were applied.
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


def quiet_report_log() -> None:
    """Silence Ray Train's per-report INFO line (it dumps every metrics dict next to the progress line).

    Its logger is named after the module's file path, so ``LoggingConfig(log_level=...)`` does not reach it.
    """
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # a Ray without Train V2 internals at that path: keep its default logging
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
