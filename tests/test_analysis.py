"""Static analysis: which calls are awaited, which names come from the namespace, what is exported."""

from __future__ import annotations

import ast

import pytest

from durable_monty_nb import WorkflowCodeError
from durable_monty_nb.engine.analysis import analyze


def awaited_calls(code: str) -> dict[str, bool]:
    """Source text of each call -> whether the analysis says it is awaited."""
    info = analyze(code, batching=None)  # the spans of the code as written
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


@pytest.mark.parametrize(
    ("code", "fed"),
    [
        (
            "r = await gather(*[encode(f, quality=q) for f in files if f.ok])",
            "r = await __dm_gather__('encode', [((f, ), {'quality': q}) for (f) in (files) if (f.ok)])",
        ),
        (
            "r = await gather(*(f(k, v) for k, v in d.items() if len(k) > 1))",
            "r = await __dm_gather__('f', [((k, v, ), {}) for (k, v) in (d.items()) if (len(k) > 1)])",
        ),
        (
            "import asyncio\nr = await asyncio.gather(*[f(i + 1) for i in range(3)])",
            "import asyncio\nr = await __dm_gather__('f', [((i + 1, ), {}) for (i) in (range(3))])",
        ),
    ],
)
def test_gathered_comprehensions_of_notebook_calls_become_one_host_call(code: str, fed: str) -> None:
    info = analyze(code)
    assert (info.fed, info.batched) == (fed, 1)
    assert "f" in info.free_names or "encode" in info.free_names  # names are the user's code's


@pytest.mark.parametrize(
    "code",
    [
        "r = await gather(*[f(g(i)) for i in xs])",  # an argument calls a function
        "r = await gather(*[f(i) for i in load()])",  # so does a clause
        "f = pick()\nr = await gather(*[f(i) for i in xs])",  # a name the workflow binds
        "async def h(i):\n    return await f(i)\nr = await gather(*[h(i) for i in xs])",  # a helper
        "r = await gather(*[f(i) for i in xs], g(1))",  # a mixed gather
        "r = await gather(*[f(*a) for a in xs])",  # starred arguments
        "t = gather(*[f(i) for i in xs])\nr = await t",  # not awaited where it is built
        "r = await gather(*[f(i) if i else g(i) for i in xs])",  # not one function
    ],
)
def test_other_gathers_keep_the_call_by_call_path(code: str) -> None:
    info = analyze(code)
    assert (info.fed, info.batched) == (code, 0)


def test_a_batched_gather_keeps_every_line_where_it_was() -> None:
    code = "x = 1\nr = await gather(*[\n    f(i,\n      k=i)\n    for i in xs\n])\ny = fail(r)\n"
    info = analyze(code)
    assert info.batched == 1
    assert len(info.fed.splitlines()) == len(code.splitlines())
    assert info.fed.splitlines()[6] == "y = fail(r)"
    assert info.is_awaited(*_span_of(info.fed, "fail(r)")) is False


def _span_of(code: str, text: str) -> tuple[int, int]:
    start = code.encode().index(text.encode())
    return start, start + len(text.encode())
