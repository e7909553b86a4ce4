"""The public API and the module structure: no import circle in the core, plugins on the public API only."""

from __future__ import annotations

import ast
from pathlib import Path

import gen3d

ROOT = Path(__file__).resolve().parents[1]


def imports_of(path: Path, package: str) -> set[str]:
    """Every module ``path`` imports, at any depth (function bodies and TYPE_CHECKING blocks too)."""
    module = package if path.name == "__init__.py" else f"{package}.{path.stem}"
    base = package  # modules here are one level deep
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level and node.module is None:  # from . import x: a submodule, or a name of the package
                for alias in node.names:
                    is_module = (ROOT / base / f"{alias.name}.py").exists()
                    found.add(f"{base}.{alias.name}" if is_module else base)
            elif node.level:
                found.add(f"{base}.{node.module}")
            elif node.module:
                found.add(node.module)
    found.discard(module)
    return found


def core_graph() -> dict[str, set[str]]:
    modules = {("gen3d" if p.name == "__init__.py" else f"gen3d.{p.stem}"): p for p in (ROOT / "gen3d").glob("*.py")}
    return {name: {m for m in imports_of(path, "gen3d") if m in modules} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_core_has_no_import_circle():
    graph = core_graph()
    assert "gen3d.config" in graph and "gen3d.plugins" not in graph["gen3d.config"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_check_can_fail():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_first_party_plugins_use_only_the_public_api():
    offenders = []
    for path in sorted((ROOT / "plugins").glob("*.py")):
        for name in imports_of(path, "gen3d_plugins"):
            if name.startswith("gen3d.") or name == "gen3d.api":
                offenders.append(f"{path.name}: {name}")
    assert not offenders, "plugins must import from the gen3d package only: " + ", ".join(offenders)


def test_the_example_third_party_plugin_uses_only_the_public_api():
    names = imports_of(ROOT / "tests" / "thirdparty" / "gen3d_example_plugin.py", "example")
    assert not [n for n in names if n.startswith("gen3d.")], names


def test_every_public_name_is_importable():
    assert "hookimpl" in gen3d.__all__ and "GuidanceInput" in gen3d.__all__ and "StageOutputs" in gen3d.__all__
    missing = [name for name in gen3d.__all__ if not hasattr(gen3d, name)]
    assert not missing
