"""Where training data comes from: local files, globs, ``datasets.save_to_disk`` directories, remote URIs.

``data.path`` names one source or many:

- a local file, or a glob (``data/*.jsonl``, ``data/**/*.parquet``), read in sorted order;
- a directory: one written by ``datasets.save_to_disk`` (its Arrow files; a ``DatasetDict`` gives its ``train``
  split), else every data file under it;
- a URI that pyarrow's filesystems read (``s3://bucket/key``, ``gs://...``, ``hdfs://...``), globs included.
  Credentials come from the usual environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
  ``AWS_SESSION_TOKEN``, ``AWS_REGION``, ``AWS_ENDPOINT_URL`` for S3-compatible servers, or an instance role).

Each file's format is taken from ``data.file_format`` or detected (:func:`detect_format`): JSON Lines, a JSON
array, Parquet, CSV (a header row; every cell read as text) or Arrow IPC (file or stream). ``.gz``, ``.bz2``,
``.zst`` and ``.lz4`` files are decompressed on the fly. Rows are read in bounded batches, never a whole file,
except a JSON array (one document).
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

FILE_FORMATS = ("jsonl", "json", "parquet", "csv", "arrow")
EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".arrow": "arrow",
}
COMPRESSED = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".lz4": "lz4"}
JSON_FIELDS = ("messages", "conversations")
"""Fields that hold a list; a CSV cell holding JSON text for them is decoded."""
BATCH_ROWS = 1024


class SourceError(ValueError):
    """A data source that cannot be found, listed or opened; the message names it."""


@dataclass(frozen=True)
class Source:
    """One data file.

    Attributes:
        uri: The file as the user would name it (a local path or a URI).
        file_format: One of :data:`FILE_FORMATS`.
        size: Bytes on storage (compressed size for compressed files).
    """

    uri: str
    file_format: str
    size: int
    start: int = 0
    """First byte of this piece of the file (JSON Lines split by :func:`split_source`): it holds the lines that
    start in ``[start, end)``."""
    end: int | None = None

    @property
    def remote(self) -> bool:
        return "://" in self.uri and not self.uri.startswith("file://")

    def where(self, n: int) -> str:
        """How a problem's location is written: ``file:LINE`` for JSON Lines, ``file: row N`` otherwise."""
        return f"{self.uri}:{n}" if self.file_format == "jsonl" else f"{self.uri}: row {n}"


def _is_uri(path: str) -> bool:
    return "://" in path


def _filesystem(uri: str):
    """``(pyarrow filesystem, path inside it)`` for a local path or URI."""
    import pyarrow.fs as pafs

    if not _is_uri(uri):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    try:
        return pafs.FileSystem.from_uri(uri)
    except (OSError, ValueError, TypeError) as e:
        raise SourceError(f"{uri}: cannot open: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return " ".join(text.splitlines()[0].split())


def _join(base_uri: str, fs_path: str) -> str:
    """The URI of ``fs_path``, a path inside the filesystem of ``base_uri``."""
    if not _is_uri(base_uri):
        return fs_path
    scheme = base_uri.split("://", 1)[0]
    return f"{scheme}://{fs_path}"


def _compression(name: str) -> str | None:
    return next((c for ext, c in COMPRESSED.items() if name.endswith(ext)), None)


def _stem_ext(name: str) -> str:
    for ext in COMPRESSED:
        name = name.removesuffix(ext)
    return os.path.splitext(name)[1].lower()


def _info(fs, path: str, uri: str):
    import pyarrow.fs as pafs

    try:
        info = fs.get_file_info(path)
    except (OSError, ValueError) as e:
        raise SourceError(f"{uri}: cannot read: {_first_line(e)}") from None
    return info, pafs.FileType


def resolve_sources(path: str, file_format: str = "auto") -> list[Source]:
    """The data files ``path`` names, each with its format.

    Args:
        path: A file, glob, directory or URI (see the module docstring).
        file_format: ``auto`` (detect per file) or one of :data:`FILE_FORMATS` for every file.

    Raises:
        SourceError: nothing found there, a storage error (credentials, a missing bucket), or a file whose
            format cannot be told.
    """
    fs, fs_path = _filesystem(path)
    if any(c in path for c in "*?["):
        found = _glob(fs, path, fs_path)
        if not found:
            raise SourceError(f"{path}: no files match")
        files = [(uri, p, size) for uri, p, size in found]
    else:
        info, types = _info(fs, fs_path, path)
        if info.type == types.NotFound:
            bucket = fs_path.split("/", 1)[0]
            if _is_uri(path) and bucket != fs_path and _info(fs, bucket, path)[0].type == types.NotFound:
                raise SourceError(f"{path}: bucket {bucket!r} not found")
            raise SourceError(f"{path}: file not found")
        if info.type == types.Directory:
            files = _directory_files(fs, path, fs_path)
            if not files:
                raise SourceError(f"{path}: no data files in this directory ({', '.join(EXTENSIONS)})")
        else:
            files = [(path, fs_path, info.size)]
    return [Source(uri, _format_of(fs, p, uri, file_format), size or 0) for uri, p, size in files]


def _glob(fs, pattern: str, fs_pattern: str) -> list[tuple[str, str, int]]:
    if not _is_uri(pattern):
        paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
        return [(p, os.path.abspath(p), os.path.getsize(p)) for p in paths]
    import pyarrow.fs as pafs

    cut = min(i for i, c in enumerate(fs_pattern) if c in "*?[")
    base = fs_pattern[:cut].rsplit("/", 1)[0]
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    except (OSError, ValueError) as e:
        raise SourceError(f"{pattern}: cannot list: {_first_line(e)}") from None
    return sorted(
        (_join(pattern, i.path), i.path, i.size)
        for i in infos
        if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, fs_pattern)
    )


def _read_json(fs, path: str) -> Any:
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode("utf-8"))


def _directory_files(fs, uri: str, fs_path: str) -> list[tuple[str, str, int]]:
    """A ``save_to_disk`` directory's Arrow files, else the data files under the directory."""
    import pyarrow.fs as pafs

    root = fs_path.rstrip("/")
    names = {os.path.basename(i.path): i for i in fs.get_file_info(pafs.FileSelector(root))}
    if "dataset_dict.json" in names:
        splits = _read_json(fs, f"{root}/dataset_dict.json").get("splits", [])
        if "train" not in splits:
            raise SourceError(f"{uri}: a DatasetDict without a 'train' split (splits: {splits}); name one split")
        return _directory_files(fs, f"{uri.rstrip('/')}/train", f"{root}/train")
    if "state.json" in names and "dataset_info.json" in names:
        files = [f["filename"] for f in _read_json(fs, f"{root}/state.json").get("_data_files", [])]
        out = []
        for name in files:
            info = fs.get_file_info(f"{root}/{name}")
            out.append((f"{uri.rstrip('/')}/{name}", f"{root}/{name}", info.size))
        return out
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    found = [
        i
        for i in infos
        if i.type == pafs.FileType.File
        and _stem_ext(i.base_name) in EXTENSIONS
        and not any(part.startswith((".", "_")) for part in i.path[len(root) :].split("/") if part)
    ]
    base = uri.rstrip("/")
    return sorted((f"{base}{i.path[len(root) :]}", i.path, i.size) for i in found)


def detect_format(head: bytes, name: str) -> str | None:
    """A file's format from its name, else its first bytes (``None`` when neither tells)."""
    ext = _stem_ext(name)
    if ext == ".json" or ext not in EXTENSIONS:
        start = head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
        if start == b"[":
            return "json"
        if start == b"{":
            return "jsonl"
        if ext not in EXTENSIONS:
            if head.startswith(b"PAR1"):
                return "parquet"
            if head.startswith(b"ARROW1") or head.startswith(b"\xff\xff\xff\xff"):
                return "arrow"
            return None
    return EXTENSIONS[ext]


def _format_of(fs, fs_path: str, uri: str, file_format: str) -> str:
    if file_format != "auto":
        return file_format
    ext = _stem_ext(uri)
    if ext in EXTENSIONS and ext != ".json":
        return EXTENSIONS[ext]
    try:
        with fs.open_input_stream(fs_path, compression=_compression(uri)) as f:
            head = f.read(64)
    except (OSError, ValueError) as e:
        raise SourceError(f"{uri}: cannot read: {_first_line(e)}") from None
    found = detect_format(head, uri)
    if found is None:
        raise SourceError(f"{uri}: cannot tell the file format; set data.file_format to one of {list(FILE_FORMATS)}")
    return found


CHUNK_BYTES = 8 << 20
"""Size of the pieces a large local JSON Lines file is checked and read in, in parallel."""


def split_source(source: Source, chunk_bytes: int | None = None) -> list[Source]:
    """A large, local, uncompressed JSON Lines file as pieces of about ``chunk_bytes`` (default
    :data:`CHUNK_BYTES`; other files: themselves)."""
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    if source.file_format != "jsonl" or source.remote or _compression(source.uri) or source.size <= chunk_bytes:
        return [source]
    starts = range(0, source.size, chunk_bytes)
    return [Source(source.uri, "jsonl", source.size, s, min(s + chunk_bytes, source.size)) for s in starts]


def _count_lines(f, upto: int) -> int:
    f.seek(0)
    count, left = 0, upto
    while left > 0:
        block = f.read(min(left, 8 << 20))
        if not block:
            break
        count += block.count(b"\n")
        left -= len(block)
    return count


@contextlib.contextmanager
def open_binary(source: Source) -> Iterator[tuple[io.BufferedReader, int]]:
    """``(stream, number of its first line)``: the file's bytes, decompressed, for reading JSON Lines line by line,
    positioned at the first line that starts in the piece (``source.start``)."""
    if not source.remote and _compression(source.uri) is None:
        with open(_filesystem(source.uri)[1], "rb") as f:
            first = 1
            if source.start:
                f.seek(source.start - 1)
                if f.read(1) != b"\n":
                    f.readline()  # the line under way at ``start`` belongs to the piece before
                pos = f.tell()
                first = _count_lines(f, pos) + 1
                f.seek(pos)
            yield f, first
        return
    fs, path = _filesystem(source.uri)
    try:
        stream = fs.open_input_stream(path, compression=_compression(source.uri))
    except (OSError, ValueError) as e:
        raise SourceError(f"{source.uri}: cannot read: {_first_line(e)}") from None
    with io.BufferedReader(stream, buffer_size=1 << 20) as f:
        yield f, 1


def _row(obj: dict[str, Any], csv: bool) -> tuple[dict[str, Any] | None, str | None]:
    """A table row as ``(record, None)``, or ``(None, "field: problem")``.

    Missing values (nulls) are dropped. CSV cells are read as bytes (Arrow's own conversion names neither row nor
    column of text that is not valid UTF-8) and decoded here; JSON text in their list fields is decoded. Values
    still in Arrow form (a batch Arrow could not convert: a string column holding invalid UTF-8 that another
    writer put there, which Arrow does not check) are converted here, one by one.
    """
    import pyarrow as pa

    out = {}
    for k, v in obj.items():
        try:
            if isinstance(v, pa.Scalar):
                v = v.as_py()
            if csv and isinstance(v, bytes):
                v = v.decode("utf-8")
        except UnicodeDecodeError as e:
            return None, f"{k}: not valid UTF-8 (byte 0x{e.object[e.start]:02x} at byte {e.start + 1})"
        if v is None or k.startswith("__index_level_"):
            continue
        if csv and k in JSON_FIELDS and isinstance(v, str):
            with contextlib.suppress(ValueError):
                v = json.loads(v)
        out[k] = v
    return out, None


def iter_table_rows(source: Source, batch_rows: int = BATCH_ROWS) -> Iterator[list[tuple[int, Any, str | None]]]:
    """Batches of ``(row number from 1, value, problem or None)`` of a non-JSONL file.

    Raises:
        SourceError: the file cannot be opened or is not of its format at all.
    """
    import pyarrow as pa

    fs, path = _filesystem(source.uri)
    try:
        if source.file_format == "json":
            yield from _json_rows(source, fs, path, batch_rows)
            return
        csv = source.file_format == "csv"
        for start, batch in _arrow_batches(source, fs, path, batch_rows):
            try:
                rows = batch.to_pylist()
            except UnicodeDecodeError:  # invalid UTF-8 in a string column: _row finds its row and field
                rows = [dict(zip(batch.schema.names, row, strict=True)) for row in zip(*batch.columns, strict=True)]
            yield [(start + i + 1, *_row(r, csv)) for i, r in enumerate(rows)]
    except (OSError, pa.ArrowException) as e:
        raise SourceError(f"{source.uri}: cannot read as {source.file_format}: {_first_line(e)}") from None


def _json_rows(source: Source, fs, path: str, batch_rows: int):
    with fs.open_input_stream(path, compression=_compression(source.uri)) as f:
        raw = f.read()
    try:
        doc = json.loads(raw.decode("utf-8").removeprefix("\ufeff"))
    except UnicodeDecodeError as e:
        yield [(1, None, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})")]
        return
    except json.JSONDecodeError as e:
        yield [(1, None, f"invalid JSON: {e.msg} (line {e.lineno} column {e.colno})")]
        return
    if not isinstance(doc, list):
        yield [(1, None, f"expected a JSON array of objects, got {type(doc).__name__}")]
        return
    for start in range(0, len(doc), batch_rows):
        yield [(start + i + 1, v, None) for i, v in enumerate(doc[start : start + batch_rows])]


def _arrow_batches(source: Source, fs, path: str, batch_rows: int):
    import pyarrow as pa

    start = 0
    if source.file_format == "parquet":
        import pyarrow.parquet as pq

        with fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows):
                yield start, batch
                start += batch.num_rows
        return
    if source.file_format == "csv":
        import pyarrow.csv as pacsv

        def reader(types=None):
            stream = fs.open_input_stream(path, compression=_compression(source.uri))
            convert = pacsv.ConvertOptions(column_types=types or {}, strings_can_be_null=False)
            return pacsv.open_csv(stream, convert_options=convert)

        with reader() as probe:
            names = probe.schema.names
        with reader({n: pa.binary() for n in names}) as r:  # decoded per value: see _row
            for batch in r:
                yield start, batch
                start += batch.num_rows
        return
    import pyarrow.ipc as ipc

    with fs.open_input_file(path) as f:
        try:
            file_reader = ipc.open_file(f)
            batches = (file_reader.get_batch(i) for i in range(file_reader.num_record_batches))
        except pa.ArrowInvalid:
            f.seek(0)
            batches = iter(ipc.open_stream(f))
        for batch in batches:
            for offset in range(0, batch.num_rows, batch_rows):
                piece = batch.slice(offset, batch_rows)
                yield start, piece
                start += piece.num_rows
