"""A call that fails on an RQ or Dask worker shows the frames a local failure shows.

Functions defined in notebook cells, and modules shipped by value, reach the workers through
cloudpickle, which (from 3.1.3 on) names their code ``<dynamic-code>``: the worker has neither
their file nor their source. The cell's traceback must still say ``Cell In[N], line L`` with the
source line, and a module's frame its file and line.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from kernels import Kernel, dask_config, rq_config
from test_dask import Cluster
from test_rq import Workers

pytestmark = pytest.mark.kernel

MODULE = """
def check(value):
    if value < 0:
        raise ValueError(f"negative: {value}")  # the module's failing line
    return value
"""
DEFINE = """
import cloudpickle
import dm_checks

cloudpickle.register_pickle_by_value(dm_checks)  # the workers cannot import it


def parse(text):
    if not text.isdigit():
        raise ValueError(f"not a number: {text!r}")  # the cell's failing line
    return int(text)


def checked(x):
    return dm_checks.check(x)
"""
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def failing_cells(kernel: Kernel, configure: str) -> tuple[str, str]:
    kernel.ok("%load_ext durable_monty_nb")
    kernel.ok(configure)
    kernel.ok(DEFINE)  # execution count 3: the cell is In[3]
    cell = kernel.run("%%durable parse_remote\nawait parse('12')\nawait parse('x1')", timeout=120)
    module = kernel.run("%%durable check_remote\nawait checked(-4)", timeout=120)
    for reply in (cell, module):  # each cell fails: else say what it showed instead
        assert reply.error == "WorkflowFailed", reply
    return ANSI.sub("", cell.traceback), ANSI.sub("", module.traceback)


def assert_local_frames(cell: str, module: str, folder: Path) -> None:
    assert "ValueError: not a number: 'x1'" in cell
    assert "<dynamic-code>" not in cell and "<dynamic-code>" not in module
    # the cell's frame, labelled as IPython labels a local failure, with its source line
    assert re.search(r"Cell In\[3\], line 9, in parse\n\s+raise ValueError\(f\"not a number", cell), cell
    # the module's frame: its file on the kernel's machine and its line
    path = re.escape(str(folder / "dm_checks.py"))
    assert re.search(rf'File "{path}", line 4, in check\n\s+raise ValueError\(f"negative', module), module


def make_folder(tmp_path: Path) -> Path:
    (tmp_path / "dm_checks.py").write_text(MODULE)
    return tmp_path


def test_rq_worker_failures_show_cell_and_module_frames(redis_url: str, tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    workers = Workers(redis_url, f"tb-{tmp_path.name[-12:]}", {})
    workers.start(1, plain=True)
    configure = rq_config(redis_url, workers.queue)
    kernel = Kernel(folder, {"DURABLE_MONTY_DB": f"sqlite:///{tmp_path / 'nb.db'}"})
    try:
        cell, module = failing_cells(kernel, configure)
    finally:
        kernel.close()
        workers.stop()
    assert_local_frames(cell, module, folder)


def test_dask_worker_failures_show_cell_and_module_frames(own_dask_cluster: Cluster, tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    configure = dask_config(own_dask_cluster.address)
    kernel = Kernel(folder, {"DURABLE_MONTY_DB": f"sqlite:///{tmp_path / 'nb.db'}"})
    try:
        cell, module = failing_cells(kernel, configure)
    finally:
        kernel.close()
    assert_local_frames(cell, module, folder)
