"""Training checkpoints that resume only into what ray-ft wrote, without running code from them.

DeepSpeed stores model, optimizer and scheduler state with ``torch.save`` and loads it with
``torch.load(weights_only=False)``: a full unpickler, so a planted or swapped ``*.pt`` file in a checkpoint runs
arbitrary code the moment ``--resume`` (or Ray Train's restart after a failure) loads it. Two layers stop that:

1. Every rank that adds files to a checkpoint lists them with sizes and SHA-256 in ``MANIFEST.rank<N>.json``
   (:func:`seal_checkpoint`, the manifest format of :mod:`ray_ft.export`). Before resuming, the driver and every
   worker call :func:`verify_checkpoint`: every file must be listed and intact, and every pickle may reference only
   the classes in :func:`safe_globals` (read with ``torch.serialization.get_unsafe_globals_in_checkpoint``, which
   inspects without executing).
2. The workers load with ``torch.load(weights_only=True)`` under that allow-list (:func:`weights_only_loading`),
   so even a checkpoint whose manifest was rewritten too cannot run code: tensors, containers and the few listed
   DeepSpeed state classes are all the unpickler will build.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ray_ft.export import ArtifactError, verify_manifest, write_manifest

MANIFEST_PREFIX = "MANIFEST.rank"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl")


class CheckpointError(ArtifactError):
    """A checkpoint ray-ft will not resume from; the message names the checkpoint and the file."""


def manifest_name(rank: int) -> str:
    return f"{MANIFEST_PREFIX}{rank}.json"


def seal_checkpoint(directory: str | Path, rank: int) -> None:
    """List the files this rank wrote into ``directory`` in its manifest (call after writing them)."""
    write_manifest(Path(directory), manifest_name(rank))


def safe_globals() -> list[Any]:
    """Classes a DeepSpeed checkpoint may hold besides tensors and plain containers (ZeRO stages 0-3)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [fragment_address, LossScaler, DynamicLossScaler, ZeroStageEnum]


def _qualified(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def verify_checkpoint(directory: str | Path) -> None:
    """Refuse a checkpoint ray-ft did not write, or one changed since.

    Raises:
        CheckpointError: no manifest, a file not listed in any manifest, a file missing or changed, or a pickle
            referencing anything outside :func:`safe_globals`.
    """
    import torch

    directory = Path(directory)
    manifests = sorted(p.name for p in directory.glob(f"{MANIFEST_PREFIX}*.json"))
    if not manifests:
        raise CheckpointError(
            f"{directory}: checkpoint has no {MANIFEST_PREFIX}<N>.json; ray-ft did not write it (or an older "
            "ray-ft did): refusing to load it"
        )
    listed: set[str] = set()
    for name in manifests:
        try:
            verify_manifest(directory, checksums=True, name=name)
        except ArtifactError as e:
            raise CheckpointError(f"{e}; refusing to load this checkpoint") from None
        listed |= set(json.loads((directory / name).read_text())["files"])
    for p in sorted(directory.rglob("*")):
        rel = str(p.relative_to(directory))
        if p.is_dir() or rel in manifests or p.name.startswith("."):  # Ray's own hidden markers
            continue
        if rel not in listed:
            raise CheckpointError(
                f"{directory}: {rel} is not listed in any {MANIFEST_PREFIX}<N>.json; refusing to load"
            )
    allowed = {_qualified(g) for g in safe_globals()}
    for rel in sorted(listed):
        if not rel.endswith(PICKLE_SUFFIXES):
            continue
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(directory / rel)
        except Exception as e:  # any unreadable pickle is refused the same way
            raise CheckpointError(f"{directory}: {rel}: not a readable torch checkpoint ({e})") from None
        foreign = sorted(set(unsafe) - allowed)
        if foreign:
            raise CheckpointError(
                f"{directory}: {rel} references {foreign[0]}, which a ray-ft checkpoint never holds; refusing to load"
            )


@contextlib.contextmanager
def weights_only_loading(engine) -> Iterator[None]:
    """Make ``engine.load_checkpoint`` unpickle with ``torch.load(weights_only=True)`` and :func:`safe_globals`.

    DeepSpeed reads every checkpoint file through ``engine.checkpoint_engine.load``; inside this block that method
    is replaced on the engine's own checkpoint engine (nothing global changes).
    """
    import torch

    checkpoint_engine = engine.checkpoint_engine
    allowed = safe_globals()

    def load(path: str, map_location=None):
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    checkpoint_engine.load = load
    try:
        yield
    finally:
        del checkpoint_engine.load


def verify_checkpoints(paths: list[str]) -> None:
    """:func:`verify_checkpoint` for each directory among ``paths`` (the driver's check before resuming; Ray's
    ``checkpoint_manager_snapshot.json`` beside them is not a checkpoint)."""
    for p in paths:
        if Path(p).is_dir():
            verify_checkpoint(p)
