"""Servable artifacts, written atomically and verified on load.

Every artifact directory (``merged/``, ``export/``, ``adapter/``) is built in a temporary
sibling, described by ``ray_ft.json`` (method, base model, prompt format, labels), listed with
checksums in ``MANIFEST.json``, verified, and only then renamed into place. Readers call
:func:`verify_manifest`, so a half-written directory is never mistaken for a model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MANIFEST = "MANIFEST.json"
METADATA = "ray_ft.json"


class ArtifactError(ValueError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path) -> None:
    files = {
        str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    (directory / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def verify_manifest(directory: str | Path, checksums: bool = True) -> dict[str, Any]:
    """Check that every file listed in the manifest is present and intact; return the metadata."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if not manifest.is_file():
        raise ArtifactError(f"{directory}: no {MANIFEST} (not a ray-ft artifact, or it was not written completely)")
    files = json.loads(manifest.read_text())["files"]
    for rel, info in files.items():
        p = directory / rel
        if not p.is_file():
            raise ArtifactError(f"{directory}: {rel} is missing")
        if p.stat().st_size != info["size"] or (checksums and _sha256(p) != info["sha256"]):
            raise ArtifactError(f"{directory}: {rel} does not match its checksum in {MANIFEST}")
    meta = directory / METADATA
    return json.loads(meta.read_text()) if meta.is_file() else {}


def write_artifact(out_dir: str | Path, write: Callable[[Path], None], metadata: dict[str, Any]) -> Path:
    """Build an artifact with ``write(tmp_dir)``, add metadata + manifest, verify, rename into place.

    An existing ``out_dir`` is replaced only after the new one is complete and verified.
    """
    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        write(tmp)
        (tmp / METADATA).write_text(
            json.dumps({**metadata, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1, ensure_ascii=False)
        )
        write_manifest(tmp)
        verify_manifest(tmp)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{int(time.time())}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def read_metadata(model_dir: str | Path) -> dict[str, Any]:
    """Metadata of a ray-ft artifact (verified), or ``{}`` for a plain HF model directory."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ArtifactError(f"{model_dir}: not a directory")
    if (model_dir / METADATA).is_file() or (model_dir / MANIFEST).is_file():
        return verify_manifest(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ArtifactError(f"{model_dir}: neither a ray-ft artifact nor a Hugging Face model directory")
    return {}
