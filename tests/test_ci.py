"""The suite's own rules: one decision of "are we in CI", and nothing that skips there."""

from __future__ import annotations

import ast
from pathlib import Path

import ci
import pytest

TESTS = Path(__file__).resolve().parent


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1", True),
        ("true", True),
        ("YES", True),
        ("True", True),
        ("", False),
        ("0", False),
        ("false", False),
        ("no", False),
    ],
)
def test_ci_is_recognised_as_every_ci_service_spells_it(value: str, expected: bool) -> None:
    assert ci.in_ci({"CI": value}) is expected
    assert ci.in_ci({}) is False


def test_under_ci_a_missing_extra_fails_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ci, "IN_CI", True)
    with pytest.raises(pytest.fail.Exception, match=r"no_such_module_dm is not installed.*\.\[dask\]"):
        ci.require_module("no_such_module_dm", extra="dask")
    with pytest.raises(pytest.fail.Exception, match=r"Redis .* is not reachable"):
        ci.unavailable("Redis (redis://127.0.0.1:1/0)", ConnectionError("refused"))
    monkeypatch.setattr(ci, "IN_CI", False)
    with pytest.raises(pytest.skip.Exception, match=r"\.\[agents\]"):
        ci.require_module("no_such_module_dm", extra="agents")
    assert ci.require_module("json", extra="none").dumps(1) == "1"


def test_each_test_process_flushes_a_redis_database_of_its_own() -> None:
    urls = [ci.redis_url({"PYTEST_XDIST_WORKER": f"gw{n}"}) for n in range(4)]
    assert urls[0] == ci.redis_url({}) == "redis://127.0.0.1:6379/11"
    assert len(set(urls)) == 4
    assert not any(url.endswith("/12") for url in urls)  # the distributed notebook's
    given = {"DURABLE_TEST_REDIS_URL": "redis://h:1/3"}
    assert ci.redis_url(given) == "redis://h:1/3"
    assert ci.redis_url({**given, "PYTEST_XDIST_WORKER": "gw1"}) == "redis://h:1/4"


def _calls(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = ast.unparse(func)
            if name in ("pytest.importorskip", "pytest.skip", "os.environ.get", "os.getenv") or name.endswith(
                ".importorskip"
            ):
                first = node.args[0] if node.args else None
                argument = first.value if isinstance(first, ast.Constant) else None
                found.append(f"{name}({argument!r}) line {node.lineno}")
    return found


def test_no_test_module_decides_ci_or_skips_on_its_own() -> None:
    """``pytest.importorskip``, ``pytest.skip`` and reading ``CI`` belong to ci.py alone."""
    offenders = {}
    for path in sorted(TESTS.glob("*.py")):
        if path.name == "ci.py":
            continue
        calls = [
            c
            for c in _calls(ast.parse(path.read_text()))
            if "importorskip" in c or c.startswith("pytest.skip") or "('CI')" in c
        ]
        if calls:
            offenders[path.name] = calls
    assert offenders == {}, "use ci.require_module / ci.missing / ci.IN_CI instead"
