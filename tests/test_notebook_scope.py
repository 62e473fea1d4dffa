"""Names per notebook and the default store's place, through real kernels told their notebook
(JPY_SESSION_NAME, as Jupyter sets it); and the pieces they rest on."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from kernels import Kernel
from procs import wait_until

from durable_monty_nb.notebook.scope import notebook_label, scoped_key, split_key
from durable_monty_nb.store.store import DEFAULT_DB_DIR, Store, default_db_path, normalize_url

DEFINE = """
import os, time

LOG = os.environ["SIDE_LOG"]
GATE = os.environ["GATE_FILE"]
FACTOR = {factor}


def work(i):
    with open(LOG, "a") as handle:
        handle.write(f"{{os.getpid()}} {{FACTOR}} {{i}}\\n")
    while i >= 2 and os.path.exists(GATE):  # test scaffolding: hold calls 2.. while the gate exists
        time.sleep(0.01)
    return i * FACTOR
"""
CELL = "%%durable train\nvalues = await gather(*[work(i) for i in range(4)])\ntotal = sum(values)\ntotal"


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[Path]:
    """A notebook folder with no store in it; kernels there use its default store."""
    (tmp_path / "nb").mkdir()
    yield tmp_path / "nb"


def notebook_kernel(folder: Path, notebook: str | None, **env: str) -> Kernel:
    base = {
        "SIDE_LOG": str(folder.parent / "side.log"),
        "GATE_FILE": str(folder.parent / "gate"),
        "DURABLE_MONTY_DB": "",  # the tests' session store is not wanted here: the folder's default
        "JPY_SESSION_NAME": str(folder / notebook) if notebook else "",
    }
    return Kernel(folder, {**base, **env})


def calls_of(folder: Path, factor: int) -> list[int]:
    log = folder.parent / "side.log"
    lines = log.read_text().splitlines() if log.exists() else []
    return sorted(int(i) for _, f, i in (line.split() for line in lines) if int(f) == factor)


@pytest.mark.kernel
def test_two_notebooks_of_one_folder_have_their_own_workflows(folder: Path) -> None:
    gate = folder.parent / "gate"
    gate.touch()
    a = notebook_kernel(folder, "a.ipynb")
    b = notebook_kernel(folder, "b.ipynb")
    store_file = folder / DEFAULT_DB_DIR / "durable_monty.db"
    try:
        a.ok("%load_ext durable_monty_nb")
        b.ok("%load_ext durable_monty_nb")
        a.ok(DEFINE.format(factor=1))
        b.ok(DEFINE.format(factor=10))
        pending = a.submit(CELL)  # a's train runs, its calls held by the gate
        wait_until(lambda: store_file.exists() and len(calls_of(folder, 1)) == 4, what="a's calls to start")
        # b's train is another workflow: it neither waits for a's (ExecutionBusy before scoping)
        # nor reuses it.
        b_cell = b.submit(CELL)
        wait_until(lambda: len(calls_of(folder, 10)) == 4, what="b's calls to start")
        gate.unlink()
        assert b.collect(b_cell).result == "60"
        assert a.collect(pending).result == "6"

        # Run again unchanged, each gets its own stored result; nothing runs again.
        again = a.ok(CELL)
        assert again.result == "6" and any("result from the store" in t for t in again.widget_text)
        assert b.ok(CELL).result == "60"
        assert calls_of(folder, 1) == [0, 1, 2, 3] and calls_of(folder, 10) == [0, 1, 2, 3]

        status = a.ok("%durable_status").result or ""
        assert "notebook" in status and "a.ipynb" in status and "b.ipynb" in status
        detail = a.ok("%durable_status train").result or ""
        assert "notebook: a.ipynb" in detail and "4/4 done" in detail
        assert "notebook: b.ipynb" in (b.ok("%durable_status train").result or "")
    finally:
        a.close()
        b.close()
    # The default store lives in a hidden folder of the notebooks' folder, ignored by git.
    assert sorted(p.name for p in folder.iterdir()) == [DEFAULT_DB_DIR]
    assert (folder / DEFAULT_DB_DIR / ".gitignore").read_text().splitlines()[-1] == "*"
    keys = {row.key for row in Store(store_file).list_executions()}
    assert keys == {"a.ipynb::train", "b.ipynb::train"}


@pytest.mark.kernel
def test_a_store_written_before_scoping_is_found_and_resumed(folder: Path) -> None:
    gate = folder.parent / "gate"
    legacy = folder / "durable_monty.db"
    # An earlier release: plain keys, and the store beside the notebooks.
    old = notebook_kernel(folder, None, DURABLE_MONTY_DB=str(legacy))
    gate.touch()
    old.ok("%load_ext durable_monty_nb")
    old.ok(DEFINE.format(factor=1))
    old.submit(CELL)
    store = Store(legacy)
    row = wait_until(
        lambda: (
            (row := store.latest_execution("train")) is not None
            and row.calls_done == 2
            and len(calls_of(folder, 1)) == 4
            and row
        ),
        what="2 committed calls and 2 held",
    )
    old.kill()
    gate.unlink()

    kernel = notebook_kernel(folder, "a.ipynb")  # the same folder: finds durable_monty.db there
    try:
        loaded = kernel.ok("%load_ext durable_monty_nb")
        assert any("train (crashed, 2/4 calls done" in d for d in loaded.displays)  # this notebook's to resume
        kernel.ok(DEFINE.format(factor=1))
        status = kernel.ok("%durable_status train").result or ""
        assert "name: train" in status and "notebook:" not in status  # found by its plain name
        assert kernel.ok(CELL).result == "6"  # the same code under the same name: resumed
    finally:
        kernel.close()
    assert not (folder / DEFAULT_DB_DIR).exists()  # the existing store was used
    assert calls_of(folder, 1) == [0, 1, 2, 2, 3, 3]  # only the calls in flight at the kill ran again
    resumed = store.latest_execution("a.ipynb::train")  # the notebook took the workflow over
    assert resumed is not None and resumed.id == row.id and resumed.status == "completed"
    assert store.latest_execution("train") is None


def test_default_store_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_db_path(tmp_path) == tmp_path / DEFAULT_DB_DIR / "durable_monty.db"
    (tmp_path / "durable_monty.db").touch()  # a store of an earlier release is still used
    assert default_db_path(tmp_path) == tmp_path / "durable_monty.db"

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    monkeypatch.chdir(fresh)
    store = Store()  # the Python API's default too
    try:
        assert store.url == normalize_url(fresh / DEFAULT_DB_DIR / "durable_monty.db")
        assert sorted(p.name for p in fresh.iterdir()) == [DEFAULT_DB_DIR]
        assert (fresh / DEFAULT_DB_DIR / ".gitignore").exists()
    finally:
        store.close()


def test_keys_name_the_notebook_relative_to_the_store(tmp_path: Path) -> None:
    default = normalize_url(tmp_path / DEFAULT_DB_DIR / "durable_monty.db")
    assert notebook_label(tmp_path / "a.ipynb", default) == "a.ipynb"
    shared = normalize_url(tmp_path / "runs.db")
    assert notebook_label(tmp_path / "x" / "a.ipynb", shared) == "x/a.ipynb"
    assert notebook_label(Path("/elsewhere/a.ipynb"), shared) == "a.ipynb"
    assert notebook_label(tmp_path / "a.ipynb", "postgresql+psycopg://db/runs") == "a.ipynb"

    assert split_key(scoped_key("x/a.ipynb", "train")) == ("x/a.ipynb", "train")
    assert scoped_key(None, "train") == "train" and split_key("train") == (None, "train")
    deep = "/".join(["folder"] * 60) + "/a.ipynb"
    key = scoped_key(deep, "train")
    assert len(key) <= 255 and split_key(key)[1] == "train"
    assert key != scoped_key(deep.replace("folder", "folders", 1), "train")
