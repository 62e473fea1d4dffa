"""The README's promises keep their tests: tests/promises.toml lists the sentences a user relies on,
each with the tests that would fail if it broke. This fails when a listed sentence is no longer
in the README (reworded or dropped: update the list) or a listed test no longer exists (renamed or
deleted: name the test that holds the promise now). Test names are read from the test files with
``ast``, not by running or collecting them.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

try:
    import tomllib
except ImportError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[1]
PROMISES = REPO / "tests" / "promises.toml"


def normalized(text: str) -> str:
    """What the README says, markdown emphasis and line breaks aside."""
    return re.sub(r"\s+", " ", text.replace("**", "")).strip()


def defined_tests(root: Path) -> set[str]:
    """Node ids (``tests/test_x.py::test_y``, ``...::TestZ::test_y``) of the test functions in ``root``/tests."""
    found = set()
    for path in sorted((root / "tests").glob("test_*.py")):
        module = path.relative_to(root).as_posix()
        for node in ast.parse(path.read_text(), filename=str(path)).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
                found.add(f"{module}::{node.name}")
            elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name.startswith("test"):
                        found.add(f"{module}::{node.name}::{item.name}")
    return found


def promises() -> list[dict[str, Any]]:
    return tomllib.loads(PROMISES.read_text())["promise"]


def test_every_listed_promise_is_still_in_the_readme() -> None:
    # the README and the pages it sends readers to for the rest (docs/)
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    readme = " ".join(normalized(page.read_text()) for page in pages)
    missing = [p["readme"] for p in promises() if normalized(p["readme"]) not in readme]
    assert missing == [], "reworded or dropped in the README (or docs/): update tests/promises.toml"


def test_every_listed_promise_names_tests_that_exist() -> None:
    defined = defined_tests(REPO)
    unknown = {p["readme"][:60]: [t for t in p["tests"] if t not in defined] for p in promises()}
    assert {sentence: tests for sentence, tests in unknown.items() if tests} == {}
    assert all(p["tests"] for p in promises()), "every promise names at least one test"


def test_the_list_is_a_list_of_distinct_sentences() -> None:
    sentences = [normalized(p["readme"]) for p in promises()]
    assert len(sentences) >= 40 and len(set(sentences)) == len(sentences)


def test_the_check_finds_what_it_claims(tmp_path: Path) -> None:
    """The checks themselves can fail: a renamed test and a reworded sentence are caught."""
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_a.py").write_text(
        "def test_kept():\n    pass\n\n\nasync def test_async():\n    pass\n\n\nclass TestBox:\n"
        "    def test_inside(self):\n        pass\n\n\ndef helper():\n    pass\n"
    )
    assert defined_tests(tmp_path) == {
        "tests/test_a.py::test_kept",
        "tests/test_a.py::test_async",
        "tests/test_a.py::TestBox::test_inside",
    }
    readme = normalized("Run it again\n**unchanged**: the stored result comes back.")
    assert normalized("Run it again unchanged: the stored result comes back.") in readme
    assert normalized("Run it again unchanged: the stored result comes back at once.") not in readme
