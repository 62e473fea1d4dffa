"""Messages that say what to do: methods of an object held by reference, a name close to a
defined one, a run its own code failed (not offered for Resume), a value the store cannot write."""

from __future__ import annotations

from pathlib import Path

import pytest

from durable_monty_nb import Engine, UnknownNamesError, WorkflowFailed


class Table:
    """Not plain data: the workflow holds it by reference."""

    def __init__(self, n: int) -> None:
        self.rows = list(range(n))

    def head(self) -> list[int]:
        return self.rows[:5]


def load(n: int) -> Table:
    return Table(n)


def test_a_method_of_an_object_held_by_reference_says_where_it_can_run(sqlite_engine: Engine) -> None:
    with pytest.raises(WorkflowFailed) as failure:
        sqlite_engine.run("df = await load(1000)\ndf.head()", {"load": load}, key="head")
    text = str(failure.value)
    assert "AttributeError: head() is a method of an object held by reference" in text
    assert "Use it in a notebook function (def head_of(obj): return obj.head())" in text
    assert "after the cell, where the name holds the real object" in text
    assert "not a function of the namespace" not in text

    with pytest.raises(WorkflowFailed) as failure:
        sqlite_engine.run("df = await load(1000)\ndf.rows", {"load": load}, key="rows")
    assert ".rows is an attribute of an object held by reference" in str(failure.value)


def test_a_typo_suggests_the_defined_name(sqlite_engine: Engine) -> None:
    with pytest.raises(UnknownNamesError) as failure:
        sqlite_engine.run("df = await lod(5)\nn = lenn([1])", {"load": load}, key="typo")
    text = str(failure.value)
    assert "'lod' (line 1, did you mean 'load'?)" in text and "'lenn' (line 2, did you mean 'len'?)" in text
    with pytest.raises(UnknownNamesError) as failure:
        sqlite_engine.run("await quux(5)", {"load": load}, key="far")
    assert "did you mean" not in str(failure.value)  # nothing close: no guess


def test_an_integer_the_store_cannot_write_names_the_call_and_its_kind(sqlite_engine: Engine) -> None:
    def power(n: int) -> int:
        return 10**n

    with pytest.raises(WorkflowFailed) as failure:
        sqlite_engine.run("x = await power(5000)\n1", {"power": power}, key="big")
    text = str(failure.value)
    assert "the result of power() is an int of about 5,001 digits that the store cannot write as text" in text
    assert "call 0, power(5000)" in text
    assert "internal error" not in text
    # caught in the workflow like any failed call
    code = "try:\n    await power(5000)\nexcept Exception as e:\n    r = 'caught'\nr"
    assert sqlite_engine.run(code, {"power": power}, key="caught") == "caught"


def test_load_ext_does_not_offer_a_run_its_own_code_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from IPython.core.interactiveshell import InteractiveShell

    db = f"sqlite:///{tmp_path / 'left.db'}"
    engine = Engine(db)

    def broken(x: int) -> int:
        raise ValueError(f"no {x}")

    with pytest.raises(WorkflowFailed):
        engine.run("df = await load(10)\ndf.head()", {"load": load}, key="code-error")
    with pytest.raises(WorkflowFailed):
        engine.run("await broken(1)", {"broken": broken}, key="call-error")
    engine.close()
    monkeypatch.setenv("DURABLE_MONTY_DB", db)
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "durable_monty_nb")
    try:
        out = capsys.readouterr().out
        assert "call-error (failed" in out  # fix the function, run again: worth resuming
        assert "code-error" not in out  # fails the same way until the cell is edited
    finally:
        ip.run_line_magic("unload_ext", "durable_monty_nb")
