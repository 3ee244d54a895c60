"""Dependencies between ray_ft's modules run one way.

Every import of a ray_ft module counts: module level, inside functions, and under ``TYPE_CHECKING``. Importing
``ray_ft.a.b`` depends on ``ray_ft.a.b`` and on the packages above it (``ray_ft.a``; Python runs their
``__init__`` first), except on the importer's own enclosing packages, which are already running; a package
the importer names explicitly (``from ray_ft.methods import register_method`` in ``ray_ft.methods.lora``) counts.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "ray_ft"
LEAF_UTILITIES = {"ray_ft.text", "ray_ft.device", "ray_ft.outputs", "ray_ft.logs"}
"""Modules below ``ray_ft.config``: they import no other ray_ft module."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(node: ast.ImportFrom, name: str, is_package: bool) -> str:
    """The absolute module of a ``from ... import`` (relative imports resolved against ``name``)."""
    if not node.level:
        return node.module or ""
    base = name.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The ray_ft modules ``name`` imports anywhere in its source, with their enclosing packages."""
    found: set[str] = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = _resolve(node, name, is_package)
            # ``from ray_ft.methods import lora`` imports the submodule ``ray_ft.methods.lora``.
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        for target in targets:
            if target in known and target not in ("ray_ft", name):
                found.add(target)  # named explicitly: counts even when it is the importer's own package
            parts = target.split(".")
            for i in range(2, len(parts)):
                dep = ".".join(parts[:i])
                if dep in known and not name.startswith(dep + "."):
                    found.add(dep)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_graph_sees_every_kind_of_import():
    graph = import_graph()
    assert "ray_ft.methods" in graph["ray_ft.methods.lora"]  # its own package, named explicitly
    assert "ray_ft.train" not in graph["ray_ft.train.loop"]  # its own package, implied only
    assert "ray_ft.train.loop" in graph["ray_ft.train.driver"]
    assert "ray_ft.config" in graph["ray_ft.methods"]  # a TYPE_CHECKING import
    assert "ray_ft.train" in graph["ray_ft.job"]


def test_no_import_cycles_between_ray_ft_modules():
    assert cycles(import_graph()) == []


def test_config_imports_only_leaf_utilities():
    graph = import_graph()
    assert graph["ray_ft.config"] <= LEAF_UTILITIES
    for leaf in LEAF_UTILITIES:
        assert graph[leaf] == set(), leaf


def test_methods_do_not_import_each_other_except_qlora_from_lora():
    """Methods share only the generation methods' base class; QLoRA is LoRA on a 4-bit base."""
    graph = import_graph()
    shared = {"ray_ft.methods.generation"}
    methods = {m for m in graph if m.startswith("ray_ft.methods.")} - shared
    for m in sorted(methods):
        others = (graph[m] & methods) - ({"ray_ft.methods.lora"} if m == "ray_ft.methods.qlora" else set())
        assert others == set(), m


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _modules_importing(top: str) -> list[str]:
    return sorted(
        str(path.relative_to(PACKAGE.parent))
        for path in PACKAGE.rglob("*.py")
        if any(
            (isinstance(node, ast.Import) and any(a.name.split(".")[0] == top for a in node.names))
            or (isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == top)
            for node in ast.walk(ast.parse(path.read_text()))
        )
    )


def test_only_tracking_imports_mlflow():
    """Every MLflow call goes through ``ray_ft.tracking`` (runs, resume, child runs, logging, registry)."""
    assert _modules_importing("mlflow") == ["ray_ft/tracking.py"]


def test_only_the_cli_parses_arguments():
    """Every command's arguments are parsed in ``ray_ft.cli``; the modules it calls take typed arguments."""
    users = sorted(
        str(path.relative_to(PACKAGE.parent))
        for path in PACKAGE.rglob("*.py")
        if path.name != "cli.py" or path.parent != PACKAGE
        if any(
            (isinstance(node, (ast.Import, ast.ImportFrom)) and any(alias.name == "argparse" for alias in node.names))
            or (isinstance(node, ast.ImportFrom) and node.module == "argparse")
            for node in ast.walk(ast.parse(path.read_text()))
        )
    )
    assert users == [], users
