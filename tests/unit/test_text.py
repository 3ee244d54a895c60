"""The shared text checks: invalid Unicode, nesting depth and size, found without recursion."""

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from ray_ft.text import MAX_NESTING, check_nesting, count_nodes, find_invalid_text, find_too_deep, too_deep_at


def _nested(depth: int) -> list:
    root = node = []
    for _ in range(depth - 1):
        child: list = []
        node.append(child)
        node = child
    return root


def test_lone_surrogate_is_found_with_its_location():
    assert find_invalid_text("\ud800") == "lone surrogate U+D800 at character 0"
    value = json.loads('{"messages": [{"role": "user", "content": "ab\\udc00"}]}')
    assert find_invalid_text(value) == "messages[0].content: lone surrogate U+DC00 at character 2"
    assert find_invalid_text({"ok": ["fine", "x\x00"]}) == "ok[1]: NUL character at character 1"
    assert find_invalid_text({"a\ud83d": 1}) == "<root>: key 'a\\ud83d': lone surrogate U+D83D at character 1"
    assert (
        find_invalid_text({"weird key": "\ud800"}, "data") == "data['weird key']: lone surrogate U+D800 at character 0"
    )


def test_valid_text_passes():
    assert find_invalid_text({"q": "LoRA là gì? 🤖", "n": [1, 2.5, None, True]}) is None
    assert find_invalid_text("\U0001f916") is None  # a real astral character is not a surrogate


def test_checks_are_iterative_on_100k_deep_values():
    deep = _nested(100_000)
    assert find_invalid_text(deep) is None  # no RecursionError
    assert find_too_deep(deep, MAX_NESTING).startswith("[0][0]")
    assert check_nesting(deep).endswith(f"nested more than {MAX_NESTING} levels deep")
    assert check_nesting(_nested(MAX_NESTING)) is None
    assert check_nesting({"deepspeed": {"extra": _nested(MAX_NESTING)}}, path="cfg").startswith("cfg.deepspeed.extra")


def test_self_containing_and_alias_bombs_end():
    loop: list = []
    loop.append(loop)
    assert check_nesting(loop) is not None
    bomb: list = [0] * 10
    for _ in range(9):
        bomb = [bomb] * 10
    assert count_nodes(bomb, 1000) == 1001
    assert "more than" in check_nesting(bomb)


def test_bracket_scan_skips_strings():
    assert too_deep_at("[" * 100_000) == MAX_NESTING
    text = json.dumps({"a": "[" * 1000, "b": [[1]]})
    assert too_deep_at(text) is None
    assert too_deep_at('{"a": "\\"' + "[" * 100 + '"}') is None


no_nul = st.text(st.characters(exclude_characters="\x00"))  # NUL is covered above
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | no_nul,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(no_nul, children, max_size=3),
    max_leaves=10,
)


@settings(max_examples=200, deadline=None)
@given(value=json_values)
def test_invalid_text_iff_it_cannot_be_written_as_utf8(value):
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
        ok = True
    except UnicodeEncodeError:
        ok = False
    assert (find_invalid_text(value) is None) == ok


@settings(max_examples=200, deadline=None)
@given(value=json_values)
def test_bracket_scan_bounds_the_parsed_depth(value):
    assert (too_deep_at(json.dumps(value), 2) is None) == (find_too_deep(value, 2) is None)
