"""The package's import structure, read from the source with ``ast`` (nothing is imported).

Every import statement of every module under src/lawtune counts, wherever it stands: at the top, inside a function,
under ``try`` or ``if TYPE_CHECKING``. Relative imports are resolved to absolute names. Dynamic imports
(``importlib.import_module`` with a computed name, as the command registry does) are not seen.

The graph's nodes are modules: ``lawtune.x`` is ``lawtune/x/__init__.py`` when x is a package. Its edges:

* ``import lawtune.a.b`` and ``from lawtune.a.b import name`` import ``lawtune.a.b``; ``from lawtune.a import b``
  imports ``lawtune.a`` and, where ``b`` is a submodule (a file or folder beside ``a/__init__.py``), ``lawtune.a.b``
  too (``from . import b`` the same, relative to the importer).
* Importing ``lawtune.a.b`` runs ``lawtune/a/__init__.py`` first, so it is an edge to the package ``lawtune.a`` as well.
* An edge from a module to one of its own ancestor packages is left out (``lawtune.train.sft`` -> ``lawtune.train``
  or ``lawtune``): Python has already started importing every package above a module before the module runs, so
  such an import never starts a chain of imports of its own, whereas the package's ``__init__`` importing its
  submodule (``lawtune.train`` -> ``lawtune.train.sft``) is an ordinary edge.
* A module importing itself is left out too.

Rules checked: the graph has no cycle of any length; only ``lawtune.commands`` and its submodules, the dispatcher
``lawtune.cli`` and ``lawtune.__main__`` import ``lawtune.commands`` or anything in it; ``lawtune.think`` imports
nothing from lawtune.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "src" / "lawtune"
ROOT = "lawtune"


def module_name(path: Path, package_dir: Path = PACKAGE_DIR) -> str:
    parts = list(path.relative_to(package_dir).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([ROOT, *parts])


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def ancestors(module: str) -> list[str]:
    """``lawtune.a.b`` -> [``lawtune``, ``lawtune.a``]."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def internal(name: str) -> bool:
    return name == ROOT or name.startswith(ROOT + ".")


def imported_modules(path: Path, modules: set[str], package_dir: Path = PACKAGE_DIR) -> set[str]:
    """The lawtune modules ``path`` imports, by the rules of the module docstring (before leaving out ancestors)."""
    me = module_name(path, package_dir)
    # The package a relative import of level 1 is relative to: the module itself for an __init__.py.
    here = me if is_package(path) else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = here.split(".")
                if node.level - 1 >= len(parts):
                    raise AssertionError(f"{path}:{node.lineno}: relative import beyond the top package")
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            found.add(source)
            for alias in node.names:
                if f"{source}.{alias.name}" in modules:
                    found.add(f"{source}.{alias.name}")
    found = {name for name in found if internal(name)}
    # Importing lawtune.a.b runs lawtune/a/__init__.py on the way.
    return found | {parent for name in found for parent in ancestors(name)}


def import_graph(package_dir: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    """module -> the lawtune modules it imports (edges to its own ancestor packages and to itself left out)."""
    files = sorted(package_dir.rglob("*.py"))
    modules = {module_name(f, package_dir) for f in files}
    graph: dict[str, set[str]] = {}
    for f in files:
        me = module_name(f, package_dir)
        targets = imported_modules(f, modules, package_dir) - set(ancestors(me)) - {me}
        unknown = targets - modules
        assert not unknown, f"{me} imports lawtune modules that do not exist: {sorted(unknown)}"
        graph[me] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None; depth-first, in sorted order so the answer is stable."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    for start in sorted(graph):
        if colour[start] != WHITE:
            continue
        path = [start]
        stack = [iter(sorted(graph[start]))]
        colour[start] = GREY
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                colour[path.pop()] = BLACK
                stack.pop()
            elif colour.get(nxt, WHITE) == GREY:
                return path[path.index(nxt):] + [nxt]
            elif colour.get(nxt, WHITE) == WHITE:
                colour[nxt] = GREY
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def all_cycles_report(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles until none is left, each broken (its last edge removed from a copy) once found: every knot gets named."""
    g = {k: set(v) for k, v in graph.items()}
    found = []
    while (cycle := find_cycle(g)) is not None:
        found.append(cycle)
        g[cycle[-2]].discard(cycle[-1])
    return found


# ----------------------------------------------------------------------------- the checker itself


def test_find_cycle_finds_cycles_of_any_length():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    long = {"a": {"b"}, "b": {"c"}, "c": {"d"}, "d": {"e"}, "e": {"b"}, "x": {"a"}}
    assert find_cycle(long) == ["b", "c", "d", "e", "b"]
    # a diamond is not a cycle
    assert find_cycle({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}) is None
    assert all_cycles_report({"a": {"b"}, "b": {"a", "c"}, "c": {"d"}, "d": {"c"}}) == [["a", "b", "a"],
                                                                                    ["c", "d", "c"]]


def test_graph_rules_on_a_synthetic_package(tmp_path):
    pkg = tmp_path / "lawtune"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .child import thing\n")
    (pkg / "sub" / "child.py").write_text("from .. import other\nfrom . import sibling\nfrom lawtune.sub import x\n")
    (pkg / "sub" / "sibling.py").write_text("def f():\n    from ..other import g\n")
    (pkg / "other.py").write_text("import lawtune.sub.sibling\nimport os\n")
    graph = import_graph(pkg)
    assert graph == {
        "lawtune": set(),
        "lawtune.sub": {"lawtune.sub.child"},
        # lawtune.sub is its own ancestor: left out
        "lawtune.sub.child": {"lawtune.other", "lawtune.sub.sibling"},
        "lawtune.sub.sibling": {"lawtune.other"},  # the import inside a function counts
        # importing lawtune.sub.sibling runs lawtune/sub/__init__.py first
        "lawtune.other": {"lawtune.sub", "lawtune.sub.sibling"},
    }
    assert find_cycle(graph) == ["lawtune.other", "lawtune.sub", "lawtune.sub.child", "lawtune.other"]


# ----------------------------------------------------------------------------- lawtune


def test_no_import_cycles():
    cycles = all_cycles_report(import_graph())
    assert not cycles, "import cycles in lawtune:\n" + "\n".join("  " + " -> ".join(c) for c in cycles)


def test_only_the_cli_imports_commands():
    allowed = {"lawtune.cli", "lawtune.__main__"}
    offenders = {}
    for module, targets in import_graph().items():
        if module in allowed or module == "lawtune.commands" or module.startswith("lawtune.commands."):
            continue
        bad = sorted(t for t in targets if t == "lawtune.commands" or t.startswith("lawtune.commands."))
        if bad:
            offenders[module] = bad
    assert not offenders, f"library modules importing lawtune.commands: {offenders}"


def test_think_is_a_leaf():
    modules = {module_name(f) for f in PACKAGE_DIR.rglob("*.py")}
    # before ancestors are left out: not even ``import lawtune``
    assert imported_modules(PACKAGE_DIR / "think.py", modules) == set()
