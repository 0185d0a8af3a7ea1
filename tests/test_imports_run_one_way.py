"""Imports run one way (docs/code.md): the shared basics import nothing above them,
receiving imports only the basics, recording receiving and the basics, and the read side,
operations and the simulation sit above those; no modules import each other in a circle.

Read from the source with `ast`, so an import inside a function counts too.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# A module may import from its own layer and the layers below it, never from above.
LAYERS = {
    "app.receiving": 1,
    "app.recording": 2,
    "app.reading": 3,
    "app.operations": 3,
    "app.simulation": 3,
    "app.main": 4,
    "app.cli": 4,
}


def layer(module: str) -> int:
    """0 for the shared basics (app/*.py), 5 for what lies outside app/ (bench/)."""
    if module.split(".")[0] != "app":
        return 5
    for prefix, number in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            return number
    return 0


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(root: Path = ROOT) -> dict[str, set[str]]:
    """Each module of app/ and bench/, and the modules of app/ and bench/ it imports."""
    found: dict[str, set[str]] = {}
    for path in sorted([*(root / "app").rglob("*.py"), *(root / "bench").rglob("*.py")]):
        named: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                named |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                named |= {f"{node.module}.{alias.name}" for alias in node.names}
        found[module_name(path)] = {n for n in named if n.split(".")[0] in ("app", "bench")}
    return found


def resolve(name: str, modules: set[str]) -> str | None:
    """The module that `name` (a module, or a name imported from one) is read from."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        {
            f"{module} imports {target}"
            for module, named in graph.items()
            for target in filter(None, (resolve(n, set(graph)) for n in named))
            if layer(target) > layer(module)
        }
    )


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each circle of imports between modules, found by a depth-first walk."""
    edges = {
        m: {t for n in named if (t := resolve(n, set(graph))) and t != m}
        for m, named in graph.items()
    }
    found, state = [], dict.fromkeys(graph, "new")

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(edges[module]):
            if state[target] == "open":
                found.append([*path[path.index(target) :], target])
            elif state[target] == "new":
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if state[module] == "new":
            visit(module, [module])
    return found


def test_no_module_imports_from_a_layer_above_its_own():
    graph = imports()
    assert "app.receiving.route" in graph and "app.recording.record" in graph  # it reads them
    assert upward(graph) == []


def test_no_modules_import_each_other_in_a_circle():
    assert circles(imports()) == []


def test_the_check_sees_an_import_that_runs_back_up_and_a_circle():
    graph = {
        "app.config": {"app.receiving.signing.FORMS"},
        "app.receiving.signing": {"app.config.FORMS"},
        "app.recording.record": {"app.receiving.signing"},
    }
    assert upward(graph) == ["app.config imports app.receiving.signing"]
    assert circles(graph) == [["app.config", "app.receiving.signing", "app.config"]]
