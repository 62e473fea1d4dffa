"""Fingerprints of functions by content: stable across processes, each value hashed once per run."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from durable_monty_nb import Engine
from durable_monty_nb.engine.fingerprint import Fingerprinter, function_fingerprint

SOURCE = """
import numpy as np
from durable_monty_nb.engine.fingerprint import function_fingerprint
TAGS = {"alpha", "beta", "gamma", "delta"}
TABLE = {"rows": [1, 2, 3], "tags": frozenset(TAGS), "w": np.arange(5.0)}
def f(x):
    return x in TAGS and x in {"a", "b", "c"} and TABLE["w"].sum()
print(function_fingerprint(f))
"""


def test_a_fingerprint_is_the_same_in_another_process_whatever_its_hash_seed() -> None:
    # After a kernel restart the same notebook must find its calls: sets must not hash by their order.
    prints = set()
    for seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run([sys.executable, "-c", SOURCE], capture_output=True, text=True, env=env, timeout=60)
        assert done.returncode == 0, done.stderr
        prints.add(done.stdout.strip())
    assert len(prints) == 1


class Counted:
    """An object that counts how often it is pickled."""

    reduced = 0

    def __reduce_ex__(self, protocol: Any) -> Any:
        Counted.reduced += 1
        return (Counted, ())


def test_a_value_read_by_several_functions_is_hashed_once_per_run(sqlite_engine: Engine) -> None:
    shared = Counted()

    def f(x: int) -> int:
        _ = shared
        return x

    def g(x: int) -> int:
        _ = shared
        return -x

    printer = Fingerprinter()
    Counted.reduced = 0
    printer.function(f)
    printer.function(g)
    assert Counted.reduced == 1
    Counted.reduced = 0
    code = "a = await gather(*[f(i) for i in range(20)])\nawait gather(*[g(i) for i in a])"
    assert sqlite_engine.run(code, {"f": f, "g": g}, key="once") == [-i for i in range(20)]
    assert Counted.reduced == 1  # one pass of the run: neither the second function nor 40 calls hash it again


def test_what_a_function_assigns_or_fills_is_not_an_input() -> None:
    namespace: dict[str, Any] = {"calls": 0, "results": [], "counts": {}}
    exec(
        "def f(x):\n    global calls\n    calls += 1\n    results.append(x)\n    counts[x] = counts.get(x, 0) + 1\n"
        "    return x",
        namespace,
    )
    before = function_fingerprint(namespace["f"])
    namespace["f"](1)
    assert namespace["calls"] == 1 and namespace["results"] == [1]
    assert function_fingerprint(namespace["f"]) == before
    exec("READ = [1]\ndef g(x):\n    return x + sum(READ)", namespace)
    before = function_fingerprint(namespace["g"])
    namespace["READ"].append(2)  # changed from outside: an input
    assert function_fingerprint(namespace["g"]) != before


def define_model(field_type: type) -> type:
    import abc

    import pydantic

    class Report(pydantic.BaseModel):  # a notebook class whose metaclass derives schemas from its body
        score: field_type = 1  # type: ignore[valid-type]

        def summary(self) -> str:
            return f"score {self.score}"

    class Base(abc.ABC):  # ABC keeps a registry object of its own per class
        @abc.abstractmethod
        def run(self) -> int: ...

    return Report, Base


def test_classes_with_derived_metaclass_state_fingerprint_by_their_definition() -> None:
    # pydantic models and ABCs carry objects their metaclass builds anew for each class: a class
    # defined again, unchanged, must reuse its calls; a changed field type must not.
    first, again, changed = define_model(int), define_model(int), define_model(float)
    token = [Fingerprinter().class_token(cls) for cls in (*first, *again, *changed)]
    assert token[0] == token[2] and token[1] == token[3]  # the same definitions
    assert token[0] != token[4]  # the field's type changed
