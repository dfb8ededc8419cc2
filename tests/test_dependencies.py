"""Every third-party module the package imports (inside functions too) is a declared dependency of lawtune: a
missing one would work on a developer's machine, where it came along with something else, and fail for a user."""

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "lawtune"


def _imported_top_level_modules(root: Path) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "lawtune":
                    found.setdefault(top, set()).add(path.relative_to(root).as_posix())
    return found


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def undeclared(root: Path) -> list[str]:
    """Modules imported under ``root`` that no requirement of lawtune provides (extras: the gpu extra's only)."""
    declared = {_normal(re.split(r"[ ;<>=!~\[]", req, maxsplit=1)[0]): req for req in metadata.requires("lawtune") or []}
    distributions = metadata.packages_distributions()
    missing = []
    for module, where in sorted(_imported_top_level_modules(root).items()):
        dists = [_normal(d) for d in distributions.get(module, [module])]
        requirement = next((declared[d] for d in dists if d in declared), None)
        # an optional extra's module may be imported only where its feature is asked for: the gpu extra's
        if requirement is None or ("extra ==" in requirement and module not in ("liger_kernel", "triton")):
            missing.append(f"{module} (imported in {', '.join(sorted(where))})")
    return missing


def test_every_imported_module_is_a_declared_dependency():
    missing = undeclared(PACKAGE)
    assert not missing, "imported but not declared in pyproject.toml's dependencies: " + "; ".join(missing)


def test_the_check_sees_a_module_that_is_not_declared(tmp_path):
    (tmp_path / "a.py").write_text("import yaml\n\ndef f():\n    import pytest\n", encoding="utf-8")
    # pyyaml is a dependency; pytest only a dev extra, never there for a user
    assert [m.split()[0] for m in undeclared(tmp_path)] == ["pytest"]
