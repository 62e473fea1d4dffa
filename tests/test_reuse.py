"""Exact reuse through %%durable in a real IPython shell: after each kind of notebook edit, a re-run
returns what a plain run returns (never a result computed from what the notebook no longer holds),
an unchanged re-run still reuses every call, and %durable_why says why."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from IPython.core.interactiveshell import InteractiveShell

BODY = "out = await gather(*[f(x) for x in items])\nout"
PLAIN = "[f(x) for x in items]"


@pytest.fixture
def shell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[InteractiveShell]:
    monkeypatch.setenv("DURABLE_MONTY_DB", f"sqlite:///{tmp_path / 'reuse.db'}")
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "durable_monty_nb")
    run(ip, "ran = []\nitems = [1, 2, 3]")
    yield ip
    ip.run_line_magic("unload_ext", "durable_monty_nb")
    for name in list(ip.user_ns):
        if not name.startswith("_") and name not in ("In", "Out", "exit", "quit", "get_ipython"):
            ip.user_ns.pop(name, None)


def run(shell: InteractiveShell, code: str) -> Any:
    result = shell.run_cell(code)
    assert result.success, result.error_in_exec or result.error_before_exec
    return result.result


def durable(shell: InteractiveShell, name: str, body: str = BODY, options: str = "") -> Any:
    return run(shell, f"%%durable {name} --quiet {options}\n{body}")


def plain(shell: InteractiveShell, expression: str = PLAIN) -> Any:
    """What the notebook computes without durable (its calls are not counted)."""
    run(shell, f"_plain_value = {expression}")  # a cell: %autoreload reloads before it, as before any cell
    value = shell.user_ns.pop("_plain_value")
    shell.user_ns["ran"].clear()
    return value


def ran(shell: InteractiveShell) -> list[Any]:
    return shell.user_ns["ran"]


def edited(
    shell: InteractiveShell, name: str, setup: str, edit: str, *, body: str = BODY, expected: str = PLAIN
) -> Any:
    """Run, edit, run again: the second run equals a plain run and ran its calls again; a third,
    unchanged, runs nothing. Returns the explanation of the second run."""
    run(shell, setup)
    assert durable(shell, name, body) == plain(shell, expected)
    run(shell, edit)
    want = plain(shell, expected)
    ran(shell).clear()
    assert durable(shell, name, body) == want
    assert ran(shell), "the edit changed what the calls read: they must run again"
    why = shell.run_line_magic("durable_why", name)
    ran(shell).clear()
    assert durable(shell, name, body) == want
    assert ran(shell) == []  # nothing changed since: every call is reused
    return why


def test_a_global_dict_mutated_in_place(shell: InteractiveShell) -> None:
    setup = "CFG = {'scale': 2}\ndef f(x):\n    ran.append(x)\n    return x * CFG['scale']"
    why = edited(shell, "dict", setup, "CFG['scale'] = 3")
    assert [c.outcome for c in why.calls] == ["ran"] * 3
    assert why.call("f").reason == "f changed: global CFG changed"


def test_a_global_list_extended_and_rebound(shell: InteractiveShell) -> None:
    setup = "W = [1, 2]\ndef f(x):\n    ran.append(x)\n    return x * sum(W)"
    edited(shell, "list", setup, "W.append(3)")  # in place
    edited(shell, "list", "pass", "W = [5]")  # rebound


def test_a_numpy_array_changed_in_place(shell: InteractiveShell) -> None:
    setup = (
        "import numpy as np\nA = np.arange(300_000, dtype=float)\n"
        "def f(x):\n    ran.append(x)\n    return float(A.sum()) + x"
    )
    why = edited(shell, "array", setup, "A[7] = -1.0")
    assert "global A changed" in why.call("f").reason


def test_a_pandas_frame_read_by_the_function_changed_in_place(shell: InteractiveShell) -> None:
    setup = (
        "import pandas as pd\nDF = pd.DataFrame({'v': [1.0, 2.0, 3.0]})\n"
        "def f(x):\n    ran.append(x)\n    return float(DF['v'].sum()) * x"
    )
    edited(shell, "frame", setup, "DF.loc[1, 'v'] = 10.0")


def test_a_frame_the_cell_passes_as_an_argument_changed_in_place(shell: InteractiveShell) -> None:
    setup = (
        "import pandas as pd\nframe = pd.DataFrame({'v': [1.0, 2.0]})\n"
        "def total(df):\n    ran.append(1)\n    return float(df['v'].sum())"
    )
    edited(shell, "argument", setup, "frame.loc[0, 'v'] = 5.0", body="await total(frame)", expected="total(frame)")


def test_a_notebook_class_edited_and_its_instance_recreated(shell: InteractiveShell) -> None:
    setup = (
        "class Model:\n    def __init__(self, k):\n        self.k = k\n"
        "    def go(self, x):\n        return x * self.k\n"
        "model = Model(2)\ndef f(x):\n    ran.append(x)\n    return model.go(x)"
    )
    edit = (
        "class Model:\n    def __init__(self, k):\n        self.k = k\n    def go(self, x):\n"
        "        return x * self.k + 1\nmodel = Model(2)"
    )
    why = edited(shell, "class", setup, edit)
    assert "global model changed" in why.call("f").reason


def test_an_instance_of_a_notebook_class_passed_as_an_argument_after_its_class_changed(shell: InteractiveShell) -> None:
    setup = (
        "class Box:\n    def __init__(self, v):\n        self.v = v\n    def get(self):\n        return self.v\n"
        "box = Box(4)\ndef use(b):\n    ran.append(1)\n    return b.get()"
    )
    edit = (
        "class Box:\n    def __init__(self, v):\n        self.v = v\n    def get(self):\n        return self.v * 10\n"
        "box = Box(4)"
    )
    edited(shell, "received", setup, edit, body="await use(box)", expected="use(box)")


def test_a_dataclass_attribute_read_through_the_instance(shell: InteractiveShell) -> None:
    setup = (
        "from dataclasses import dataclass\n@dataclass\nclass Config:\n    scale: float = 2.0\n"
        "CONFIG = Config()\ndef f(x):\n    ran.append(x)\n    return x * CONFIG.scale"
    )
    edited(shell, "dataclass", setup, "CONFIG.scale = 5.0")


def test_a_rebound_constant_an_edited_helper_and_a_changed_cell_input(shell: InteractiveShell) -> None:
    setup = "K = 2\ndef h(x):\n    return x + K\ndef f(x):\n    ran.append(x)\n    return h(x) * 10"
    edited(shell, "helper", setup, "K = 3")
    why = edited(shell, "helper", "pass", "def h(x):\n    return x - K")
    assert why.call("f").reason == "f changed: the code of h changed"
    edited(shell, "helper", "pass", "items = [1, 2, 5]")


def test_closure_and_default_values(shell: InteractiveShell) -> None:
    setup = "def make(k):\n    def f(x):\n        ran.append(x)\n        return x * k\n    return f\nf = make(2)"
    why = edited(shell, "closure", setup, "f = make(7)")
    assert why.call("f").reason == "f changed: closure variable k changed"
    setup = "D = [1]\ndef f(x, d=D):\n    ran.append(x)\n    return x * sum(d)"
    edited(shell, "default", setup, "D.append(4)")  # the default is the list object: changed in place


def test_a_local_module_edited_on_disk_and_reloaded(shell: InteractiveShell, tmp_path: Path) -> None:
    module = tmp_path / "reuse_helpers_mod.py"
    module.write_text("def g(x):\n    return x + 1\n")
    sys.path.insert(0, str(tmp_path))
    try:
        setup = "import reuse_helpers_mod as helpers\ndef f(x):\n    ran.append(x)\n    return helpers.g(x)"
        module_text = "def g(x):\n    return x + 1000\n"  # another size: the bytecode cache sees the edit
        edit = f"from pathlib import Path\nPath({str(module)!r}).write_text({module_text!r})\nimport importlib\n"
        edit += "importlib.reload(helpers)"
        why = edited(shell, "module", setup, edit)
        assert why.call("f").reason == "f changed: the code of helpers.g changed"
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("reuse_helpers_mod", None)
        importlib.invalidate_caches()


def test_a_global_counter_the_function_updates_is_its_own_state(shell: InteractiveShell) -> None:
    run(
        shell, "calls = 0\nseen = {}\ndef f(x):\n    global calls\n    calls += 1\n    seen[x] = True\n    return x * 2"
    )
    assert durable(shell, "counter") == [2, 4, 6]
    assert shell.user_ns["calls"] == 3
    again = durable(shell, "counter")
    assert again == [2, 4, 6] and shell.user_ns["calls"] == 3  # nothing ran: the stored result
    run(shell, "items = [1, 2, 3, 4]")
    assert durable(shell, "counter") == [2, 4, 6, 8]
    assert shell.user_ns["calls"] == 4  # only the new item ran
    why = shell.run_line_magic("durable_why", "counter")
    assert [c.outcome for c in why.calls] == ["reused", "reused", "reused", "ran"]


def test_a_value_that_cannot_be_hashed_makes_its_calls_run_every_time(shell: InteractiveShell, tmp_path: Path) -> None:
    run(shell, f"log = open({str(tmp_path / 'log.txt')!r}, 'a')\ndef f(x):\n    ran.append(x)\n    return x * 2")
    run(shell, "def g(x):\n    ran.append(x)\n    log.write(str(x))\n    return x * 3")
    body = "a = await gather(*[f(x) for x in items])\nb = await gather(*[g(x) for x in items])\na + b"
    assert durable(shell, "unhashable", body) == [2, 4, 6, 3, 6, 9]
    ran(shell).clear()
    assert durable(shell, "unhashable", body) == [2, 4, 6, 3, 6, 9]
    assert sorted(ran(shell)) == [1, 2, 3]  # g ran again, f was reused
    why = shell.run_line_magic("durable_why", "unhashable")
    assert why.call("f").outcome == "reused"
    reason = why.call("g").reason
    assert "global log.write is a _io.TextIOWrapper" in reason and "its calls run every time" in reason
    run(shell, "log.close()")


def test_durable_why_in_a_terminal_shows_reused_and_rerun_calls(
    shell: InteractiveShell, capsys: pytest.CaptureFixture[str]
) -> None:
    run(shell, "K = 1\ndef f(x):\n    ran.append(x)\n    return x * 2\ndef g(x):\n    return x + K")
    body = "a = await gather(*[f(x) for x in items])\nb = await gather(*[g(x) for x in a])\nb"
    durable(shell, "table", body)
    first = durable(shell, "table", body, "--rerun-fn g")  # Python API: rerun_functions=["g"]
    assert first == [3, 5, 7]
    run(shell, "K = 10")
    assert durable(shell, "table", body) == [12, 14, 16]
    capsys.readouterr()
    run(shell, "%durable_why table")
    text = capsys.readouterr().out
    lines = [line for line in text.splitlines() if line.startswith(("1 ", "4 "))]
    assert len(lines) == 2, text
    assert "f" in lines[0] and "reused" in lines[0] and "the same function, inputs and arguments as in" in lines[0]
    assert "g" in lines[1] and "ran" in lines[1] and "g changed: global K changed" in lines[1]
    html = shell.run_line_magic("durable_why", "table")._repr_html_()
    assert "<table>" in html and "g changed: global K changed" in html and "<td>reused</td>" in html


def test_rerun_fn_runs_one_functions_calls_again(shell: InteractiveShell) -> None:
    run(shell, "def f(x):\n    ran.append(('f', x))\n    return x\ndef g(x):\n    ran.append(('g', x))\n    return -x")
    body = "a = await gather(*[f(x) for x in items])\nawait gather(*[g(x) for x in a])"
    assert durable(shell, "one", body) == [-1, -2, -3]
    ran(shell).clear()
    assert durable(shell, "one", body, "--rerun-fn g") == [-1, -2, -3]
    assert sorted(ran(shell)) == [("g", 1), ("g", 2), ("g", 3)]
    why = shell.run_line_magic("durable_why", "one")
    assert why.call("g").reason == "re-run on request (--rerun-fn g)" and why.call("f").outcome == "reused"
    result = shell.run_cell("%%durable one --quiet --rerun-fn nope\n" + body)
    assert not result.success and "cannot re-run the calls of 'nope'" in str(result.error_in_exec)


def test_a_failed_cell_whose_input_was_fixed_gets_past_the_failure(shell: InteractiveShell) -> None:
    run(shell, "LIMIT = 2")
    run(shell, "def f(x):\n    ran.append(x)\n    if x > LIMIT:\n        raise ValueError(f'{x} over')\n    return x")
    result = shell.run_cell(f"%%durable fix --quiet\n{BODY}")
    assert not result.success and "3 over" in str(result.error_in_exec)
    run(shell, "LIMIT = 5")
    ran(shell).clear()
    assert durable(shell, "fix") == [1, 2, 3]
    assert sorted(ran(shell)) == [1, 2, 3]  # f changed (it reads LIMIT): its calls ran again
    why = shell.run_line_magic("durable_why", "fix")
    assert any("was failed; it was not resumed because function f changed" in d for d in why.decisions)


def test_the_why_command_prints_the_same_table(shell: InteractiveShell, tmp_path: Path) -> None:
    import subprocess

    run(shell, "K = 1\ndef f(x):\n    ran.append(x)\n    return x + K")
    durable(shell, "cli")
    run(shell, "items = [1, 2, 4]")
    durable(shell, "cli")
    key = shell.run_line_magic("durable_why", "cli").execution_id
    done = subprocess.run(
        [sys.executable, "-m", "durable_monty_nb", "why", "--db", str(tmp_path / "reuse.db"), key],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "2 calls reused, 1 ran here" in done.stdout
    assert "new arguments: argument 0: 3 -> 4" in done.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "durable_monty_nb", "why", "--db", str(tmp_path / "reuse.db"), "nope"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 1 and "no execution named or with id 'nope'" in missing.stderr


def test_what_a_function_reads_of_an_object_that_cannot_be_hashed_and_locks(
    shell: InteractiveShell, tmp_path: Path
) -> None:
    setup = (
        "import threading\nclass Client:\n    def __init__(self):\n"
        f"        self.log = open({str(tmp_path / 'c.txt')!r}, 'a')\n"
        "        self.timeout = 5\nclient = Client()\nguard = threading.Lock()\n"
        "def f(x):\n    ran.append(x)\n    with guard:\n        return x * client.timeout"
    )
    why = edited(shell, "attributes", setup, "client.timeout = 7")
    assert why.call("f").reason == "f changed: global client.timeout changed"
    run(shell, "client.log.close()")


def test_autoreload_of_a_local_module(shell: InteractiveShell, tmp_path: Path) -> None:
    module = tmp_path / "reuse_auto_mod.py"
    module.write_text("def g(x):\n    return x + 1\n")
    sys.path.insert(0, str(tmp_path))
    try:
        run(shell, "%load_ext autoreload")
        run(shell, "%autoreload 2")
        setup = "import reuse_auto_mod\ndef f(x):\n    ran.append(x)\n    return reuse_auto_mod.g(x)"
        module_text = "def g(x):\n    return x + 2000\n"
        edit = f"from pathlib import Path\nPath({str(module)!r}).write_text({module_text!r})"
        edited(shell, "autoreload", setup, edit)
    finally:
        shell.run_line_magic("autoreload", "off")
        sys.path.remove(str(tmp_path))
        sys.modules.pop("reuse_auto_mod", None)


def test_not_inputs_keeps_the_calls_of_a_function_reading_an_unhashable_value_reusable(
    shell: InteractiveShell, tmp_path: Path
) -> None:
    run(shell, f"from durable_monty_nb import not_inputs\nlog = open({str(tmp_path / 'n.txt')!r}, 'a')\nK = 2")
    run(shell, "@not_inputs('log')\ndef f(x):\n    ran.append(x)\n    log.write(str(x))\n    return x * K")
    assert durable(shell, "declared") == [2, 4, 6]
    ran(shell).clear()
    assert durable(shell, "declared") == [2, 4, 6] and ran(shell) == []  # reused: log is not an input
    run(shell, "K = 3")  # what is still an input still counts
    assert durable(shell, "declared") == [3, 6, 9] and sorted(ran(shell)) == [1, 2, 3]
    run(shell, "log.close()")
