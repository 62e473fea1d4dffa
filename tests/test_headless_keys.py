"""One key per notebook however it runs: nbconvert, nbclient, papermill and a kernel told its
notebook as JupyterLab tells it (JPY_SESSION_NAME, with each cell's id) or as VS Code does
(``__vsc_ipynb_file__``, with its own URI for each cell) key a notebook's workflows the same way,
so a run of one reuses the results of another."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import nbformat
import pytest
from kernels import Kernel

from durable_monty_nb.store.store import Store

VENV_BIN = Path(sys.executable).parent
DEFINE = """import os

def encode(i):
    with open(os.environ["SIDE_LOG"], "a") as handle:
        handle.write(f"{i}\\n")
    return i * 2

files = list(range(5))"""
NAMED = "%%durable encode_all\nvideos = await gather(*[encode(f) for f in files])\nlen(videos)"
UNNAMED = "%%durable\ntotal = sum(await gather(*[encode(f + 10) for f in files]))\ntotal"


def write_notebook(path: Path) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(src) for src in ("%load_ext durable_monty_nb", DEFINE, NAMED, UNNAMED)]
    nbformat.write(nb, path)
    return nb


def calls(log: Path) -> list[int]:
    return sorted(int(line) for line in log.read_text().split()) if log.exists() else []


def texts(cell: nbformat.NotebookNode) -> list[str]:
    """The plain-text outputs of a cell (the widget's text form, the result)."""
    return [o["data"]["text/plain"] for o in cell.outputs if "data" in o]


def frontend(folder: Path, nb: nbformat.NotebookNode, env: dict[str, str], cell_id: Any, first: str = "") -> None:
    """Run the notebook's cells in a kernel of ``folder`` as a frontend does: each execute request
    with the cell's id as the frontend names it (``cell_id(cell)``), after ``first`` (what the
    frontend runs at the kernel's start)."""
    kernel = Kernel(folder, {k: env[k] for k in ("DURABLE_MONTY_DB", "SIDE_LOG", "JPY_SESSION_NAME") if k in env})
    try:
        for source, metadata in [
            *([(first, {})] if first else []),
            *((c.source, {"cellId": cell_id(c)}) for c in nb.cells),
        ]:
            msg = kernel.client.session.msg(
                "execute_request",
                {"code": source, "silent": False, "store_history": True, "user_expressions": {}, "allow_stdin": False},
                metadata=metadata,
            )
            kernel.client.shell_channel.send(msg)
            reply = kernel.collect(msg["header"]["msg_id"])
            assert reply.error is None, reply.traceback
    finally:
        kernel.close()


def keys(db: Path) -> set[str]:
    return {row.key for row in Store(db).list_executions(latest_only=False)}


@pytest.mark.kernel
def test_nbconvert_nbclient_and_a_lab_kernel_share_the_notebooks_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nbclient import NotebookClient

    folder = tmp_path / "project"
    folder.mkdir()
    notebook = folder / "analysis.ipynb"
    nb = write_notebook(notebook)
    db, log = tmp_path / "store.db", tmp_path / "side.log"
    env = {**os.environ, "DURABLE_MONTY_DB": f"sqlite:///{db}", "SIDE_LOG": str(log)}

    # 1. The README's way: jupyter nbconvert --execute, from another directory.
    subprocess.run(
        [
            str(VENV_BIN / "jupyter"),
            "nbconvert",
            "--to",
            "notebook",
            "--execute",
            str(notebook),
            "--output",
            "converted",
            "--output-dir",
            str(tmp_path),
        ],
        check=True,
        env=env,
        cwd=tmp_path,
        capture_output=True,
    )
    assert calls(log) == [0, 1, 2, 3, 4, 10, 11, 12, 13, 14]
    converted = nbformat.read(str(tmp_path / "converted.ipynb"), 4)
    assert texts(converted.cells[2]) == ["encode_all: completed · 5/5 calls done", "5"]  # the final status line
    cell_id = nb.cells[3].id
    assert keys(db) == {
        "project/analysis.ipynb::encode_all",
        f"project/analysis.ipynb::cell-{cell_id[:12]}",
    }  # relative to the store

    # 2. nbclient from Python (the kernel starts in the notebook's folder, resources' path).
    monkeypatch.setenv("DURABLE_MONTY_DB", env["DURABLE_MONTY_DB"])
    monkeypatch.setenv("SIDE_LOG", str(log))
    ran = NotebookClient(nbformat.read(notebook, 4), resources={"metadata": {"path": str(folder)}}).execute()
    assert calls(log) == [0, 1, 2, 3, 4, 10, 11, 12, 13, 14]  # nothing ran again
    assert texts(ran.cells[2]) == ["encode_all: completed · 5 restored from the store", "5"]
    assert len(keys(db)) == 2

    # 3. JupyterLab's way: JPY_SESSION_NAME and each cell's id.
    frontend(folder, nb, {**env, "JPY_SESSION_NAME": str(notebook)}, lambda cell: cell.id)
    assert calls(log) == [0, 1, 2, 3, 4, 10, 11, 12, 13, 14]
    assert len(keys(db)) == 2

    # 4. VS Code's way: __vsc_ipynb_file__ in the namespace, and its own URI for each cell.
    told = f"__vsc_ipynb_file__ = {str(notebook)!r}"
    frontend(folder, nb, env, lambda cell: f"vscode-notebook-cell:{notebook}#W{cell.id[:4]}sZmlsZQ%3D%3D", told)
    assert calls(log) == [0, 1, 2, 3, 4, 10, 11, 12, 13, 14]  # nothing ran again
    assert len(keys(db)) == 2

    # 5. papermill, from another directory (its kernel runs in papermill's own directory).
    subprocess.run(
        [
            str(VENV_BIN / "papermill"),
            "--no-progress-bar",
            "project/analysis.ipynb",
            str(tmp_path / "papermilled.ipynb"),
        ],
        check=True,
        env=env,
        cwd=tmp_path,
        capture_output=True,
    )
    assert calls(log) == [0, 1, 2, 3, 4, 10, 11, 12, 13, 14]  # nothing ran again
    papermilled = nbformat.read(str(tmp_path / "papermilled.ipynb"), 4)
    assert texts(papermilled.cells[2]) == ["encode_all: completed · 5 restored from the store", "5"]
    assert len(keys(db)) == 2


def test_the_cli_finds_a_notebooks_workflow_by_its_plain_name(tmp_path: Path) -> None:
    from durable_monty_nb import Engine

    db = f"sqlite:///{tmp_path / 'store.db'}"
    engine = Engine(db)
    engine.run("await double(2)", {"double": lambda x: x * 2}, key="a.ipynb::bg_2")
    engine.run("await double(3)", {"double": lambda x: x * 2}, key="a.ipynb::train")
    engine.run("await double(4)", {"double": lambda x: x * 2}, key="b.ipynb::train")
    engine.close()

    def status(*args: str) -> subprocess.CompletedProcess[str]:
        command = [str(VENV_BIN / "durable-monty-nb"), "status", "--db", db, *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=60)

    found = status("bg_2")  # as %durable_status bg_2 finds it in that notebook
    assert found.returncode == 0 and "name: bg_2\n notebook: a.ipynb" in found.stdout and "double" in found.stdout
    assert status("bg%2").returncode == 1  # LIKE wildcards are matched literally
    several = status("train")
    assert several.returncode == 1 and "Traceback" not in several.stderr
    assert "'train' is a workflow of 2 notebooks: a.ipynb::train, b.ipynb::train; give the whole key" in several.stderr
    assert status("b.ipynb::train").returncode == 0
    unknown = status("nothing")
    assert unknown.returncode == 1 and "Traceback" not in unknown.stderr
    assert "ExecutionNotFound: no execution named or with id 'nothing'" in unknown.stderr


STARTER = """import sys
import nbformat
from nbclient import NotebookClient

nb = nbformat.v4.new_notebook()
nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
nb.cells = [nbformat.v4.new_code_cell(sys.argv[2])]
NotebookClient(nb, resources={"metadata": {"path": sys.argv[3]}}).execute()
print(nb.cells[0].outputs[0]["text"].strip())
"""
FIND = "from durable_monty_nb.notebook.scope import notebook_file\nprint(notebook_file(get_ipython()))"


@pytest.mark.kernel
def test_a_process_that_names_a_notebook_keys_only_the_kernels_it_started_for_it(tmp_path: Path) -> None:
    """As ``pytest notebooks/agent.ipynb tests/`` does: the starter names a notebook holding the
    cell its kernel runs, but that kernel runs elsewhere (a test's kernel): not that notebook's."""
    folder, elsewhere = tmp_path / "notebooks", tmp_path / "elsewhere"
    folder.mkdir()
    elsewhere.mkdir()
    named = folder / "agent.ipynb"
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(FIND)]
    nbformat.write(nb, named)
    starter = tmp_path / "starter.py"
    starter.write_text(STARTER)

    def found(cwd: Path) -> str:
        command = [sys.executable, str(starter), str(named), FIND, str(cwd)]
        ran = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path, check=True)
        return ran.stdout.strip().splitlines()[-1]

    assert found(elsewhere) == "None"  # a kernel the process started for something else
    assert found(folder) == str(named)  # the kernel it started for the notebook, in its folder
