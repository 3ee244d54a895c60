"""Property-based: random and mutated inputs to the data validator and the config loader never escape as
an uncaught traceback; they are accepted or refused with a message naming file, line and field."""

import json
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ray_ft.config import ConfigError, load_config
from ray_ft.data import DataError, read_jsonl

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
GOOD = b'{"question": "LoRA l\xc3\xa0 g\xc3\xac?", "answer": "Ma tr\xe1\xba\xadn h\xe1\xba\xa1ng th\xe1\xba\xa5p."}\n'


@SETTINGS
@given(lines=st.lists(st.binary(max_size=60) | json_values.map(lambda v: json.dumps(v).encode()), max_size=6))
def test_random_jsonl_is_accepted_or_refused_with_locations(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(lines))
    try:
        ds = read_jsonl(path)
    except DataError as e:
        assert e.messages
        for msg in e.messages:
            assert msg.startswith(str(path)), msg
            assert re.match(rf"{re.escape(str(path))}(:\d+)?: ", msg), msg
    else:
        assert ds.records


@SETTINGS
@given(pos=st.integers(min_value=0, max_value=len(GOOD) - 1), byte=st.integers(min_value=0, max_value=255))
def test_mutated_valid_line_never_crashes(tmp_path, pos, byte):
    mutated = bytearray(GOOD * 2)
    mutated[len(GOOD) + pos] = byte
    path = tmp_path / "m.jsonl"
    path.write_bytes(bytes(mutated))
    try:
        read_jsonl(path)
    except DataError as e:
        assert all(m.startswith(f"{path}:2") or m.startswith(f"{path}:3") for m in e.messages), e.messages


section_keys = st.sampled_from(["train", "data", "method", "model", "scaling", "deepspeed", "eval", "tracking", "x"])


@SETTINGS
@given(doc=st.dictionaries(section_keys, json_values, max_size=4))
def test_random_config_documents_are_loaded_or_refused_by_field(tmp_path, doc):
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(doc))  # JSON is YAML
    try:
        load_config(path)
    except ConfigError as e:
        assert e.messages
        assert all(m.startswith(str(path)) for m in e.messages), e.messages


@SETTINGS
@given(key=st.from_regex(r"[a-z_]{1,8}(\.[a-z_]{1,8}){0,2}", fullmatch=True), value=st.text(max_size=12))
def test_random_overrides_are_loaded_or_refused_by_field(key, value):
    try:
        load_config(None, [f"{key}={value}"])
    except ConfigError as e:
        assert all("<defaults>" in m or "override" in m for m in e.messages), e.messages
