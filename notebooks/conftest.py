"""Each example notebook runs under nbval against a fresh store of its own.

nbval starts one kernel per notebook, which inherits this process's environment: pointing
DURABLE_MONTY_DB at a new file before each notebook's first cell gives every notebook an
empty store, never one left in this folder by a manual run.
"""

import os
import tempfile
import uuid

import pytest

os.environ.setdefault("DURABLE_MONTY_KEY", "nbval-" + uuid.uuid4().hex)
_STORES = tempfile.mkdtemp(prefix="durable-nbval-")
_current: list[object] = [None]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    notebook = item.parent
    if notebook is not _current[0]:
        _current[0] = notebook
        os.environ["DURABLE_MONTY_DB"] = f"sqlite:///{_STORES}/{uuid.uuid4().hex}.db"
