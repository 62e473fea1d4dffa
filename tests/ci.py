"""Whether the suite runs in CI, and what a missing service or extra does there.

The one place that decides: conftest.py and every test module import from here (a module of
its own, since notebooks/conftest.py shares the module name ``conftest``). Outside CI a missing
service or extra skips its tests; with ``CI`` set to 1, true or yes it fails them, naming it.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from types import ModuleType

import pytest


def in_ci(environ: Mapping[str, str] = os.environ) -> bool:
    return environ.get("CI", "").strip().lower() in ("1", "true", "yes")


IN_CI = in_ci()


def redis_url(environ: Mapping[str, str] = os.environ) -> str:
    """The tests' own Redis database, flushed by the tests that use it.

    Number 11 (or DURABLE_TEST_REDIS_URL's); under pytest-xdist each further test process takes
    the next number (12, the distributed notebook's, is skipped by default).
    """
    worker = int(environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    given = environ.get("DURABLE_TEST_REDIS_URL")
    if given is None:
        return f"redis://127.0.0.1:6379/{11 if worker == 0 else 12 + worker}"
    base, _, number = given.rpartition("/")
    if not worker:
        return given
    if not number.isdigit():  # no database named: 0
        base, number = given.rstrip("/"), "0"
    return f"{base}/{int(number) + worker}"


REDIS_URL = redis_url()


def missing(message: str) -> None:
    """Skip (outside CI) or fail (in CI) the current test or module, with ``message``."""
    if IN_CI:
        pytest.fail(message, pytrace=False)
    pytest.skip(message, allow_module_level=True)


def unavailable(what: str, error: Exception) -> None:
    missing(f"{what} is not reachable: {error}")


def require_module(name: str, extra: str) -> ModuleType:
    """Import ``name``, a module of the package's ``extra``; skip or fail (in CI) naming the extra."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        missing(f"{name} is not installed ({exc}): pip install -e '.[{extra}]' (or '.[test]')")
        raise  # not reached: missing() always raises
