"""The floors of DESIGN.md hold: a package imports only from those below it, and no two modules
import each other (directly or round a longer loop) when they are loaded."""

import ast
from pathlib import Path

import tuili

FLOORS = ["kernels", "models", "data", "quant", "prune", "distill", "engine", "server", "pipeline", "cli"]
ROOT = Path(tuili.__file__).parent


def modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path, top_level_only: bool) -> list[tuple[int, str]]:
    """(line, module) of every `tuili.*` import in a file (with top_level_only: those run when it loads)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tuili"):
            found += [(node.lineno, node.module)]
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("tuili")]
    return found


def floor(module: str) -> int | None:
    parts = module.split(".")
    return FLOORS.index(parts[1]) if len(parts) > 1 and parts[1] in FLOORS else None


def test_no_package_imports_from_a_floor_above_it():
    upward = []
    for name, path in modules().items():
        here = floor(name)
        for line, target in imports(path, top_level_only=False):
            there = floor(target)
            if here is not None and there is not None and there > here:
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not upward, "\n".join(upward)


def test_no_import_cycle_between_modules():
    known = modules()
    graph = {
        name: {t for _, t in imports(path, top_level_only=True) if t in known and t != name}
        for name, path in known.items()
    }
    for package in [n for n in known if known[n].name == "__init__.py"]:
        graph[package] = {t for t in graph[package] if not t.startswith(package + ".")}  # a package loads its parts

    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert not cycles, "\n".join(cycles)
