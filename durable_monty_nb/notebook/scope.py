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


def notebook_file(shell: Any = None) -> Path | None:
    """The absolute path of the kernel's notebook, or None (a terminal, an unknown frontend)."""
    namespace = getattr(shell, "user_ns", None) or {}
    for candidate in (
        namespace.get("__vsc_ipynb_file__"),
        namespace.get("__session__"),
        os.environ.get(SESSION_ENV),
    ):
        if isinstance(candidate, str) and candidate.strip():
            return Path(candidate).expanduser().absolute()
    return None


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
