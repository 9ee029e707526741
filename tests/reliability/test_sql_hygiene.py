"""SQL only through SQLAlchemy constructs: no statement text is ever built from values."""

from __future__ import annotations

import ast
from pathlib import Path

import poller

RAW_SQL_CALLS = {"text", "exec_driver_sql", "execute", "executescript"}


def _built_strings(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        name = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
        first = node.args[0]
        built = isinstance(first, ast.JoinedStr | ast.BinOp) or (
            isinstance(first, ast.Call) and getattr(first.func, "attr", None) == "format"
        )
        if name in RAW_SQL_CALLS and built:
            found.append((node.lineno, ast.unparse(first)))
    return found


def test_no_statement_is_built_from_strings_in_the_poller_package() -> None:
    offenders = {
        str(path): _built_strings(ast.parse(path.read_text()))
        for path in Path(poller.__file__).parent.rglob("*.py")
    }
    assert {path: found for path, found in offenders.items() if found} == {}


def test_the_check_recognises_a_string_built_statement() -> None:
    sample = 'connection.execute(text(f"SELECT * FROM t WHERE id = {x}"))\n'
    assert _built_strings(ast.parse(sample)) == [(1, "f'SELECT * FROM t WHERE id = {x}'")]
