"""No function in the service or the export is longer than a screen: a long body is named parts waiting to be
found. Counted from the `def` line to the function's last line, decorators left out."""

from __future__ import annotations

import ast

import pytest

from tests.helpers import ROOT

MAX_LINES = 60


def too_long(source: str, limit: int = MAX_LINES) -> list[tuple[str, int]]:
    """Each function (or method, nested ones included) of `source` over `limit` lines, with its length."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > limit:
                found.append((node.name, length))
    return found


def test_a_long_function_is_found() -> None:
    body = "\n".join(f"        x{i} = {i}" for i in range(MAX_LINES))
    assert too_long(f"def short():\n    pass\n\nclass C:\n    async def long(self):\n{body}\n") == [
        ("long", MAX_LINES + 1)
    ]


@pytest.mark.parametrize("package", ["service", "export"])
def test_no_function_is_longer_than_a_screen(package: str) -> None:
    found = {
        f"{path.relative_to(ROOT)}::{name}": length
        for path in sorted((ROOT / package).glob("*.py"))
        for name, length in too_long(path.read_text())
    }
    assert not found, f"functions over {MAX_LINES} lines: {found}"
