"""Static analysis: which calls are awaited, which names come from the namespace, what is exported."""

from __future__ import annotations

import ast

import pytest

from durable_monty_nb import WorkflowCodeError
from durable_monty_nb.engine.analysis import analyze


def awaited_calls(code: str) -> dict[str, bool]:
    """Source text of each call -> whether the analysis says it is awaited."""
    info = analyze(code)
    raw = code.encode()
    found = {}
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id != "gather":
            lines = [0]
            for line in raw.splitlines(keepends=True):
                lines.append(lines[-1] + len(line))
            start = lines[node.lineno - 1] + node.col_offset
            end = lines[node.end_lineno - 1] + node.end_col_offset
            found[raw[start:end].decode()] = info.is_awaited(start, end)
    return found


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("x = await f(1)", {"f(1)": True}),
        ("y = f(1)", {"f(1)": False}),
        ("r = await gather(f(1), g(2))", {"f(1)": True, "g(2)": True}),
        ("r = await gather(*[f(i) for i in xs])", {"f(i)": True}),
        ("r = await gather(*(f(i) for i in xs))", {"f(i)": True}),
        ("tasks = [f(i) for i in xs]\nr = await gather(*tasks)", {"f(i)": True}),
        ("tasks = []\nfor i in xs:\n    tasks.append(f(i))\nr = await gather(*tasks)", {"f(i)": True}),
        ("t = f(1)\nr = await t", {"f(1)": True}),
        ("r = await f(g(1))", {"f(g(1))": True, "g(1)": False}),
        ("n = len(xs)\nr = [h(i) for i in range(n)]", {"len(xs)": False, "range(n)": False, "h(i)": False}),
        (
            "async def k(i):\n    return await f(i) + g(i)\nr = await gather(*[k(i) for i in xs])",
            {"f(i)": True, "g(i)": False, "k(i)": True},
        ),
        ("import asyncio\nr = await asyncio.gather(f(1))", {"f(1)": True}),
    ],
)
def test_call_classification(code: str, expected: dict[str, bool]) -> None:
    assert awaited_calls(code) == expected


def test_classification_uses_utf8_byte_offsets() -> None:
    code = 'label = "héllo wörld"\nx = await f(label)\ny = g(1)'
    assert awaited_calls(code) == {"f(label)": True, "g(1)": False}


def test_free_names_exclude_everything_bound_in_the_code() -> None:
    code = """
import math
total = 0
def helper(a, *rest, key=None):
    local = a + offset
    return [local + i for i in rest]
for item in items:
    total = total + helper(item)
squares = {k: v for k, v in pairs}
if (n := len(items)) > 0:
    print(n, math.pi, missing_value)
try:
    pass
except ValueError as err:
    print(err)
"""
    info = analyze(code)
    assert info.free_names == {"offset": 5, "items": 7, "pairs": 9, "missing_value": 11}


def test_exports_are_top_level_assignments_only() -> None:
    code = "import math\na = 1\ndef f():\n    inner = 2\nb, (c, d) = 1, (2, 3)\nfor e in []:\n    pass\n"
    code += "class K:\n    pass\n"
    assert analyze(code).exports == ["a", "b", "c", "d", "e"]


def test_syntax_error_reports_the_line() -> None:
    with pytest.raises(WorkflowCodeError) as info:
        analyze("x = 1\nif x\n    y = 2\n")
    assert info.value.line == 2
