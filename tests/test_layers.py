"""The package's layers, read from the source: `verl_ext.core` imports nothing of this project
outside itself and none of verl, Ray, hydra or vLLM; no two modules import each other, directly or
around a cycle (imports inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("verl", "ray", "hydra", "omegaconf", "vllm")


def module_files() -> dict[str, Path]:
    files = {}
    for path in [*REPO.glob("verl_ext/**/*.py"), *REPO.glob("recipe/**/*.py")]:
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        files[name.removesuffix(".__init__")] = path
    return files


def imported_names(path: Path) -> set[str]:
    """Every absolute import of the file: modules, and `module.name` for each `from module import name`."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def project_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (a package's own parents excluded: importing
    `verl_ext.core.rng` runs `verl_ext/core/__init__.py`, which is not a dependency the other way)."""
    files = module_files()
    graph = {}
    for module, path in files.items():
        deps = {n for n in imported_names(path) if n in files}
        graph[module] = {d for d in deps if d != module and not module.startswith(d + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_core_imports_nothing_above_it():
    files = module_files()
    core = {m: p for m, p in files.items() if m == "verl_ext.core" or m.startswith("verl_ext.core.")}
    assert {"verl_ext.core.distributions", "verl_ext.core.rng", "verl_ext.core.sampling"} <= set(core)
    upward = {}
    for module, path in core.items():
        names = imported_names(path)
        bad = {n for n in names if n.startswith(("verl_ext.", "recipe.")) and not n.startswith("verl_ext.core")}
        bad |= {n for n in names if n.split(".")[0] in FRAMEWORKS}
        if bad:
            upward[module] = sorted(bad)
    assert not upward, f"verl_ext.core must stay a bottom layer; these imports reach above it: {upward}"


def test_the_import_graph_has_no_cycles():
    assert cycles(project_graph()) == [], "modules importing each other (directly or around a loop)"


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
