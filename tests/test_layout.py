"""The codebase's shape as a contract: module sizes, import graph, public API, CLI surface.

These pin what issue 10 asked of the layout, so that a later change that grows a module past the
limit, adds an import cycle or drops a public name or a CLI option fails here, not in a user's plugin.
"""

from __future__ import annotations

import ast
import inspect
import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"sopkit": ROOT / "sopkit", "sopkit_baselines": ROOT / "baselines/src/sopkit_baselines"}
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    """Every module of sopkit and its plugin by dotted name (a package by its ``__init__``)."""
    modules = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _top_level_imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The sopkit modules ``name`` imports when it is imported, plus those it imports under
    ``TYPE_CHECKING`` (a cycle there breaks type checkers and ``typing.get_type_hints``).
    Imports inside functions are deliberate lazy imports (torch stays out of ``sopkit --help``)."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.If):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    package = name if is_package else name.rsplit(".", 1)[0]
                    for _ in range(node.level - 1):
                        package = package.rsplit(".", 1)[0]
                    base = f"{package}.{base}" if base else package
                for alias in node.names:
                    # ``from sopkit.mk import kernels`` imports the submodule sopkit.mk.kernels;
                    # ``from sopkit.mk import expand`` reads a name from the package sopkit.mk.
                    submodule = f"{base}.{alias.name}"
                    found.add(submodule if submodule in modules else base)

    visit(tree.body)
    return {module for module in found if module in modules and module != name}


def test_no_module_is_longer_than_the_limit():
    long = {
        name: n
        for name, path in _modules().items()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}, f"modules over {MAX_LINES} lines: {long}"


def test_the_import_graph_has_no_cycle_even_under_type_checking():
    modules = _modules()
    graph = {name: _top_level_imports(path, name, modules) for name, path in modules.items()}
    # Only explicit imports are edges: that importing a submodule first runs its parent package's
    # __init__ is not a cycle unless the child also imports names from the parent explicitly.

    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (a depth-first search), as the path that closes it; None if acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    stack: list[str] = []

    def cycle_from(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*stack[stack.index(target):], target]
            if target not in state and (found := cycle_from(target)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := cycle_from(node)):
            return cycle
    return None


def test_the_cycle_search_finds_cycles_and_passes_acyclic_graphs():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert _find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None  # a diamond
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"x": {"y"}, "y": {"y"}}) == ["y", "y"]


def test_the_cycle_check_finds_a_cycle_through_type_checking(tmp_path):
    """The checker itself: a TYPE_CHECKING-only back edge is a cycle."""
    a = tmp_path / "a.py"
    a.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import B\n")
    modules = {"pkg.a": a, "pkg.b": tmp_path / "b.py"}
    assert _top_level_imports(a, "pkg.a", modules) == {"pkg.b"}


@pytest.mark.parametrize(
    "hook",
    [
        name
        for name, member in inspect.getmembers(__import__("sopkit").Strategy)
        if callable(member) and not name.startswith("_")
    ],
)
def test_every_strategy_hook_has_resolvable_type_hints(hook):
    import sopkit

    hints = typing.get_type_hints(getattr(sopkit.Strategy, hook))
    assert "return" in hints


def test_the_public_api_is_importable_from_the_top_level():
    import sopkit

    for name in ("expand", "collapse", "Strategy", "StrategySettings", "TrainConfig",
                 "RunContext", "TrainResult", "UserError", "fixed_mixing", "count_parameters"):
        assert getattr(sopkit, name) is not None, name
    # The README documents these paths for custom layers and pinning a sampler.
    import sopkit.majority

    assert isinstance(sopkit.majority.EXPANDABLE, dict)
    assert callable(sopkit.majority.find_majority)


def test_import_sopkit_does_not_import_torch():
    code = "import sys, sopkit, sopkit.cli, sopkit.errors; print('torch' in sys.modules)"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               check=True)
    assert completed.stdout.strip() == "False"


def test_every_cli_command_and_option_of_the_first_round_still_exists():
    """tests/data/cli-surface.json is the CLI as it was before the layout change (issue 10)."""
    import typer.main

    from sopkit.cli import app

    before = json.loads((ROOT / "tests/data/cli-surface.json").read_text())
    command = typer.main.get_command(app)
    for name, options in before.items():
        assert name in command.commands, f"command {name} is gone"
        now = set()
        for param in command.commands[name].params:
            if getattr(param, "param_type_name", "") == "argument":
                now.add(f"<{param.name}>")
            else:
                now.update(param.opts, param.secondary_opts)
        assert set(options) <= now, f"{name}: options gone: {sorted(set(options) - now)}"
