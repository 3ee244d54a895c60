"""Data files of every format and source: the same records read alike, bad rows named by file, row and field,
and the same split whichever file format or reading path."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from conftest import QA_ROWS, write_jsonl

from ray_ft.data import DataError, check_data, read_data, record_key, split, summary_records
from ray_ft.sources import resolve_sources

CHAT_ROWS = [
    {
        "messages": [
            {"role": "system", "content": "Trả lời ngắn gọn."},
            {"role": "user", "content": r["question"]},
            {"role": "assistant", "content": r["answer"]},
        ]
    }
    for r in QA_ROWS
]


def write_as(path: Path, rows: list[dict], file_format: str) -> Path:
    """Write ``rows`` as ``file_format`` (``arrow``: a ``datasets.save_to_disk`` directory)."""
    import pyarrow as pa

    if file_format == "jsonl":
        return write_jsonl(path, rows)
    if file_format == "jsonl.gz":
        path.write_bytes(gzip.compress("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()))
        return path
    if file_format == "json":
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
        return path
    if file_format == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=3)
        return path
    if file_format == "csv":
        import csv

        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(
                {k: json.dumps(v, ensure_ascii=False) if isinstance(v, list) else v for k, v in r.items()} for r in rows
            )
        return path
    if file_format == "arrow":
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(path))
        return path
    raise AssertionError(file_format)


FORMATS = {"jsonl": "qa.jsonl", "jsonl.gz": "qa.jsonl.gz", "json": "qa.json", "parquet": "qa.parquet", "csv": "qa.csv"}
FORMATS["arrow"] = "qa_saved"


def _where(path: Path, file_format: str, n: int) -> str:
    if file_format.startswith("jsonl"):
        return f"{path}:{n}"
    if file_format == "arrow":
        return f"{path}/data-00000-of-00001.arrow: row {n}"
    return f"{path}: row {n}"


@pytest.mark.parametrize("file_format", list(FORMATS))
@pytest.mark.parametrize("rows", [QA_ROWS, CHAT_ROWS], ids=["qa", "chat"])
def test_every_file_format_reads_the_same_records(tmp_path, file_format, rows):
    path = write_as(tmp_path / FORMATS[file_format], rows, file_format)
    ds = read_data(path)
    reference = read_data(write_jsonl(tmp_path / "ref.jsonl", rows))
    assert ds.format == reference.format
    assert [record_key(r) for r in ds.records] == [record_key(r) for r in reference.records]
    summary = check_data(path)
    assert summary.stats == ds.stats and summary.format == ds.format


@pytest.mark.parametrize("file_format", list(FORMATS))
def test_a_bad_record_is_named_by_file_row_and_field(tmp_path, file_format):
    rows = [dict(r) for r in QA_ROWS]
    rows[2]["answer"] = "  "
    path = write_as(tmp_path / FORMATS[file_format], rows, file_format)
    for reader in (read_data, check_data):
        with pytest.raises(DataError) as e:
            reader(path)
        assert e.value.messages == [f"{_where(path, file_format, 3)}: answer: empty"]


def test_a_bad_nested_record_in_parquet_is_named(tmp_path):
    rows = [json.loads(json.dumps(r)) for r in CHAT_ROWS]
    rows[4]["messages"][1]["role"] = "robot"
    path = write_as(tmp_path / "chat.parquet", rows, "parquet")
    with pytest.raises(DataError) as e:
        read_data(path)
    assert f"{path}: row 5: messages[1].role: expected one of" in e.value.messages[0]


def test_glob_reads_every_file_in_order_and_names_the_bad_one(tmp_path):
    write_as(tmp_path / "part-1.parquet", QA_ROWS[:4], "parquet")
    write_as(tmp_path / "part-2.parquet", QA_ROWS[4:], "parquet")
    ds = read_data(tmp_path / "part-*.parquet")
    assert [r["question"] for r in ds.records] == [r["question"] for r in QA_ROWS]
    assert ds.records[4]["_source"].endswith("part-2.parquet") and ds.records[4]["_line"] == 1
    assert read_data(tmp_path).stats["examples"] == len(QA_ROWS)  # a directory of data files
    bad = [dict(r) for r in QA_ROWS[4:]]
    bad[1]["question"] = None
    write_as(tmp_path / "part-2.parquet", bad, "parquet")
    with pytest.raises(DataError) as e:
        check_data(tmp_path / "part-*.parquet")
    assert e.value.messages == [f"{tmp_path / 'part-2.parquet'}: row 2: question: missing"]


def test_files_with_different_record_shapes_are_refused(tmp_path):
    write_as(tmp_path / "a.jsonl", QA_ROWS, "jsonl")
    write_as(tmp_path / "b.jsonl", CHAT_ROWS, "jsonl")
    with pytest.raises(DataError, match="'chat' records, but .*a.jsonl holds 'qa' records"):
        read_data(tmp_path / "*.jsonl")


def test_dataset_dict_directory_reads_its_train_split(tmp_path):
    import datasets

    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(QA_ROWS), "test": datasets.Dataset.from_list(QA_ROWS[:2])}
    ).save_to_disk(str(tmp_path / "dd"))
    assert read_data(tmp_path / "dd").stats["examples"] == len(QA_ROWS)


def test_missing_and_unknown_sources_are_one_line(tmp_path):
    for path, expected in [
        (tmp_path / "nope.parquet", "file not found"),
        (tmp_path / "*.csv", "no files match"),
    ]:
        with pytest.raises(DataError) as e:
            read_data(path)
        assert e.value.messages == [f"{path}: {expected}"]
    odd = tmp_path / "data.bin"
    odd.write_bytes(b"\x00\x01garbage")
    with pytest.raises(DataError, match="cannot tell the file format; set data.file_format"):
        read_data(odd)
    assert resolve_sources(str(odd), "jsonl")[0].file_format == "jsonl"


def test_the_split_is_the_same_from_jsonl_and_parquet_and_in_any_order(tmp_path):
    rows = [{"question": f"câu hỏi {i}", "answer": f"trả lời {i}"} for i in range(200)]
    a = read_data(write_as(tmp_path / "a.jsonl", rows, "jsonl"))
    b = read_data(write_as(tmp_path / "b.parquet", rows[::-1], "parquet"))
    for limit in (None, 50):
        ta, va = split(a.records, 0.1, seed=3, limit=limit)
        tb, vb = split(b.records, 0.1, seed=3, limit=limit)
        assert [record_key(r) for r in ta] == [record_key(r) for r in tb]
        assert [record_key(r) for r in va] == [record_key(r) for r in vb]
        assert len(va) == round(len(ta + va) * 0.1) and len(ta + va) == (limit or 200)
    other, _ = split(a.records, 0.1, seed=4)
    assert [record_key(r) for r in other] != [record_key(r) for r in split(a.records, 0.1, seed=3)[0]]


def test_streamed_split_equals_the_in_memory_split(tmp_path):
    rows = [{"question": f"q {i}", "answer": f"a {i % 150}"} for i in range(300)] + QA_ROWS[:3]
    rows += rows[:5]  # duplicates: dropped by both paths
    path = write_as(tmp_path / "d.parquet", rows, "parquet")
    for limit in (None, 120):
        train, val = split(read_data(path).records, 0.2, seed=7, limit=limit)
        summary = check_data(path, seed=7, val_fraction=0.2, limit=limit)
        assert summary.stats["duplicates_dropped"] == 5
        streamed: dict[str, list[str]] = {"train": [], "val": []}
        for side, rec in summary_records(summary, 0):
            streamed[side].append(record_key(rec))
        assert sorted(streamed["train"]) == sorted(record_key(r) for r in train)
        assert sorted(streamed["val"]) == sorted(record_key(r) for r in val)
        assert (summary.plan.n_train, summary.plan.n_val) == (len(train), len(val))


def test_a_large_jsonl_file_is_checked_in_pieces_with_the_same_result(tmp_path, monkeypatch):
    import ray_ft.sources

    rows = [{"question": f"câu hỏi {i}", "answer": f"trả lời {i % 40}"} for i in range(300)]
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    lines[5] = ""  # a blank line counts as a line
    lines[140] = "{broken"
    lines[299] = '{"question": "q"}'
    path = tmp_path / "big.jsonl"
    path.write_text("\n".join(lines + lines[:20]) + "\n", encoding="utf-8")
    whole = None
    for chunk in (None, 1000):
        if chunk:
            monkeypatch.setattr(ray_ft.sources, "CHUNK_BYTES", chunk)
        with pytest.raises(DataError) as e:
            check_data(path)
        assert e.value.messages == [
            f"{path}:141: invalid JSON: Expecting property name enclosed in double quotes (column 2)",
            f"{path}:300: answer: missing",
        ]
    lines[140], lines[299] = lines[141], lines[298]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    for chunk in (None, 1000):
        monkeypatch.setattr(ray_ft.sources, "CHUNK_BYTES", chunk or 8 << 20)
        summary = check_data(path, val_fraction=0.1, seed=1)
        assert len(summary.sources) == (1 if chunk is None else -(-path.stat().st_size // 1000))
        got = sorted(
            (side, record_key(r)) for i in range(len(summary.sources)) for side, r in summary_records(summary, i)
        )
        if whole is None:
            whole = (summary.stats, summary.plan, summary.dropped, got)
        else:
            assert (summary.stats, summary.plan, got) == whole[:2] + whole[3:]
            assert {n for _, n in summary.dropped} == {n for _, n in whole[2]} == {142, 300}
