"""The house rules, checked on the source: floors (a module imports only from its own floor or
below), no import circles, no private name imported across modules, no Dagster outside defs/,
no module past 800 lines. docs/layout.md describes the same floors."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "neuron_assets"

# From the ground up. A top-level module or package of neuron_assets sits on exactly one floor.
FLOORS = [
    {"types", "config", "store", "runtime", "llm", "builtin_models", "progress", "failures", "lock",
     "tokenize_pool", "excerpts", "markdown", "finetune", "numeric"},
    {"corpus", "subject", "features", "embedding", "validate"},
    {"exemplars"},
    {"explain"},
    {"simulate"},
    {"score"},
    {"distill"},
    {"search", "clusters", "description_index"},
    {"steer"},
    {"stages", "plan", "checks"},
    {"report", "serve", "export"},
    {"defs"},
    {"cli"},
]
FLOOR = {name: level for level, names in enumerate(FLOORS) for name in names}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


MODULES = _modules()


def _imports(module: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, the names taken from it, line) for every import of the package, at any depth."""
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names if alias.name.startswith("neuron_assets")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                stem = base[: len(base) - (node.level - 1)]
                target = ".".join(stem + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("neuron_assets"):
                found.append((target, [alias.name for alias in node.names], node.lineno))
    return found


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_every_top_level_module_has_a_floor():
    tops = {_top(m) for m in MODULES if m != "neuron_assets"}
    assert tops - set(FLOOR) == set(), "give these a floor in FLOORS (and in docs/layout.md)"


def test_nothing_is_imported_from_a_higher_floor():
    upward = []
    for module, path in MODULES.items():
        if module == "neuron_assets":
            continue
        for target, _, line in _imports(module, path):
            if target == "neuron_assets":
                continue
            if FLOOR[_top(target)] > FLOOR[_top(module)]:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert upward == []


def test_no_import_circles():
    def resolve(name: str) -> str | None:
        while name:
            if name in MODULES:
                return name
            name = name.rpartition(".")[0]
        return None

    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for target, names, _ in _imports(module, path):
            for candidate in [f"{target}.{n}" for n in names] + [target]:
                found = resolve(candidate)
                # a package's __init__ importing its own submodules is not a cycle edge
                if found and found != module and not (path.name == "__init__.py" and found.startswith(module + ".")):
                    graph[module].add(found)
    # a module in a cycle reaches itself
    cycles = set()
    for start in graph:
        seen, todo = set(), list(graph[start])
        while todo:
            node = todo.pop()
            if node == start:
                cycles.add(start)
                break
            if node not in seen:
                seen.add(node)
                todo += graph[node]
    assert sorted(cycles) == []


def test_no_private_name_is_imported_across_modules():
    private = [f"{path.relative_to(PACKAGE.parent)}:{line} takes {name} from {target}"
               for module, path in MODULES.items() for target, names, line in _imports(module, path)
               for name in names if name.startswith("_") and not name.startswith("__")]
    assert private == []


def test_dagster_is_imported_only_in_defs():
    outside = []
    for module, path in MODULES.items():
        if _top(module) in ("defs", "cli"):
            continue  # the CLI starts Dagster runs, importing it inside its commands
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            outside += [f"{module}: {n}" for n in names if n.split(".")[0].startswith("dagster")]
    assert outside == []


def test_no_module_past_800_lines():
    long = {str(path.relative_to(PACKAGE.parent)): n for path in MODULES.values()
            if (n := len(path.read_text().splitlines())) > 800}
    assert long == {}
