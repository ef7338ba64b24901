"""The import graph points one way: core ← generation ← training ← commands ← experiments ← CLI, with no
cycle, deferred imports (inside functions, under TYPE_CHECKING) included."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
# a module's layer by its name under dpokit; everything not listed is the core (config, data, models, ...)
LAYERS = {"cli": 5, "__main__": 5, "experiments": 4, "pipeline": 3, "estimate": 3, "validate": 3, "methods": 2,
          "trainer": 2, "generation": 1}


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__"): p
            for p in (SRC / "dpokit").rglob("*.py")}


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], 0) if len(parts) > 1 else 0


def _imports() -> dict[str, set[str]]:
    modules = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dpokit"):
                targets |= {resolve(f"{node.module}.{a.name}") for a in node.names}
            elif isinstance(node, ast.Import):
                targets |= {resolve(a.name) for a in node.names if a.name.startswith("dpokit")}
        graph[module] = {t for t in targets if t and t not in (module, "dpokit")}  # the package root is the facade
    return graph


def test_no_import_runs_back_up_a_layer():
    graph = _imports()
    up = sorted(f"{m} -> {t}" for m, ts in graph.items() if m != "dpokit" for t in ts if _layer(t) > _layer(m))
    assert up == []


def test_no_import_cycle():
    graph, seen, done, cycles = _imports(), set(), set(), []

    def visit(module: str, path: list[str]) -> None:
        seen.add(module)
        for target in graph[module]:
            if target in path:
                cycles.append(path[path.index(target):] + [target])
            elif target not in done and target not in seen:
                visit(target, path + [target])
        done.add(module)

    for module in graph:
        if module not in done:
            visit(module, [module])
    assert cycles == []
