"""Property: random workflow shapes give the same result durably as under plain asyncio."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from durable_monty_nb import Engine
from durable_monty_nb.engine.analysis import analyze


async def fa(x: int) -> int:
    await asyncio.sleep(0)
    return (x * 3 + 1) % 1000


def fs(x: int) -> int:
    return x + 7


async def fail(x: int) -> int:
    raise ValueError(f"failed on {x}")


async def fk(x: int, k: int = 0) -> int:
    return x * 10 + k


async def maybe(x: int) -> int:
    await asyncio.sleep(0)
    if x % 4 == 3:
        raise ValueError("bad")
    return x


NAMESPACE = {"fa": fa, "fs": fs, "fail": fail, "fk": fk, "maybe": maybe}
HELPER = "async def helper(i):\n    parts = await gather(*[fa(i + j) for j in range(2)])\n    return fs(sum(parts))\n"


@st.composite
def programs(draw: st.DrawFn) -> str:
    lines = [HELPER]
    names: list[str] = []
    for index in range(draw(st.integers(1, 6))):
        name = f"v{index}"
        arg = draw(st.sampled_from([*names, "1", "2", "5"])) if names else draw(st.sampled_from(["1", "2", "5"]))
        n = draw(st.integers(0, 4))
        shape = draw(
            st.sampled_from(
                [
                    *("await", "sync", "gather", "helpers", "loop", "branch", "caught", "nested"),
                    *("keywords", "generator", "failing", "calling", "two"),  # gathered comprehensions
                ]
            )
        )
        if shape == "await":
            lines.append(f"{name} = await fa({arg})")
        elif shape == "sync":
            lines.append(f"{name} = fs({arg})")
        elif shape == "gather":
            lines.append(f"{name} = sum(await gather(*[fa(i + {arg}) for i in range({n})]))")
        elif shape == "helpers":
            lines.append(f"{name} = sum(await gather(*[helper(i) for i in range({n})]))")
        elif shape == "loop":
            lines.append(f"{name} = 0\nfor i in range({n}):\n    {name} = {name} + await fa(i + {arg})")
        elif shape == "branch":
            lines.append(f"if {arg} % 2 == 0:\n    {name} = await fa({arg})\nelse:\n    {name} = fs({arg})")
        elif shape == "caught":
            lines.append(f"try:\n    {name} = await fail({arg})\nexcept ValueError as e:\n    {name} = len(str(e))")
        elif shape == "keywords":  # one host call: a filter, keywords, a tuple target
            lines.append(
                f"{name} = sum(await gather(*[fk(i + j, k={arg}) for i, j in zip(range({n}), range(2, 9)) if i != 1]))"
            )
        elif shape == "generator":
            lines.append(f"{name} = sum(await gather(*(fa(i * {arg}) for i in range({n}))))")
        elif shape == "failing":  # the first failure reaches the except; the other calls go on
            lines.append(
                f"try:\n    {name} = sum(await gather(*[maybe(i + {arg}) for i in range({n})]))\n"
                f"except ValueError as e:\n    {name} = len(str(e)) + 100"
            )
        elif shape == "calling":  # an argument calls a function: call by call
            lines.append(f"{name} = sum(await gather(*[fa(fs(i)) for i in range({n})]))")
        elif shape == "two":  # two gathers, the second reading the first's results
            lines.append(
                f"first = await gather(*[fa(i + {arg}) for i in range({n})])\n"
                f"{name} = sum(await gather(*[fk(x, k=x) for x in first if x % 2]))"
            )
        else:
            lines.append(f"tasks = [fa({arg}), fa(fs({arg}))]\n{name} = sum(await gather(*tasks))")
        names.append(name)
    lines.append(f"({', '.join(names)},)")
    return "\n".join(lines)


def reference(code: str) -> Any:
    """The same code as a coroutine under plain asyncio."""
    body, last = code.rsplit("\n", 1)
    source = "async def __main():\n" + textwrap.indent(f"{body}\nreturn {last}", "    ")
    scope: dict[str, Any] = {**NAMESPACE, "gather": asyncio.gather}
    exec(compile(source, "<reference>", "exec"), scope)
    return asyncio.run(scope["__main"]())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(code=programs())
def test_random_workflows_match_plain_asyncio(code: str, tmp_path: Path) -> None:
    engine = Engine(tmp_path / "property.db")
    try:
        assert engine.run(code, NAMESPACE) == reference(code), code
        assert analyze(code).batched >= 1  # the helper's gather, at least, is one host call
    finally:
        engine.close()
