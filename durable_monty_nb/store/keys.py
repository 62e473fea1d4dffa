"""Store keys of workflows: ``NOTEBOOK::NAME`` for a notebook's workflow, the plain name otherwise.

How a notebook is named, and why keys are scoped, is in :mod:`durable_monty_nb.notebook.scope`;
the store resolves names with these (:meth:`~.store.Store.find_execution`).
"""

from __future__ import annotations

import hashlib

SEPARATOR = "::"
KEY_LIMIT = 255  # the width of the key columns


def scoped_key(notebook: str | None, name: str) -> str:
    """The store key of workflow ``name`` of ``notebook`` (the plain name without a notebook)."""
    if not notebook:
        return name
    key = f"{notebook}{SEPARATOR}{name}"
    if len(key) > KEY_LIMIT:  # a very deep path: keep its end, made unique by a hash of the whole
        digest = hashlib.sha256(notebook.encode()).hexdigest()[:10]
        room = KEY_LIMIT - len(name) - len(SEPARATOR) - len(digest) - 2
        key = f"{digest}…{notebook[-max(room, 0) :]}{SEPARATOR}{name}"[:KEY_LIMIT]
    return key


def split_key(key: str) -> tuple[str | None, str]:
    """(notebook, name) of a store key; (None, key) for a key written without a notebook."""
    notebook, sep, name = key.rpartition(SEPARATOR)
    if sep and notebook and name:
        return notebook, name
    return None, key


def display_name(key: str) -> str:
    """The workflow's name as the user wrote it (the key without its notebook)."""
    return split_key(key)[1]
