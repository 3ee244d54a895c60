"""Where ray-ft may write, and how it replaces what it wrote before.

A run writes ``config.yaml``, ``run.json``, checkpoints and artifact directories into ``output_dir`` and replaces
them when the run is repeated or resumed. A mistyped ``output_dir`` (``/``, the home directory, a project
directory, ``/dev/null``, an existing file) must not turn into files written over, or directories replaced in,
places ray-ft never wrote. The policy here is the only place that decides:

- refused outright: the filesystem root and system directories (``/etc``, ``/usr``, ``/dev``, ``/proc``...), the
  home directory and every directory above it, anything inside the installed ``ray_ft`` package or the Python
  installation, and a path that is not a directory (a file, a device);
- an empty or new directory is used;
- a non-empty directory is used only when it holds an earlier ray-ft run (the marker :data:`MARKER`, or the
  ``run.json`` / ``search.json`` / ``config.yaml`` an earlier run wrote) or when the caller resumes a run.

Files inside ``output_dir`` are replaced atomically (a temporary sibling renamed over them), so a symlink planted
at their name is replaced, never written through.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

MARKER = ".ray-ft-output"
"""Written into every output directory ray-ft creates or adopts; proves a later run may write there again."""
RUN_FILES = ("run.json", "search.json")
"""Files an earlier run or search wrote: a JSON object with the MLflow ``run_id``."""
CONFIG_KEYS = {"output_dir", "model", "data", "method", "train"}
"""Top-level keys of the ``config.yaml`` a run writes (runs from before :data:`MARKER` existed)."""

SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/run", "/sbin")
SYSTEM_TREES += ("/snap", "/sys", "/usr")
"""Nothing inside these is an output directory."""
SYSTEM_DIRS = ("/", "/home", "/root", "/tmp", "/var", "/var/tmp", "/mnt", "/media", "/opt", "/srv")
"""These themselves are not output directories (a directory inside them can be)."""


class OutputPathError(ValueError):
    """An output path ray-ft refuses to write to; the message names the path and the reason."""


def _within(path: Path, tree: Path) -> bool:
    return path == tree or tree in path.parents


def _package_dir() -> Path:
    return Path(__file__).resolve().parent


def refusal(path: Path) -> str | None:
    """Why ``path`` (resolved) can never be an output directory, or ``None``."""
    try:
        home = Path.home().resolve()
    except (RuntimeError, KeyError):  # no HOME and no passwd entry
        home = Path("/")
    if path == home:
        return "the home directory"
    if str(path) in SYSTEM_DIRS:
        return "a system directory"
    for tree in SYSTEM_TREES:
        if _within(path, Path(tree)):
            return f"inside the system directory {tree}"
    if _within(home, path):
        return "a directory that holds the home directory"
    for name, tree in (("the ray_ft package", _package_dir()), ("the Python installation", Path(sys.prefix))):
        tree = tree.resolve()
        if _within(path, tree) or _within(tree, path):
            return f"inside {name} ({tree})" if _within(path, tree) else f"a directory that holds {name} ({tree})"
    return None


def is_earlier_run(directory: Path) -> bool:
    """Whether ``directory`` holds what an earlier ray-ft run wrote there."""
    if (directory / MARKER).is_file():
        return True
    for name in RUN_FILES:
        try:
            info = json.loads((directory / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(info, dict) and "run_id" in info:
            return True
    config = directory / "config.yaml"
    try:
        if config.is_file() and config.stat().st_size < 1 << 20:
            doc = yaml.safe_load(config.read_text(encoding="utf-8"))
            return isinstance(doc, dict) and CONFIG_KEYS.issubset(doc)
    except (OSError, ValueError, yaml.YAMLError, RecursionError):
        pass
    return False


def check_output_dir(output_dir: str | os.PathLike, resume: bool = False) -> Path:
    """Apply the output-path policy (module docstring) to ``output_dir``; return it resolved.

    Args:
        output_dir: The run's ``output_dir``.
        resume: The caller continues a run there (a non-empty directory is then accepted as that run's).

    Raises:
        OutputPathError: naming the path and why it is refused.
    """
    given = str(output_dir)
    if not given.strip():
        raise OutputPathError("output_dir: empty path")
    path = Path(output_dir).expanduser().resolve()
    shown = given if Path(given) == path else f"{given} (= {path})"
    why = refusal(path)
    if why:
        raise OutputPathError(f"output_dir {shown}: refusing to write into {why}; choose a directory of its own")
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        what = "a file" if existing.is_file() else "not a directory"
        where = "" if existing == path else f" ({existing} is {what})"
        raise OutputPathError(f"output_dir {shown}: {what if existing == path else 'cannot be created'}{where}")
    if existing == path and any(path.iterdir()) and not resume and not is_earlier_run(path):
        raise OutputPathError(
            f"output_dir {shown}: not empty and not written by ray-ft; choose a new or empty directory "
            "(or pass --resume to continue a run there)"
        )
    return path


def prepare_output_dir(output_dir: str | os.PathLike, resume: bool = False) -> Path:
    """:func:`check_output_dir`, then create the directory and mark it as ray-ft's; return it resolved."""
    path = check_output_dir(output_dir, resume)
    path.mkdir(parents=True, exist_ok=True)
    if not (path / MARKER).is_file():
        write_file(path / MARKER, "ray-ft output directory\n")
    return path


@contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds it is renamed over ``path``.

    The rename replaces whatever entry has that name (a symlink is replaced, not followed); a failed block leaves
    ``path`` untouched.

    Raises:
        OutputPathError: ``path`` is a directory.
    """
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        raise OutputPathError(f"{path}: is a directory; refusing to replace it with a file")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.fchmod(fd, 0o644)  # as a newly created file would be, not mkstemp's 0600
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def write_file(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` atomically, see :func:`replacing`."""
    with replacing(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
