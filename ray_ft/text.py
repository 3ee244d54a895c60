"""Checks that parsed text and nested values are safe to hand to tokenisers, templates and JSON writers.

Python strings may hold code points that are not valid Unicode text: ``json.loads('"\\ud800"')`` gives a lone
surrogate that a tokenizer, ``str.encode("utf-8")`` or a JSON writer fails on far from where it came in (inside a
Ray worker, while exporting, while logging). NUL characters cut strings short in C libraries and terminals. Deeply
nested values blow the interpreter's recursion limit in every recursive consumer (``json.dumps``, ``copy.deepcopy``,
pydantic, Ray's serialiser). The functions here find such values once, where data enters, so the caller can name
the file, line and field instead of failing later. Both walk the value with an explicit stack, never recursion, so
they themselves work on values of any depth.

Data validation (``ray_ft.data``), config loading (``ray_ft.config``) and request handling use these same checks.
This module imports nothing from ``ray_ft``: it sits below ``ray_ft.config``, so dependencies still run one way.
"""

from __future__ import annotations

import json
from typing import Any

MAX_NESTING = 64
"""Deepest nesting of lists/dicts accepted in data lines, config documents and overrides. Real data and configs
nest a few levels; Python's recursion limit (1000) is far away."""
MAX_NODES = 1_000_000
"""Most values (containers and scalars, aliases counted at every use) accepted in one config document."""

SURROGATES = range(0xD800, 0xE000)


def _child_path(path: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    if isinstance(key, str) and key.isidentifier():
        return f"{path}.{key}" if path else key
    return f"{path}[{key!r}]"


def invalid_char(text: str) -> str | None:
    """Describe the first code point of ``text`` that is not valid text (a lone surrogate or NUL), or ``None``.

    Example: ``"lone surrogate U+D800 at character 0"``.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"lone surrogate U+{ord(text[e.start]):04X} at character {e.start}"
    nul = text.find("\x00")
    if nul >= 0:
        return f"NUL character at character {nul}"
    return None


def find_invalid_text(value: Any, path: str = "") -> str | None:
    """Find the first string in ``value`` (a str, or lists/tuples/dicts of them, keys included) that is not
    valid text.

    Args:
        value: A parsed JSON/YAML-like value.
        path: Location prefix for the message (e.g. a field name).

    Returns:
        ``"<location>: <problem>"`` for the first problem, e.g. ``"messages[0].content: lone surrogate U+D800 at
        character 0"`` (no location part for a bare string with an empty ``path``), or ``None`` when every string
        is valid.
    """
    stack: list[tuple[str, Any]] = [(path, value)]
    while stack:
        where, node = stack.pop()
        if isinstance(node, str):
            problem = invalid_char(node)
            if problem:
                return f"{where}: {problem}" if where else problem
        elif isinstance(node, dict):
            children = []
            for k, v in node.items():
                if isinstance(k, str):
                    problem = invalid_char(k)
                    if problem:
                        return f"{where or '<root>'}: key {k!r}: {problem}"
                children.append((_child_path(where, k), v))
            stack.extend(reversed(children))
        elif isinstance(node, list | tuple):
            stack.extend((_child_path(where, i), v) for i, v in reversed(list(enumerate(node))))
    return None


def find_too_deep(value: Any, limit: int = MAX_NESTING, path: str = "", max_nodes: int | None = None) -> str | None:
    """Location of the first list/tuple/dict in ``value`` nested more than ``limit`` levels deep, or ``None``.

    ``value`` itself is level 1 when it is a container. The walk stops at the first such container, so a value
    that contains itself (YAML anchors can build one) ends it too. Shared values are walked at every use: pass
    ``max_nodes`` to give up (return ``None``) after that many, or bound the value with :func:`count_nodes` first.

    Returns:
        A JSON-path-like location such as ``"deepspeed.extra.x[0][0]"``, shortened to 80 characters,
        or ``"<root>"`` when ``path`` is empty and ``value`` itself is the problem.
    """
    stack: list[tuple[int, str, Any]] = [(0, path, value)]
    visited = 0
    while stack:
        depth, where, node = stack.pop()
        visited += 1
        if max_nodes is not None and visited > max_nodes:
            return None
        if isinstance(node, dict | list | tuple):
            depth += 1
            if depth > limit:
                where = where or "<root>"
                return where if len(where) <= 80 else where[:77] + "..."
            items = node.items() if isinstance(node, dict) else enumerate(node)
            stack.extend((depth, _child_path(where, k), v) for k, v in items)
    return None


def count_nodes(value: Any, limit: int = MAX_NODES) -> int:
    """Number of values in ``value`` counting every container and scalar, shared ones (YAML aliases) each time
    they occur; stops counting past ``limit`` and returns ``limit + 1``.

    A few lines of YAML aliases can stand for billions of values ("billion laughs"); anything that copies or
    serialises the value expands them all.
    """
    count = 0
    stack: list[Any] = [value]
    while stack:
        node = stack.pop()
        count += 1
        if count > limit:
            return limit + 1
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list | tuple):
            stack.extend(node)
    return count


def check_nesting(value: Any, limit: int = MAX_NESTING, max_nodes: int = MAX_NODES, path: str = "") -> str | None:
    """``None`` when ``value`` nests at most ``limit`` levels and holds at most ``max_nodes`` values, else
    ``"<location>: <problem>"`` for the first problem found."""
    if count_nodes(value, max_nodes) > max_nodes:  # first: it bounds the walk below
        where = find_too_deep(value, limit, path, max_nodes)
        if where is not None:
            return f"{where}: nested more than {limit} levels deep"
        return f"{path or '<root>'}: more than {max_nodes} values (YAML aliases count at every use)"
    where = find_too_deep(value, limit, path)
    if where is not None:
        return f"{where}: nested more than {limit} levels deep"
    return None


def too_deep_at(text: str, limit: int = MAX_NESTING) -> int | None:
    """Offset of the first ``[``/``{`` in JSON ``text`` that opens level ``limit + 1``, or ``None``.

    Brackets inside double-quoted strings are skipped (so for flow-style YAML this is a close estimate).
    A cheap scan done before parsing: ``json.loads`` and YAML's parser recurse once per level and fail with
    ``RecursionError`` on input nested thousands deep; a text with at most ``limit`` brackets is not scanned.
    """
    if text.count("[") + text.count("{") <= limit:
        return None
    depth = 0
    in_string = escaped = False
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return i
        elif ch in "]}":
            depth -= 1
    return None


class _DuplicateKey(ValueError):
    pass


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(text: str) -> tuple[Any, str | None]:
    """Parse one JSON document (a data line, a request body); return ``(value, None)`` or ``(None, "field: problem")``.

    Beyond invalid JSON this refuses what ``json.loads`` accepts but later steps cannot use: nesting deeper than
    :data:`MAX_NESTING` (checked on the text first, since the parser recurses per level), duplicated keys (the
    last would silently win), ``NaN``/``Infinity``, integers too long to convert, and strings that are not valid
    Unicode text (lone surrogates from ``\\ud800`` escapes, NUL).
    """
    deep = too_deep_at(text)
    if deep is not None:
        return None, f"invalid JSON: nested more than {MAX_NESTING} levels deep (column {deep + 1})"
    try:
        obj = json.loads(text, object_pairs_hook=_refuse_duplicates, parse_constant=_refuse_constant)
    except json.JSONDecodeError as e:
        return None, f"invalid JSON: {e.msg} (column {e.colno})"
    except _DuplicateKey as e:
        key = e.args[0]
        return None, f"{key if key.isidentifier() else repr(key)}: duplicated key"
    except (ValueError, RecursionError) as e:  # over-long integers, NaN/Infinity, deep nesting the scan missed
        return None, f"invalid JSON: {str(e).split(':')[0] or type(e).__name__}"
    # Parsed strings can only hold a lone surrogate or NUL that the text holds, or that a \u escape spells: text
    # with neither (nearly every line) needs no walk over the parsed value.
    problem = find_invalid_text(obj) if "\\u" in text or invalid_char(text) else None
    if problem:
        return None, problem if isinstance(obj, dict | list) else f"<root>: {problem}"
    return obj, None
