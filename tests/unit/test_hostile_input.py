"""Hostile data files, config documents and overrides: each is refused with one line naming file, line and field
(exit 2 from the CLI, no traceback), never a crash later inside a worker."""

import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from ray_ft.cli import main
from ray_ft.config import MAX_CONFIG_BYTES, ConfigError, ExperimentConfig, StrictModel, load_config
from ray_ft.data import MAX_LINE_BYTES, DataError, read_jsonl
from ray_ft.methods import get_method, method_names
from ray_ft.text import MAX_NESTING

REPO = Path(__file__).resolve().parents[2]
GOOD = '{"question": "LoRA là gì?", "answer": "Ma trận hạng thấp."}\n'


def _data_errors(path: Path) -> list[str]:
    with pytest.raises(DataError) as e:
        read_jsonl(path)
    return e.value.messages


# --------------------------------------------------------------------------- data files


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"question": "\\ud800 hi", "answer": "a"}', ":2: question: lone surrogate U+D800 at character 0"),
        ('{"question": "q", "answer": "a\\u0000"}', ":2: answer: NUL character at character 1"),
        (
            '{"messages": [{"role": "user", "content": "x\\udfff"}, {"role": "assistant", "content": "a"}]}',
            ":2: messages[0].content: lone surrogate U+DFFF at character 1",
        ),
        ('{"question": "q", "answer": "a", "question": "q2"}', ":2: question: duplicated key"),
        ('{"question": "q", "answer": "a", "x": NaN}', ":2: invalid JSON: NaN is not a JSON number"),
        ('{"text": "t", "label": ' + "9" * 5000 + "}", ":2: invalid JSON: Exceeds the limit (4300 digits)"),
        ('{"question": ' + "[" * 100_000 + "]" * 100_000 + "}", f":2: invalid JSON: nested more than {MAX_NESTING}"),
    ],
    ids=["surrogate", "nul", "chat-surrogate", "duplicate-key", "nan", "huge-int", "100k-deep"],
)
def test_hostile_jsonl_line_is_refused_with_location(tmp_path, line, expected):
    path = tmp_path / "d.jsonl"
    path.write_text(GOOD + line + "\n", encoding="utf-8", errors="surrogatepass")
    errors = _data_errors(path)
    assert len(errors) == 1 and errors[0].startswith(f"{path}{expected}"), errors


def test_data_check_refuses_a_lone_surrogate_with_file_line_field(tmp_path, capsys):
    """The case that used to crash tokenisation inside the Ray workers."""
    path = tmp_path / "d.jsonl"
    path.write_text(GOOD + '{"question": "a\\ud83d", "answer": "b"}\n', encoding="utf-8")
    assert main(["data", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {path}:2: question: lone surrogate U+D83D at character 1\n"


def _table_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Table files with text that is not valid (each row 2), and the line ``ray-ft data check`` must print."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = b"bad \xed\xa0\x80 text"  # a UTF-16 surrogate encoded as UTF-8 (CESU-8): not valid UTF-8
    files: dict[str, tuple[Path, str]] = {}
    csv = tmp_path / "bytes.csv"
    csv.write_bytes(b'question,answer\nq1,a1\nq2,"' + bad + b'"\n')
    files["csv-bytes"] = (csv, f"{csv}: row 2: answer: not valid UTF-8 (byte 0xed at byte 5)")
    chat = tmp_path / "escape.csv"
    turns = '[{""role"": ""user"", ""content"": ""hi""}, {""role"": ""assistant"", ""content"": ""x\\udfff""}]'
    good = turns.replace("x\\udfff", "fine")
    chat.write_text(f'messages\n"{good}"\n"{turns}"\n', encoding="utf-8")
    files["csv-json-escape"] = (chat, f"{chat}: row 2: messages[1].content: lone surrogate U+DFFF at character 1")
    nul = tmp_path / "nul.csv"
    nul.write_bytes(b'question,answer\nq1,a1\nq2,"a\x00b"\n')
    files["csv-nul"] = (nul, f"{nul}: row 2: answer: NUL character at character 1")
    parquet = tmp_path / "strings.parquet"
    column = pa.array([b"q1", bad], pa.binary()).view(pa.string())  # Arrow does not check other writers' UTF-8
    pq.write_table(pa.table({"question": column, "answer": ["a1", "a2"]}), parquet)
    files["parquet-string"] = (parquet, f"{parquet}: row 2: question: not valid UTF-8 (byte 0xed at byte 5)")
    return files


@pytest.mark.parametrize("case", ["csv-bytes", "csv-json-escape", "csv-nul", "parquet-string"])
def test_bad_text_in_csv_and_parquet_is_one_line_with_file_row_field(tmp_path, capsys, case):
    """What JSON Lines refuses with its line and field, table files refuse with their row and field."""
    path, expected = _table_files(tmp_path)[case]
    assert main(["data", "check", str(path)]) == 2
    assert capsys.readouterr().err == f"error: {expected}\n"


def test_100k_deep_jsonl_exits_2_without_traceback(tmp_path, capsys):
    path = tmp_path / "deep.jsonl"
    path.write_text("[" * 100_000 + "\n", encoding="utf-8")
    assert main(["data", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}:1: invalid JSON: nested more than") and "Traceback" not in err


def test_bom_at_file_start_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (GOOD * 2).replace("LoRA", "QLoRA", 1).encode())
    assert len(read_jsonl(path).records) == 2


def test_overlong_line_is_refused_without_reading_it_whole(tmp_path):
    path = tmp_path / "long.jsonl"
    with path.open("w", encoding="utf-8") as f:
        f.write(GOOD)
        f.write('{"question": "' + "x" * (MAX_LINE_BYTES + 10) + '", "answer": "a"}\n')
        f.write('{"question": "q3", "answer": "a"}\n')
    errors = _data_errors(path)
    assert errors == [f"{path}:2: line longer than {MAX_LINE_BYTES} bytes"]


# --------------------------------------------------------------------------- config documents


def _config_error(path, overrides=None) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    return str(e.value)


def test_deep_yaml_is_one_line_with_file_and_line(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("train:\n  lr: 1e-4\ndeepspeed:\n  extra:\n    x: " + "[" * 100_000 + "\n")
    assert _config_error(path) == f"{path}:5: nested more than {MAX_NESTING} levels deep"


def test_deep_block_yaml_names_the_field(tmp_path):
    path = tmp_path / "deep.yaml"
    lines = ["deepspeed:", "  extra:"] + [f"{'  ' * (i + 2)}k{i}:" for i in range(100)] + [f"{'  ' * 102}v: 1"]
    path.write_text("\n".join(lines) + "\n")
    msg = _config_error(path)
    assert msg.startswith(f"{path}: deepspeed.extra.k0.k1.") and msg.endswith("nested more than 64 levels deep"), msg


def test_deep_override_is_one_line():
    msg = _config_error(None, ["deepspeed.extra.x=" + "[" * 100_000])
    assert msg == f"override 'deepspeed.extra.x': value nested more than {MAX_NESTING} levels deep"
    msg = _config_error(None, ["a" + ".b" * 100_000 + "=1"])
    assert msg.startswith("override 'a.b.b.b") and "\n" not in msg and len(msg) < 200


def test_cli_deep_override_exits_2(capsys):
    assert main(["train", "jobs/lora.yaml", "deepspeed.extra.x=" + "[" * 100_000]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "deepspeed.extra.x" in err and "Traceback" not in err


def test_duplicated_yaml_key_names_file_line_and_field(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("train:\n  lr: 1e-4\n  epochs: 2\n  lr: 1e-2\n")
    assert _config_error(path) == f"{path}:4: train.lr: duplicated key"


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("train:\n  <<: {lr: 0.001, epochs: 2}\n  lr: 0.002\n")
    assert load_config(path).train.lr == 0.002


def test_billion_laughs_and_self_reference_are_refused(tmp_path):
    laughs = ["a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for i in range(1, 8):
        prev = chr(ord("a") + i - 1)
        name = chr(ord("a") + i)
        laughs.append(f"{name}: &{name} [{', '.join(['*' + prev] * 10)}]")
    path = tmp_path / "laughs.yaml"
    path.write_text("deepspeed:\n  extra:\n" + "\n".join("    " + line for line in laughs) + "\n")
    assert "more than 1000000 values" in _config_error(path)
    loop = tmp_path / "loop.yaml"
    loop.write_text("deepspeed:\n  extra:\n    x: &x [*x]\n")
    assert "nested more than" in _config_error(loop)


def test_config_encoding(tmp_path):
    bom = tmp_path / "bom.yaml"
    bom.write_bytes(b"\xef\xbb\xbftrain:\n  lr: 0.001\n")
    assert load_config(bom).train.lr == 0.001
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"train:\n  lr: 0.001\ndata:\n  template: 'Hu\xe9: {question} {answer}'\n")
    assert _config_error(latin1).startswith(f"{latin1}:4: not UTF-8 text")
    surrogate = tmp_path / "s.yaml"
    surrogate.write_text('data:\n  template: "\\ud800 {question} {answer}"\n')
    assert _config_error(surrogate) == f"{surrogate}: data.template: lone surrogate U+D800 at character 0"


def test_oversized_config_is_refused_before_parsing(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * MAX_CONFIG_BYTES + "\n")
    assert "larger than" in _config_error(big)


def test_undecodable_argv_override_is_refused():
    """Invalid UTF-8 on the command line reaches Python as lone surrogates (PEP 383)."""
    assert _config_error(None, ["data.path=\udcff.jsonl"]).endswith("data.path: lone surrogate U+DCFF at character 0")


# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.max_steps=-5", "train.max_steps: must be >= 1"),
        ("train.max_steps=0", "train.max_steps: must be >= 1"),
        ("train.eval_every=0", "train.eval_every: must be >= 1"),
        ("train.lr=.nan", "train.lr: must be a finite number"),
        ("train.epochs=.inf", "train.epochs: must be a finite number"),
        ("train.warmup_ratio=7", "train.warmup_ratio: must be <= 1"),
        ("train.weight_decay=-0.1", "train.weight_decay: must be >= 0"),
        ("train.max_grad_norm=-.inf", "train.max_grad_norm: must be a finite number"),
        ("train.seed=-1", "train.seed: must be >= 0"),
        ("train.batch_size=100000000000000000000", "train.batch_size: must be <= 1048576"),
        ("train.grad_accum=0", "train.grad_accum: must be >= 1"),
        ("train.keep_checkpoints=0", "train.keep_checkpoints: must be >= 1"),
        ("data.max_length=0", "data.max_length: must be >= 2"),
        ("data.max_length=99999999999", "data.max_length: must be <= 1048576"),
        ("data.limit=0", "data.limit: must be >= 1"),
        ("data.val_fraction=.nan", "data.val_fraction: must be a finite number"),
        ("scaling.num_workers=-1", "scaling.num_workers: must be >= 0"),
        ("scaling.num_workers=1000000", "scaling.num_workers: must be <= 10000"),
        ("scaling.cpus_per_worker=0", "scaling.cpus_per_worker: must be > 0"),
        ("scaling.cpus_per_worker=.inf", "scaling.cpus_per_worker: must be a finite number"),
        ("scaling.max_failures=-3", "scaling.max_failures: must be >= 0"),
        ("eval.max_new_tokens=0", "eval.max_new_tokens: must be >= 1"),
        ("eval.batch_size=-2", "eval.batch_size: must be >= 1"),
        ("eval.max_examples=-1", "eval.max_examples: must be >= 0"),
        ("method.r=0", "method.r: must be >= 1"),
        ("method.dropout=.nan", "method.dropout: must be a finite number"),
        ("method.layers_to_transform=[-1]", "method.layers_to_transform.0: must be >= 0"),
        ("tune.lr=[.nan, 0.1]", "tune.lr.0: must be a finite number"),
        ("tune.alpha_multiple=[.inf]", "tune.alpha_multiple.0: must be a finite number"),
        ("tune.r=[]", "tune.r: List should have at least 1 item"),
        ("tune.num_samples=0", "tune.num_samples: must be >= 1"),
        ("deepspeed.extra.gradient_clipping=.nan", "deepspeed.extra: numbers must be finite"),
        ("deepspeed.extra.x=[1, {y: .inf}]", "deepspeed.extra: numbers must be finite"),
    ],
)
def test_bad_numbers_are_refused_at_load(override, expected):
    assert expected in _config_error(None, [override])


def test_unset_is_null_and_zero_is_not_unset():
    cfg = load_config(None, ["train.max_steps=null", "train.eval_every=null"])
    assert cfg.train.max_steps is None and cfg.train.eval_every is None


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("'team/model'", "cannot contain '/' or ':'"),
        ("'a:b'", "cannot contain '/' or ':'"),
        ("'{methd}-x'", "the only placeholder allowed is {method}"),
        ("'{0}'", "the only placeholder allowed is {method}"),
        ("' '", "must be 1 to 256 characters"),
        ("'..'", "be '.' or '..'"),
        ("'" + "m" * 300 + "'", "must be 1 to 256 characters"),
    ],
)
def test_registered_model_name_is_checked_at_load(name, expected):
    assert expected in _config_error(None, [f"tracking.registered_model={name}"])


def test_registered_model_names_load_fine():
    assert load_config(None, ["tracking.registered_model=my-model_{method}.v2"]).tracking.registered_model
    assert load_config(None, ["tracking.registered_model=null"]).tracking.registered_model is None


def _numeric(annotation) -> bool:
    args = typing.get_args(annotation)
    if annotation in (int, float):
        return True
    return any(_numeric(a) for a in args)


def _only_floats(annotation) -> bool:
    args = typing.get_args(annotation)
    if annotation is int:
        return False
    return all(_only_floats(a) for a in args)


def _has_bounds(metadata, base) -> bool:
    """A lower bound, and for integers an upper one too (floats are finite: ``allow_inf_nan`` is off)."""
    flat = [c for m in metadata for c in (getattr(m, "metadata", None) or [m])]  # FieldInfo holds Ge/Gt objects
    lower = any(getattr(c, "ge", None) is not None or getattr(c, "gt", None) is not None for c in flat)
    upper = any(getattr(c, "le", None) is not None or getattr(c, "lt", None) is not None for c in flat)
    return lower and (upper or base is float)


def _bounded(field) -> bool:
    """A field whose numbers all carry bounds (on the field or on every numeric type inside it)."""
    if _has_bounds(field.metadata, float if _only_floats(field.annotation) else int):
        return True
    stack = [field.annotation]
    while stack:
        ann = stack.pop()
        if ann in (int, float):
            return False
        if typing.get_origin(ann) is typing.Annotated:
            base, *meta = typing.get_args(ann)
            if base in (int, float):
                if not _has_bounds(meta, base):
                    return False
                continue
            stack.append(base)
            continue
        stack.extend(typing.get_args(ann))
    return True


def _sections() -> list[type[BaseModel]]:
    seen, stack = [], [ExperimentConfig, *(get_method(n).config_cls for n in method_names())]
    while stack:
        cls = stack.pop()
        if cls in seen:
            continue
        seen.append(cls)
        for f in cls.model_fields.values():
            stack.extend(
                a
                for a in (*typing.get_args(f.annotation), f.annotation)
                if isinstance(a, type) and issubclass(a, BaseModel)
            )
    return seen


def test_every_numeric_config_field_is_bounded_and_finite():
    """A new numeric field in any section must say its range (Count, Size, Seed, Fraction, Field(ge=...))."""
    unbounded = [
        f"{cls.__name__}.{name}"
        for cls in _sections()
        for name, f in cls.model_fields.items()
        if _numeric(f.annotation) and not _bounded(f)
    ]
    assert unbounded == []
    assert all(issubclass(cls, StrictModel) and cls.model_config.get("allow_inf_nan") is False for cls in _sections())
