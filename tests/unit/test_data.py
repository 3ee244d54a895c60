import json

import pytest
from conftest import QA_ROWS, write_jsonl

from ray_ft.chat import IGNORE_INDEX
from ray_ft.data import DataError, PromptFormat, encode_generation, length_grouped_batches, read_jsonl, split
from ray_ft.tensors import collate


def _errors(path) -> list[str]:
    with pytest.raises(DataError) as e:
        read_jsonl(path)
    return e.value.messages


def test_reads_seed_shape(qa_file):
    ds = read_jsonl(qa_file)
    assert ds.format == "qa" and len(ds.records) == len(QA_ROWS)
    assert ds.records[0]["_line"] == 1


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'{"question": "q", "answer": "a"}\n{oops\n', ":2: invalid JSON"),
        (b'{"question": "q", "answer": "a"}\n[1, 2]\n', ":2: expected a JSON object, got list"),
        (b'{"question": "q"}\n', ":1: answer: missing"),
        (b'{"question": "q", "answer": "  "}\n', ":1: answer: empty"),
        (b'{"question": 5, "answer": "a"}\n', ":1: question: expected a string, got int"),
        (b'{"question": "q", "answer": "a"}\n{"question": "\xff", "answer": "a"}\n', ":2: not valid UTF-8"),
        (b"", "no examples"),
        (b'{"question": "q", "answer": "a", "extra": 1}\n', ":1: extra: unexpected field"),
        (b'{"foo": 1}\n', ":1: cannot tell the format"),
        (b'{"messages": [{"role": "user", "content": "hi"}]}\n', "last message must be the assistant"),
        (b'{"messages": [{"role": "bot", "content": "hi"}]}\n', "messages[0].role"),
        (b'{"text": "x", "label": "a"}\n{"text": "y", "label": true}\n', ":2: label: expected a string or integer"),
    ],
)
def test_bad_data_is_reported_with_file_line_field(tmp_path, content, expected):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    msgs = _errors(path)
    assert any(expected in m for m in msgs), msgs
    assert all(m.startswith(str(path)) for m in msgs)


def test_every_bad_line_is_reported(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\nnope\n{"question": 1, "answer": "a"}\n[]\n')
    assert len(_errors(path)) == 3


def test_missing_file(tmp_path):
    assert "file not found" in _errors(tmp_path / "nope.jsonl")[0]


def test_cleaning_normalises_and_dedupes(tmp_path):
    decomposed = "Cho\u0302\u0301 nay"  # NFD form of "Chốnay"-like text
    rows = [
        {"question": "  What   is LoRA? ", "answer": "Low rank\tadapters."},
        {"question": "What is LoRA?", "answer": "Low rank adapters."},
        {"question": decomposed, "answer": "x"},
    ]
    ds = read_jsonl(write_jsonl(tmp_path / "d.jsonl", rows))
    assert ds.stats["duplicates_dropped"] == 1 and ds.stats["examples"] == 2
    assert ds.stats["normalized"] == 2
    assert ds.records[0]["question"] == "What is LoRA?"
    assert ds.records[1]["question"] == "Ch\u1ed1 nay"


def test_other_formats(tmp_path):
    io = read_jsonl(write_jsonl(tmp_path / "io.jsonl", [{"input": "i", "output": "o", "context": "c"}]))
    assert io.format == "io"
    chat = read_jsonl(
        write_jsonl(
            tmp_path / "chat.jsonl",
            [
                {
                    "messages": [
                        {"role": "system", "content": "s"},
                        {"role": "user", "content": "u"},
                        {"role": "assistant", "content": "a"},
                    ]
                }
            ],
        )
    )
    assert chat.format == "chat"
    cls = read_jsonl(write_jsonl(tmp_path / "c.jsonl", [{"text": "t", "label": "a"}, {"text": "u", "label": "b"}]))
    assert cls.format == "classification" and cls.labels == ["a", "b"]


def test_split_is_deterministic_and_disjoint():
    records = [{"question": str(i), "answer": "a"} for i in range(20)]
    t1, v1 = split(records, 0.2, seed=1)
    t2, v2 = split(records, 0.2, seed=1)
    assert (t1, v1) == (t2, v2) and len(v1) == 4 and len(t1) == 16
    assert not {r["question"] for r in t1} & {r["question"] for r in v1}
    t3, v3 = split(records, 0.2, seed=1, limit=10)
    assert len(t3) == 8 and len(v3) == 2 and (t3, v3) == split(records, 0.2, seed=1, limit=10)
    assert {r["question"] for r in t3 + v3} < {r["question"] for r in records}


def test_loss_only_on_answer_tokens(tiny_model_dir):
    from ray_ft.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    fmt = PromptFormat()
    rec = {"question": "LoRA là gì?", "answer": "Ma trận hạng thấp."}
    enc = encode_generation(rec, tok, fmt, max_length=128)
    prompt_ids = tok(fmt.prompt("LoRA là gì?"))["input_ids"]
    n = len(prompt_ids)
    assert enc["input_ids"][:n] == prompt_ids
    assert enc["labels"][:n] == [IGNORE_INDEX] * n
    assert enc["labels"][n:] == enc["input_ids"][n:]
    assert enc["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(enc["input_ids"][n:-1]) == " Ma trận hạng thấp."


def test_truncation_keeps_the_answer(tiny_model_dir):
    from ray_ft.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    rec = {"question": "word " * 200, "answer": "short answer"}
    enc = encode_generation(rec, tok, PromptFormat(), max_length=32)
    assert len(enc["input_ids"]) == 32
    assert enc["input_ids"][-1] == tok.eos_token_id and enc["labels"][-1] == tok.eos_token_id


def test_collate_pads_to_longest_only():
    batch = collate([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}], pad_id=0)
    assert batch["input_ids"].shape == (2, 3)
    assert batch["labels"][1].tolist() == [4, IGNORE_INDEX, IGNORE_INDEX]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_length_grouped_batches_cover_everything_once():
    lengths = [5, 50, 7, 48, 6, 51, 8, 49]
    batches = length_grouped_batches(lengths, 2, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(8))
    assert all(abs(lengths[b[0]] - lengths[b[-1]]) <= 3 for b in batches)


@pytest.mark.parametrize(("n", "batch_size", "world"), [(9, 2, 2), (5, 2, 1), (7, 3, 2), (3, 2, 2)])
def test_every_rank_gets_full_micro_batches_covering_the_epoch(n, batch_size, world):
    from ray_ft.train.batching import Batches

    encoded = [{"input_ids": list(range(3 + 2 * i)), "labels": list(range(3 + 2 * i))} for i in range(n)]
    ranks = [Batches(encoded, batch_size, r, world, seed=0, pad_id=0, packed=False) for r in range(world)]
    per_epoch = ranks[0].per_epoch
    assert per_epoch == -(-n // (batch_size * world))
    seen: list[int] = []
    for step in range(per_epoch):
        for r in ranks:
            batch = r.get(step)
            assert batch["input_ids"].shape[0] == batch_size  # a short last batch is filled, never cut
            seen += [int(m.sum()) for m in batch["attention_mask"]]  # lengths are unique: they name examples
    assert {len(e["input_ids"]) for e in encoded} <= set(seen)  # every example trained on each epoch
    assert len(seen) == per_epoch * batch_size * world


def test_template_is_configurable():
    fmt = PromptFormat(template="### Q: {question}\n### A: {answer}")
    assert fmt.prompt("hi") == "### Q: hi\n### A:"
    assert fmt.answer_prefix() == " "
    assert json.dumps(fmt.to_dict())
