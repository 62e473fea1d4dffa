"""Workflow names per notebook: two notebooks of one folder both running ``%%durable train``
get two workflows.

A workflow's key in the store is ``NOTEBOOK::NAME`` when the kernel knows its notebook, where
NOTEBOOK is the notebook's path relative to the store's folder (its file name for the default
store of its folder), so a project folder can be moved or renamed with its store. Jupyter tells
the kernel its notebook through ``JPY_SESSION_NAME`` (ipykernel copies it to ``__session__``);
VS Code through ``__vsc_ipynb_file__``. In a terminal, or a kernel that was not told, keys are
the plain names, as before scoping.

Stores written before scoping keep working: a plain key is still found by its name, and the
first notebook that runs the same workflow (the same cell id, or the same code under the same
name) takes it over (:meth:`~durable_monty_nb.store.store.Store.rename_key`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..store.keys import KEY_LIMIT, SEPARATOR, display_name, scoped_key, split_key
from ..store.store import DEFAULT_DB_DIR

__all__ = ["KEY_LIMIT", "SEPARATOR", "display_name", "notebook_file", "notebook_label", "scoped_key", "split_key"]
SESSION_ENV = "JPY_SESSION_NAME"


def notebook_told(shell: Any = None) -> Path | None:
    """The notebook the frontend told the kernel (JupyterLab, Notebook, VS Code), or None."""
    namespace = getattr(shell, "user_ns", None) or {}
    for candidate in (
        namespace.get("__vsc_ipynb_file__"),
        namespace.get("__session__"),
        os.environ.get(SESSION_ENV),
    ):
        if isinstance(candidate, str) and candidate.strip():
            return Path(candidate).expanduser().absolute()
    return None


def notebook_file(shell: Any = None) -> Path | None:
    """The absolute path of the kernel's notebook, or None (a terminal, an unknown frontend).

    Told by the frontend (JupyterLab, Notebook, VS Code), else found for headless runs
    (:func:`headless_notebook`).
    """
    told = notebook_told(shell)
    if told is not None:
        return told
    if getattr(shell, "kernel", None) is None:
        return None  # a terminal: no notebook
    return headless_notebook(shell)


_FOUND: dict[int, tuple[Path, dict[str, str]]] = {}  # by shell: the notebook, its cells' ids by source


def headless_notebook(shell: Any) -> Path | None:
    """The notebook a headless client runs (nbconvert, nbclient, ``jupyter execute``, papermill),
    which tells the kernel only its working directory.

    The notebook is the one that holds the cell being executed: among the ``.ipynb`` arguments
    of the process that started the kernel for that notebook (``jupyter nbconvert --execute NB``,
    ``papermill NB OUT``), else among the notebooks of the kernel's working directory (nbclient
    and nbconvert start it in the notebook's folder: ``resources['metadata']['path']``) when
    exactly one holds it. Found once per kernel.

    A starter's argument counts only when the kernel was started for it: the kernel runs in the
    notebook's folder (nbconvert, nbclient, ``jupyter execute``, nbval), or the starter is
    papermill, whose kernel runs in papermill's own directory. A process that merely names a
    notebook (``pytest notebooks/agent.ipynb tests/``, whose test kernels run elsewhere) does not
    make its other kernels that notebook's.
    """
    found = _FOUND.get(id(shell))
    if found is not None:
        return found[0]
    source = current_source(shell)
    if not source:
        return None
    # The first of the starter's arguments that holds the cell (papermill's input, before its
    # output); in the working directory, the only notebook that holds it.
    parents = [(path, cells) for path in _parent_notebooks() if source in (cells := _cells(path))]
    local = [(path, cells) for path in sorted(Path.cwd().glob("*.ipynb")) if source in (cells := _cells(path))]
    found = parents[0] if parents else local[0] if len(local) == 1 else None
    if found is None:
        return None
    _FOUND[id(shell)] = found
    return found[0]


def headless_cell_id(shell: Any, source: str) -> str | None:
    """The id of the notebook cell with ``source`` in the kernel's notebook file: the one found by
    :func:`headless_notebook`, else the one the frontend told (VS Code, which sends its own cell
    URIs, not the file's cell ids; as saved: an unsaved edit finds nothing)."""
    found = _FOUND.get(id(shell))
    if found is not None:
        return found[1].get(source.strip())
    told = notebook_told(shell)
    return _cells(told).get(source.strip()) if told is not None else None


def is_cell_id(text: str) -> bool:
    """Whether ``text`` is a notebook file's cell id (nbformat 4.5: 1 to 64 of ``[A-Za-z0-9_-]``),
    not a frontend's own name for a cell (VS Code's ``vscode-notebook-cell:...#W1s...`` URI)."""
    return 0 < len(text) <= 64 and all(c.isascii() and (c.isalnum() or c in "-_") for c in text)


def current_source(shell: Any) -> str:
    """The source of the cell being executed, as the client sent it (its execute request)."""
    try:
        return str(shell.kernel.get_parent()["content"]["code"]).strip()
    except (AttributeError, KeyError, TypeError):
        return ""


def _cells(path: Path) -> dict[str, str]:
    """{source: id} of a notebook's code cells (empty when it cannot be read)."""
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        cells = data.get("cells", [])
    except (OSError, ValueError, AttributeError):
        return {}
    found = {}
    for cell in cells if isinstance(cells, list) else []:
        if isinstance(cell, dict) and cell.get("cell_type") == "code":
            text = cell.get("source", "")
            text = "".join(text) if isinstance(text, list) else str(text)
            found.setdefault(text.strip(), str(cell.get("id", "")))
    return found


def _parent_notebooks() -> list[Path]:
    """The ``.ipynb`` arguments of the process that started this kernel for them (Linux: ``/proc``;
    see :func:`headless_notebook`)."""
    parent = Path(f"/proc/{os.getppid()}")
    try:
        args = (parent / "cmdline").read_bytes().split(b"\0")
        cwd = Path(os.readlink(parent / "cwd"))
        here = Path.cwd().resolve()
    except OSError:
        return []
    papermill = any(Path(raw.decode(errors="replace")).name == "papermill" for raw in args)
    named = _notebook_args(args, cwd)
    if papermill and cwd.resolve() == here:
        return named  # in its order: the input, then the output it writes (the same cells)
    return [path for path in named if path.parent.resolve() == here]


def _notebook_args(args: list[bytes], cwd: Path) -> list[Path]:
    """The ``.ipynb`` files a command line names (relative to its directory, or to the shell's)."""
    # Relative to the starter's directory, or to the shell's (papermill --cwd moves the
    # starter itself; the PWD it inherited still names the shell's).
    bases = [cwd] + ([Path(os.environ["PWD"])] if os.environ.get("PWD") else [])
    found = []
    for raw in args:
        arg = raw.decode(errors="replace")
        if arg.endswith(".ipynb"):
            for base in bases:
                path = (base / arg).expanduser()
                if path.is_file():
                    found.append(path.absolute())
                    break
    return found


def notebook_label(notebook: Path, store_url: str) -> str:
    """How a notebook is named in its keys: relative to the store's folder, else its file name."""
    if store_url.startswith("sqlite:///"):
        base = Path(store_url.removeprefix("sqlite:///")).parent
        if base.name == DEFAULT_DB_DIR:
            base = base.parent
        try:
            return notebook.resolve().relative_to(base.resolve()).as_posix()
        except (OSError, ValueError):
            pass
    return notebook.name
