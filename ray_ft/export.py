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


def write_manifest(directory: Path, name: str = MANIFEST) -> None:
    """List every file under ``directory`` (except ``*MANIFEST*.json`` files) with size and SHA-256 in ``name``."""
    files = {
        str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and not (p.parent == directory and p.name.startswith("MANIFEST") and p.suffix == ".json")
    }
    (directory / name).write_text(json.dumps({"files": files}, indent=1))


def verify_manifest(directory: str | Path, checksums: bool = True, name: str = MANIFEST) -> dict[str, Any]:
    """Check that every file listed in the manifest ``name`` is present and intact; return the metadata."""
    directory = Path(directory)
    manifest = directory / name
    if not manifest.is_file():
        raise ArtifactError(f"{directory}: no {name} (not written by ray-ft, or not written completely)")
    try:
        files = json.loads(manifest.read_text())["files"]
        entries = [(str(rel), int(info["size"]), str(info["sha256"])) for rel, info in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ArtifactError(f"{directory}: {name} is not a ray-ft manifest") from None
    for rel, size, sha256 in entries:
        p = directory / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts or p.is_symlink():
            raise ArtifactError(f"{directory}: {name} lists {rel!r}, a path outside the directory")
        if not p.is_file():
            raise ArtifactError(f"{directory}: {rel} is missing")
        if p.stat().st_size != size or (checksums and _sha256(p) != sha256):
            raise ArtifactError(f"{directory}: {rel} does not match its checksum in {name}")
    meta = directory / METADATA
    return json.loads(meta.read_text()) if meta.is_file() else {}


def check_replaceable(out_dir: Path) -> None:
    """Refuse unless ``out_dir`` is absent or an artifact ray-ft wrote and nobody added to since.

    Proof is its ``MANIFEST.json`` listing ``ray_ft.json``, every listed file present at its recorded size, and no
    file the manifest does not list. A symlink is refused (replacing it would not replace what it points to, and
    following it would write outside ``output_dir``), as is a file.

    Raises:
        ArtifactError: naming ``out_dir`` and what is in the way.
    """
    if out_dir.is_symlink():
        raise ArtifactError(
            f"{out_dir}: is a symlink; refusing to replace it (move it away or choose another output_dir)"
        )
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ArtifactError(f"{out_dir}: exists and is not a directory; refusing to replace it")
    try:
        listed = set(json.loads((out_dir / MANIFEST).read_text())["files"])
        verify_manifest(out_dir, checksums=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        reason = e if isinstance(e, ArtifactError) else f"no readable {MANIFEST}"
        raise ArtifactError(
            f"{out_dir}: exists and is not an artifact ray-ft wrote ({reason}); refusing to replace it"
        ) from None
    unlisted = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if not p.is_dir())
    unlisted = [p for p in unlisted if p not in listed and p != MANIFEST]
    if METADATA not in listed or unlisted:
        what = f"holds {unlisted[0]}, which ray-ft did not write" if unlisted else f"its manifest lacks {METADATA}"
        raise ArtifactError(f"{out_dir}: {what}; refusing to replace it")


def write_artifact(out_dir: str | Path, write: Callable[[Path], None], metadata: dict[str, Any]) -> Path:
    """Build an artifact with ``write(tmp_dir)``, add metadata + manifest, verify, rename into place.

    An existing ``out_dir`` is replaced only when it is an artifact ray-ft wrote (see :func:`check_replaceable`,
    checked before anything is written) and only after the new one is complete and verified.

    Raises:
        ArtifactError: ``out_dir`` holds something else.
    """
    out_dir = Path(out_dir).absolute()
    out_dir = out_dir.parent.resolve() / out_dir.name  # the last part is replaced, never followed
    check_replaceable(out_dir)
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
            check_replaceable(out_dir)  # again: the write may have taken hours
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
