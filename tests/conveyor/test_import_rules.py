"""The layers import one way (DESIGN.md): checked on the source, every import counted, lazy ones too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support import REPO_ROOT

REPO = REPO_ROOT
# Where each installed package's source lives (pyproject.toml's package-dir).
ROOTS = {"conveyor": REPO / "conveyor", "conveyor.flows": REPO / "flows", "conveyor.tasks": REPO / "tasks"}
LEAVES = (
    "conveyor.errors",
    "conveyor.settings",
    "conveyor.store",
    "conveyor.resources",
    "conveyor.operator",
)


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package, root in ROOTS.items():
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def imports_of(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports, at any depth of the file (function-level imports count)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {
        name: {m for m in imports_of(name, path) if m in mods and m != name} for name, path in mods.items()
    }


def _under(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def violations(edges: dict[str, set[str]], all_imports: dict[str, set[str]]) -> list[str]:
    found = []
    for src, targets in all_imports.items():
        for dst in sorted(targets):
            if _under(src, "conveyor.tasks"):
                if _under(dst, "prefect", "conveyor.flows", "conveyor.cli"):
                    found.append(f"{src} -> {dst}: stages never import prefect, flows or the CLI")
                elif _under(dst, "conveyor") and not _under(dst, "conveyor.tasks", *LEAVES):
                    found.append(f"{src} -> {dst}: stages import only the conveyor leaves {LEAVES}")
            if (
                _under(src, "conveyor.store", "conveyor.errors", "conveyor.settings")
                and _under(dst, "conveyor")
                and not _under(dst, "conveyor.store", "conveyor.errors", "conveyor.settings")
            ):
                found.append(f"{src} -> {dst}: the store is a leaf")
            if (
                _under(src, "conveyor.operator")
                and dst.startswith("conveyor.")
                and dst != "conveyor.settings"
            ):
                found.append(f"{src} -> {dst}: the operator's settings are a leaf (stages read them)")
            if _under(src, "conveyor.flows") and _under(dst, "conveyor.cli"):
                found.append(f"{src} -> {dst}: flows never import the CLI")
            if _under(src, "conveyor.serving") and _under(dst, "conveyor.flows"):
                found.append(f"{src} -> {dst}: serving does not import flows")
    return found


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def _package_free_graph() -> dict[str, set[str]]:
    """Edges without the implicit child -> parent package import (an ``__init__`` importing its children)."""
    edges = graph()
    return {src: {dst for dst in targets if not src.startswith(dst + ".")} for src, targets in edges.items()}


def test_every_layer_imports_one_way() -> None:
    mods = modules()
    all_imports = {name: imports_of(name, path) for name, path in mods.items()}
    assert violations(graph(), all_imports) == []


def test_no_import_cycles() -> None:
    assert cycles(_package_free_graph()) == []


def test_the_checks_catch_what_they_forbid() -> None:
    """The rules fire on a made-up violation, so an empty list above means something."""
    bad = {
        "conveyor.tasks.x": {"prefect", "conveyor.flows.training", "conveyor.cli"},
        "conveyor.flows.y": {"conveyor.cli.runs"},
        "conveyor.serving": {"conveyor.flows.training"},
        "conveyor.store.storage": {"conveyor.tasks.train"},
    }
    assert len(violations({}, bad)) == 6
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("generic", ["flows", "tasks"])
def test_only_one_import_name_is_installed(generic: str, tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        f"import importlib.util, conveyor.flows, conveyor.tasks; print(importlib.util.find_spec({generic!r}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "None"


def test_no_test_imports_another_test_module() -> None:
    tests = REPO / "tests"
    offenders = []
    for path in tests.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            )
            offenders += [
                f"{path.relative_to(REPO)}: {n}"
                for n in names
                if n.split(".")[-1].startswith("test_") or n.split(".")[-1] == "conftest"
            ]
    assert offenders == []


def test_the_flow_imports_no_model_library_until_a_stage_needs_one() -> None:
    """A rerun that reuses every stage never pays for xgboost and scikit-learn (0.7 s of a 2-core
    rerun's imports, measured), nor for dask.dataframe with dask.array and scipy (0.5 s): they are
    imported by the code that reads frames, trains, predicts or scores."""
    import subprocess
    import sys

    heavy = ("xgboost", "sklearn", "scipy", "matplotlib", "dask.dataframe", "dask.array")
    probe = (
        "import sys, conveyor.quiet, conveyor.flows.training, conveyor.cli;"
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout
