"""Count code lines of Python files: lines that are not blank, not comments and not inside a docstring.

Used to hold the config and CLI code to a budget (issue 26): ``python tools/count_code_lines.py`` counts the files
that hold lawtune's config schema and command line; any other paths may be given instead.
"""

from __future__ import annotations

import ast
import io
import sys
import tokenize
from pathlib import Path

CONFIG_AND_CLI = ["src/lawtune/config.py", "src/lawtune/cli.py", "src/lawtune/commands/__init__.py"]


def docstring_lines(tree: ast.AST) -> set[int]:
    """Line numbers covered by docstrings: a module's, a class's or a function's, and the string under a field."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if not isinstance(body, list):
            continue
        for stmt in body:
            if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str):
                lines.update(range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1))
    return lines


def code_lines(path: Path) -> int:
    text = path.read_text(encoding="utf-8")
    skip = docstring_lines(ast.parse(text))
    code: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                        tokenize.ENDMARKER):
            continue
        code.update(n for n in range(tok.start[0], tok.end[0] + 1) if n not in skip)
    return len(code)


def main(paths: list[str]) -> int:
    root = Path(__file__).resolve().parent.parent
    total = 0
    for name in paths or CONFIG_AND_CLI:
        path = Path(name) if Path(name).is_absolute() else root / name
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for file in files:
            n = code_lines(file)
            total += n
            print(f"{n:6d}  {file.relative_to(root)}")
    print(f"{total:6d}  total")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
