"""Read, validate, clean, split and tokenise training data.

Files come from ``ray_ft.sources`` (JSON Lines, JSON, Parquet, CSV, Arrow; local, globs, ``save_to_disk``
directories, remote URIs). Supported record shapes (``data.format: auto`` picks by the first valid record):

- ``qa``: ``{"question": str, "answer": str}`` (the seed tutorial's shape)
- ``io``: ``{"input": str, "output": str, "context": str?}``
- ``chat``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``: an optional system
  message, then user and assistant turns alternating, ending with an assistant turn
- ``sharegpt``: ``{"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}`` (``user`` and
  ``assistant`` too; same rules)
- ``alpaca``: ``{"instruction": str, "input": str?, "output": str}``
- ``classification``: ``{"text": str, "label": str|int}`` (linear probe)

Everything is validated before anything trains; every problem is reported as ``file:line: field: message``
(``file: row N: field: message`` for formats other than JSON Lines). How conversations are rendered and
which tokens carry the loss: ``ray_ft.chat``.

Splits (:func:`split`, :class:`SplitPlan`) depend only on each record's content and ``data.seed``: two 64-bit
hashes of the cleaned record decide which records a ``data.limit`` sample keeps (the ``limit`` smallest first
hashes) and which of those are held out (the ``round(n * val_fraction)`` smallest second hashes, at least one).
The same records give the same split from any file format, in any order, in memory or streamed.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import unicodedata
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ray_ft import sources as sources_module
from ray_ft.chat import (
    SHAREGPT_ROLES,
    PromptFormat,
    check_turns,
    encode_conversation,
    to_messages,
)
from ray_ft.sources import (
    Source,
    SourceError,
    iter_table_rows,
    open_binary,
    resolve_sources,
    split_source,
)
from ray_ft.text import find_invalid_text, parse_json

MAX_REPORTED_ERRORS = 50
MAX_LINE_BYTES = 16 << 20
"""Longest JSONL line read (16 MiB); a longer one is reported without being held in memory."""
FORMATS = {
    "qa": {"question": True, "answer": True},
    "io": {"input": True, "output": True, "context": False},
    "chat": {"messages": True},
    "sharegpt": {"conversations": True},
    "alpaca": {"instruction": True, "input": False, "output": True},
    "classification": {"text": True, "label": True},
}
GENERATION_FORMATS = ("qa", "io", "chat", "sharegpt", "alpaca")
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """Invalid data; ``messages`` holds one ``file:line: field: problem`` string per problem."""

    def __init__(self, messages: list[str], more: int = 0):
        self.messages = messages
        shown = messages[:MAX_REPORTED_ERRORS]
        more += max(0, len(messages) - MAX_REPORTED_ERRORS)
        if more:
            shown.append(f"... and {more} more problems")
        super().__init__("\n".join(shown))


@dataclass
class Dataset:
    """Validated, cleaned records and what cleaning did to them."""

    path: str
    format: str
    records: list[dict[str, Any]]
    stats: dict[str, int] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)
    """Sorted label names (classification only)."""


_UNCLEAN = re.compile(r"[^\S\n ]|  | \n|\n |^\s|\s$")
"""Whitespace :func:`clean_text` would change (text without any, already NFC, is returned as it is)."""


def clean_text(text: str) -> str:
    """NFC-normalise and collapse runs of spaces/tabs; strip each line and the whole text."""
    if unicodedata.is_normalized("NFC", text) and not _UNCLEAN.search(text):
        return text
    text = unicodedata.normalize("NFC", text)
    lines = [re.sub(r"[^\S\n]+", " ", line).strip() for line in text.replace("\r\n", "\n").split("\n")]
    return "\n".join(lines).strip()


def _detect_format(obj: dict[str, Any]) -> str | None:
    """The format sharing most required fields with ``obj`` (so a missing field is reported as such); ties go to
    the one sharing more optional fields (``{instruction, input, output}`` is ``alpaca``, ``{input, output}`` ``io``).
    """
    overlap = {
        name: (sum(k in obj for k, req in fields.items() if req), sum(k in obj for k, req in fields.items() if not req))
        for name, fields in FORMATS.items()
    }
    best = max(overlap, key=overlap.get)
    return best if overlap[best][0] else None


def _check_fields(obj: dict[str, Any], fmt: str, where: str) -> list[str]:
    errors = []
    fields = FORMATS[fmt]
    for key, required in fields.items():
        if key not in obj:
            if required:
                errors.append(f"{where}: {key}: missing")
            continue
        value = obj[key]
        if fmt == "chat":
            errors += _check_messages(value, where)
        elif fmt == "sharegpt":
            errors += _check_conversations(value, where)
        elif key == "label":
            if isinstance(value, bool) or not isinstance(value, str | int):
                errors.append(f"{where}: label: expected a string or integer, got {type(value).__name__}")
            elif isinstance(value, str) and not value.strip():
                errors.append(f"{where}: label: empty")
        elif not isinstance(value, str):
            errors.append(f"{where}: {key}: expected a string, got {type(value).__name__}")
        elif required and not value.strip():
            errors.append(f"{where}: {key}: empty")
    extra = sorted(set(obj) - set(fields))
    if extra:
        errors.append(f"{where}: {extra[0]}: unexpected field for the {fmt!r} format (fields: {sorted(fields)})")
    return errors


def _check_messages(messages: Any, where: str) -> list[str]:
    if not isinstance(messages, list) or not messages:
        return [f"{where}: messages: expected a non-empty list"]
    errors = []
    for i, m in enumerate(messages):
        loc = f"{where}: messages[{i}]"
        if not isinstance(m, dict):
            errors.append(f"{loc}: expected an object with role and content")
            continue
        if m.get("role") not in ROLES:
            errors.append(f"{loc}.role: expected one of {list(ROLES)}, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            errors.append(f"{loc}.content: expected a non-empty string")
        extra = sorted(set(m) - {"role", "content"})
        if extra:
            errors.append(f"{loc}.{extra[0]}: unexpected field (fields: content, role)")
    problem = None if errors else check_turns([m["role"] for m in messages])
    if problem:
        errors.append(f"{where}: messages{problem}")
    return errors


def _check_conversations(turns: Any, where: str) -> list[str]:
    """ShareGPT ``conversations``: ``from`` is ``system``, ``human`` (or ``user``) or ``gpt`` (or ``assistant``);
    ``value`` a non-empty string."""
    if not isinstance(turns, list) or not turns:
        return [f"{where}: conversations: expected a non-empty list"]
    errors = []
    for i, m in enumerate(turns):
        loc = f"{where}: conversations[{i}]"
        if not isinstance(m, dict):
            errors.append(f"{loc}: expected an object with from and value")
            continue
        if m.get("from") not in SHAREGPT_ROLES:
            errors.append(f"{loc}.from: expected one of {list(SHAREGPT_ROLES)}, got {m.get('from')!r}")
        if not isinstance(m.get("value"), str) or not m["value"].strip():
            errors.append(f"{loc}.value: expected a non-empty string")
        extra = sorted(set(m) - {"from", "value"})
        if extra:
            errors.append(f"{loc}.{extra[0]}: unexpected field (fields: from, value)")
    problem = None if errors else check_turns([SHAREGPT_ROLES[m["from"]] for m in turns])
    if problem:
        errors.append(f"{where}: conversations{problem}")
    return errors


def _jsonl_rows(source: Source) -> Iterator[tuple[int, Any, str | None]]:
    """``(line number, parsed value, problem or None)`` for every non-blank line of a JSON Lines file (or of the
    lines starting in its piece ``[source.start, source.end)``)."""
    with open_binary(source) as (f, first):
        pos = f.tell() if source.end is not None else 0
        for lineno, line in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), start=first):
            if source.end is not None:
                if pos >= source.end:
                    break
                pos += len(line)
            if len(line) > MAX_LINE_BYTES:
                while line and not line.endswith(b"\n"):  # skip the rest of the line without holding it
                    line = f.readline(1 << 20)
                    pos += len(line)
                yield lineno, None, f"line longer than {MAX_LINE_BYTES} bytes"
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, None, f"not valid UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1})"
                continue
            if lineno == 1:
                text = text.removeprefix("\ufeff")  # a byte-order mark some editors write
            if not text.strip():
                continue
            obj, problem = parse_json(text)
            yield lineno, obj, problem


def iter_rows(source: Source) -> Iterator[tuple[int, Any, str | None]]:
    """``(line or row number, value, problem or None)`` for every row of one file, read in bounded batches.

    Raises:
        SourceError: the file cannot be read at all.
    """
    if source.file_format == "jsonl":
        yield from _jsonl_rows(source)
        return
    for batch in iter_table_rows(source):
        for n, obj, problem in batch:
            if problem is None:
                bad = find_invalid_text(obj)
                if bad:
                    obj, problem = None, bad
            yield n, obj, problem


class RowChecker:
    """Validates rows one at a time, keeping the first :data:`MAX_REPORTED_ERRORS` problems and a count of the rest.

    With ``auto`` the record format is the one of the first valid row.
    """

    def __init__(self, fmt: str = "auto"):
        self.format = fmt
        self.errors: list[str] = []
        self.more = 0

    def add(self, messages: list[str]) -> None:
        room = max(0, MAX_REPORTED_ERRORS - len(self.errors))
        self.errors += messages[:room]
        self.more += max(0, len(messages) - room)

    def check(self, obj: Any, problem: str | None, where: str) -> bool:
        if problem:
            self.add([f"{where}: {problem}"])
            return False
        if not isinstance(obj, dict):
            self.add([f"{where}: expected a JSON object, got {type(obj).__name__}"])
            return False
        if self.format == "auto":
            detected = _detect_format(obj)
            if detected is None:
                self.add(
                    [
                        f"{where}: cannot tell the format from fields {sorted(obj)}; expected one of "
                        + "; ".join(f"{n}: {sorted(k for k, r in fs.items() if r)}" for n, fs in FORMATS.items())
                    ]
                )
                return False
            self.format = detected
        errors = _check_fields(obj, self.format, where)
        self.add(errors)
        return not errors

    def records(self, source: Source) -> Iterator[tuple[int, dict[str, Any], dict[str, Any]]]:
        """``(line or row number, record as read, cleaned record)`` for every valid row of ``source``; problems
        (a file that cannot be read included) are kept here."""
        try:
            for n, obj, problem in iter_rows(source):
                if self.check(obj, problem, source.where(n)):
                    yield n, obj, _clean_record(obj, self.format)
        except SourceError as e:
            self.add([str(e)])

    def raise_errors(self) -> None:
        if self.errors:
            raise DataError(self.errors, self.more)


def find_sources(path: str | Path, file_format: str = "auto") -> list[Source]:
    """The data files ``path`` names (see ``ray_ft.sources``).

    Raises:
        DataError: nothing there, or a storage error, in one line naming the path.
    """
    try:
        return resolve_sources(str(path), file_format)
    except SourceError as e:
        raise DataError([str(e)]) from None


def _merge_formats(found: list[tuple[str, str]]) -> str:
    """The one record format of all files, ``found`` being ``(file, format)`` pairs."""
    first_uri, first = found[0]
    for uri, fmt in found[1:]:
        if fmt != first:
            raise DataError([f"{uri}: {fmt!r} records, but {first_uri} holds {first!r} records; use one format"])
    return first


def read_data(path: str | Path, fmt: str = "auto", dedupe: bool = True, file_format: str = "auto") -> Dataset:
    """Validate every file ``path`` names, then clean and de-duplicate the records, all in memory.

    Records carry ``_line`` (their line, or row number) and, when several files are read, ``_source``.

    Raises:
        DataError: listing every invalid row (``file:line: field: problem``), or naming the path that cannot be read.
    """
    sources = find_sources(path, file_format)
    raw: list[tuple[Source, int, dict[str, Any], dict[str, Any]]] = []
    found: list[tuple[str, str]] = []
    problems = RowChecker(fmt)
    for source in sources:
        checker = RowChecker(fmt)
        raw += [(source, n, obj, rec) for n, obj, rec in checker.records(source)]
        problems.add(checker.errors)
        problems.more += checker.more
        if checker.format != "auto":
            found.append((source.uri, checker.format))
    if not raw and not problems.errors:
        problems.add([f"{path}: no examples (the file is empty)"])
    problems.raise_errors()
    fmt = _merge_formats(found)

    records, seen, changed, dupes = [], set(), 0, 0
    for source, n, obj, rec in raw:
        if rec != obj:
            changed += 1
        key = record_key(rec)
        if dedupe and key in seen:
            dupes += 1
            continue
        seen.add(key)
        rec["_line"] = n
        if len(sources) > 1:
            rec["_source"] = source.uri
        records.append(rec)
    labels = sorted({str(r["label"]) for r in records}) if fmt == "classification" else []
    if fmt == "classification" and len(labels) < 2:
        raise DataError([f"{path}: label: need at least 2 distinct labels, found {labels}"])
    stats = {"lines": len(raw), "normalized": changed, "duplicates_dropped": dupes, "examples": len(records)}
    return Dataset(path=str(path), format=fmt, records=records, stats=stats, labels=labels)


read_jsonl = read_data
"""The former name of :func:`read_data` (it reads every supported source, not only JSON Lines)."""


def _clean_record(obj: dict[str, Any], fmt: str) -> dict[str, Any]:
    if fmt == "chat":
        return {"messages": [{"role": m["role"], "content": clean_text(m["content"])} for m in obj["messages"]]}
    if fmt == "sharegpt":
        return {"conversations": [{"from": m["from"], "value": clean_text(m["value"])} for m in obj["conversations"]]}
    return {k: clean_text(v) if isinstance(v, str) else v for k, v in obj.items()}


# --------------------------------------------------------------------------- splits


def record_key(rec: dict[str, Any]) -> str:
    """A cleaned record's content as canonical JSON (``_``-prefixed bookkeeping fields left out)."""
    return json.dumps({k: v for k, v in rec.items() if not k.startswith("_")}, sort_keys=True, ensure_ascii=False)


def split_hashes(key: str, seed: int) -> tuple[int, int]:
    """Two independent 64-bit hashes of a record key under ``seed``: ``(sample hash, hold-out hash)``."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=16, key=str(seed).encode()).digest()
    return int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")


@dataclass(frozen=True)
class SplitPlan:
    """Which records train and which are held out, as thresholds on the two split hashes.

    Attributes:
        keep_max: Records whose sample hash is above this are not used (``data.limit``); ``None`` keeps all.
        val_max: Kept records whose hold-out hash is at most this are validation; ``None`` holds out none.
        n_train: Training records.
        n_val: Validation records.
    """

    keep_max: int | None
    val_max: int | None
    n_train: int
    n_val: int

    def side(self, sample_hash: int, holdout_hash: int) -> str | None:
        """``"train"``, ``"val"``, or ``None`` for a record left out of the sample."""
        if self.keep_max is not None and sample_hash > self.keep_max:
            return None
        return "val" if self.val_max is not None and holdout_hash <= self.val_max else "train"

    @classmethod
    def from_hashes(
        cls, sample: np.ndarray, holdout: np.ndarray, val_fraction: float, limit: int | None = None
    ) -> SplitPlan:
        """The plan for records with these hashes (unsigned 64-bit arrays, one entry per record)."""
        keep_max = None
        if limit is not None and limit < len(sample):
            keep_max = int(np.partition(sample, limit - 1)[limit - 1])
            holdout = holdout[sample <= keep_max]
        n = len(holdout)
        n_val = round(n * val_fraction)
        if val_fraction > 0 and n >= 2:
            n_val = min(max(1, n_val), n - 1)
        val_max = int(np.partition(holdout, n_val - 1)[n_val - 1]) if n_val else None
        n_val = int((holdout <= val_max).sum()) if val_max is not None else 0
        return cls(keep_max=keep_max, val_max=val_max, n_train=n - n_val, n_val=n_val)


def split(records: list[dict[str, Any]], val_fraction: float, seed: int, limit: int | None = None) -> tuple[list, list]:
    """Keep a seeded sample of ``limit`` records (all when ``None``) and hold out ``val_fraction`` of those (at
    least one record when > 0), both decided by each record's content hashes (see :class:`SplitPlan`).

    Training records come in sample-hash order, validation ones in hold-out-hash order (both seeded shuffles).
    """
    hashes = [split_hashes(record_key(r), seed) for r in records]
    sample = np.array([h[0] for h in hashes], dtype=np.uint64)
    holdout = np.array([h[1] for h in hashes], dtype=np.uint64)
    plan = SplitPlan.from_hashes(sample, holdout, val_fraction, limit)
    sides: dict[str, list[tuple[int, dict[str, Any]]]] = {"train": [], "val": []}
    for rec, (s, h) in zip(records, hashes, strict=True):
        side = plan.side(s, h)
        if side:
            sides[side].append((s if side == "train" else h, rec))
    return [r for _, r in sorted(sides["train"], key=lambda x: x[0])], [
        r for _, r in sorted(sides["val"], key=lambda x: x[0])
    ]


# --------------------------------------------------------------------------- bounded-memory checks


@dataclass
class SourceScan:
    """What one pass over one file found, without its records: hashes and counts (a scan task's result).

    Attributes:
        index: The file's position in the source list.
        format: Record format found (``auto`` when no valid row was read).
        errors: The first problems; ``more`` counts the rest.
        sample_hashes: Sample hash of every valid row (unsigned 64-bit), in file order.
        holdout_hashes: Hold-out hash of every valid row.
        numbers: Line (JSON Lines) or row number of every valid row.
        normalized: Valid rows that cleaning changed.
        labels: Label counts (classification).
    """

    index: int
    format: str
    errors: list[str]
    more: int
    sample_hashes: np.ndarray
    holdout_hashes: np.ndarray
    numbers: np.ndarray
    normalized: int
    labels: dict[str, int]


def scan_source(source: Source, index: int, fmt: str, seed: int) -> SourceScan:
    """Read one file once, validating every row and keeping only its split hashes (8 bytes a row, three times)."""
    checker = RowChecker(fmt)
    sample, holdout, numbers = array("Q"), array("Q"), array("q")
    normalized = 0
    labels: dict[str, int] = {}
    for n, obj, rec in checker.records(source):
        normalized += rec != obj
        s, h = split_hashes(record_key(rec), seed)
        sample.append(s)
        holdout.append(h)
        numbers.append(n)
        if checker.format == "classification":
            labels[str(rec["label"])] = labels.get(str(rec["label"]), 0) + 1
    return SourceScan(
        index=index,
        format=checker.format,
        errors=checker.errors,
        more=checker.more,
        sample_hashes=np.frombuffer(sample, dtype=np.uint64),
        holdout_hashes=np.frombuffer(holdout, dtype=np.uint64),
        numbers=np.frombuffer(numbers, dtype=np.int64),
        normalized=normalized,
        labels=labels,
    )


@dataclass
class DataSummary:
    """A data set checked without holding it: its files, format, counts and split (see :func:`check_data`).

    Attributes:
        path: ``data.path``.
        format: Record format.
        sources: The files.
        stats: ``lines`` (valid rows), ``normalized``, ``duplicates_dropped``, ``examples``.
        labels: Label counts (classification).
        plan: The split.
        dropped: ``(file index, line or row)`` of every duplicate left out (all but the first copy).
        seed: ``data.seed`` the split hashes were taken under.
    """

    path: str
    format: str
    sources: list[Source]
    stats: dict[str, int]
    labels: dict[str, int]
    plan: SplitPlan
    dropped: frozenset[tuple[int, int]]
    seed: int = 42


def scan_here(sources: list[Source], fmt: str, seed: int) -> list[SourceScan]:
    """:func:`scan_source` over every file or piece: in a pool of processes, one per CPU, when the data is larger
    than one piece, else in this process."""
    work = [(s, i, fmt, seed) for i, s in enumerate(sources)]
    if len(sources) < 2 or sum(s.size for s in sources) <= sources_module.CHUNK_BYTES:
        return [scan_source(*w) for w in work]
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    workers = min(len(sources), os.cpu_count() or 1)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(scan_source, *zip(*work, strict=True)))


def check_data(
    path: str | Path,
    fmt: str = "auto",
    dedupe: bool = True,
    file_format: str = "auto",
    *,
    seed: int = 42,
    val_fraction: float = 0.0,
    limit: int | None = None,
    scan=None,
) -> DataSummary:
    """Validate every file ``path`` names and plan the split, holding 24 bytes per row instead of the records.

    Large local JSON Lines files are checked in pieces of ``CHUNK_BYTES`` (see ``ray_ft.sources.split_source``).

    Args:
        scan: Runs :func:`scan_source` over ``(source, index, fmt, seed)`` for every file or piece and returns the
            results in order (default: a process per CPU for data larger than one piece; the streaming path runs
            them as Ray tasks).

    Raises:
        DataError: as :func:`read_data`.
    """
    sources = [piece for s in find_sources(path, file_format) for piece in split_source(s)]
    scans = (scan or scan_here)(sources, fmt, seed)
    problems = RowChecker(fmt)
    for sc in scans:
        problems.add(sc.errors)
        problems.more += sc.more
    total = sum(len(sc.numbers) for sc in scans)
    if not total and not problems.errors:
        problems.add([f"{path}: no examples (the file is empty)"])
    problems.raise_errors()
    fmt = _merge_formats([(sources[sc.index].uri, sc.format) for sc in scans if sc.format != "auto"])
    sample = np.concatenate([sc.sample_hashes for sc in scans])
    holdout = np.concatenate([sc.holdout_hashes for sc in scans])
    keep = np.ones(total, dtype=bool)
    dropped: set[tuple[int, int]] = set()
    if dedupe:  # equal records hash equal; the first copy (by file, then line) stays
        order = np.argsort(sample, kind="stable")
        repeat = order[1:][sample[order][1:] == sample[order][:-1]]
        keep[repeat] = False
        owner = np.concatenate([np.full(len(sc.numbers), sc.index, dtype=np.int64) for sc in scans])
        numbers = np.concatenate([sc.numbers for sc in scans])
        dropped = {(int(owner[i]), int(numbers[i])) for i in repeat}
    labels: dict[str, int] = {}
    for sc in scans:
        for label, count in sc.labels.items():
            labels[label] = labels.get(label, 0) + count
    if fmt == "classification" and len(labels) < 2:
        raise DataError([f"{path}: label: need at least 2 distinct labels, found {sorted(labels)}"])
    plan = SplitPlan.from_hashes(sample[keep], holdout[keep], val_fraction, limit)
    stats = {
        "lines": total,
        "normalized": sum(sc.normalized for sc in scans),
        "duplicates_dropped": len(dropped),
        "examples": int(keep.sum()),
    }
    return DataSummary(str(path), fmt, sources, stats, labels, plan, frozenset(dropped), seed)


def summary_records(summary: DataSummary, index: int) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(side, cleaned record)`` for every record of file ``index`` the split uses (``side``: train or val)."""
    source, seed = summary.sources[index], summary.seed
    checker = RowChecker(summary.format)
    for n, _, rec in checker.records(source):
        if (index, n) in summary.dropped:
            continue
        side = summary.plan.side(*split_hashes(record_key(rec), seed))
        if side:
            yield side, rec
    if checker.errors:  # the file changed since it was checked
        raise DataError(checker.errors, checker.more)


# --------------------------------------------------------------------------- prompts


def context_of(rec: dict[str, Any]) -> list[dict[str, str]]:
    """The conversation before a generation record's last answer (what a model is prompted with)."""
    return to_messages(rec)[:-1]


def question_of(rec: dict[str, Any]) -> str:
    """The user-facing question of a generation record (its last user turn)."""
    return next(m["content"] for m in reversed(context_of(rec)) if m["role"] == "user")


def answer_of(rec: dict[str, Any]) -> str:
    """The last answer of a generation record."""
    return to_messages(rec)[-1]["content"]


def encode_generation(
    rec: dict[str, Any], tokenizer, fmt: PromptFormat, max_length: int, train_on: str = "all_assistant"
) -> dict[str, list[int]]:
    """Token ids with the loss on assistant turns (and their EOS) only: every one, or the last (``train_on``).

    See :func:`ray_ft.chat.encode_conversation`.
    """
    return encode_conversation(to_messages(rec), tokenizer, fmt, max_length, train_on)


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Shuffle, then sort within windows of 50 batches so each batch holds similar lengths."""
    rng = random.Random(seed)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    window = batch_size * 50
    batches = []
    for start in range(0, len(idx), window):
        chunk = sorted(idx[start : start + window], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches
