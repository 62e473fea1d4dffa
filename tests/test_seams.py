"""One meaning per name, and typed errors: what callers rely on is carried by types, not text.

- one resolver of workflow names and ids (the store's), which the magics, the command line and
  the HTTP server share, so a name means the same execution wherever it is typed;
- the HTTP code of a refusal is its exception class's ``http_status``, whatever its message says.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from IPython.core.interactiveshell import InteractiveShell

from durable_monty_nb import Engine, ExecutionNotFound
from durable_monty_nb.errors import (
    DurableError,
    ExecutionBusy,
    ExecutionCompleted,
    MailboxBusy,
    NoSuchCall,
    SignalError,
    StoreError,
    StoreUnavailable,
)
from durable_monty_nb.server.app import _answer_for
from durable_monty_nb.signals import CompletionConflict
from durable_monty_nb.tokens import TokenError


def test_one_resolver_prefers_the_notebooks_workflow_then_a_key_then_an_id(sqlite_engine: Engine) -> None:
    store = sqlite_engine.store
    sqlite_engine.run("1", key="train")  # a plain key (a terminal, or a store from before scoping)
    sqlite_engine.run("2", key="a.ipynb::train")  # notebook a.ipynb's workflow "train"
    plain, scoped = store.latest_execution("train"), store.latest_execution("a.ipynb::train")
    assert store.find_execution("train", notebook="a.ipynb").id == scoped.id
    assert store.find_execution("train", notebook="b.ipynb").id == plain.id  # b has none: the plain key
    assert store.find_execution("train").id == plain.id  # the server and the command line: no notebook
    assert store.find_execution(scoped.id[:10], notebook="a.ipynb").id == scoped.id  # an id prefix
    with pytest.raises(ExecutionNotFound, match="no execution named or with id 'nothing'"):
        store.find_execution("nothing", notebook="a.ipynb")


def test_the_magics_resolve_names_with_the_stores_resolver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """%durable_status NAME in notebook a.ipynb shows a.ipynb's workflow, as the store resolves it."""
    db = tmp_path / "magics.db"
    monkeypatch.setenv("DURABLE_MONTY_DB", f"sqlite:///{db}")
    monkeypatch.setenv("JPY_SESSION_NAME", str(tmp_path / "a.ipynb"))
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "durable_monty_nb")
    try:
        assert ip.run_cell("%%durable train --quiet\n40 + 2").result == 42
        engine = Engine(f"sqlite:///{db}")
        try:
            engine.run("1", key="train")  # the same name without a notebook
            report = ip.run_line_magic("durable_status", "train")
            scoped = engine.store.find_execution("train", notebook="a.ipynb")
            assert scoped.key == "a.ipynb::train"
            assert scoped.id[:12] in str(report) and engine.store.find_execution("train").id[:12] not in str(report)
        finally:
            engine.close()
    finally:
        ip.run_line_magic("unload_ext", "durable_monty_nb")


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (SignalError("has no external call 3"), 400),  # the message does not decide
        (NoSuchCall("a call"), 404),
        (ExecutionNotFound("x"), 404),
        (ExecutionCompleted("x"), 409),
        (MailboxBusy("x"), 409),
        (CompletionConflict("x"), 409),
        (ExecutionBusy("x"), 409),
        (TokenError("x"), 401),
        (DurableError("x"), 400),
    ],
)
def test_the_server_answers_by_the_errors_class(error: DurableError, status: int) -> None:
    assert _answer_for(error) == (status, str(error), {})


def test_store_errors_answer_503_without_their_message() -> None:
    """A store failure may name the database: the answer says only that the store cannot answer."""
    for error in (StoreError("sqlite:////secret/path.db is locked"), StoreUnavailable("postgresql://u:pw@h/db")):
        assert _answer_for(error) == (503, "the store cannot answer right now", {})


def test_the_signing_secret_is_secret_and_key_still_works_with_a_warning(sqlite_url: str) -> None:
    """``secret=`` signs; ``key=`` (its old name) signs alike with a DeprecationWarning; both: refused."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # secret= warns about nothing
        engine = Engine(sqlite_url, secret="one secret")
    try:
        engine.run("1 + 1", key="signed")  # key= of run() names the workflow, no warning
        with pytest.warns(DeprecationWarning, match=r"Engine\(key=...\) is deprecated: the signing secret is secret="):
            old = Engine(sqlite_url, key="one secret")
        try:
            assert old.store.signer.sign("c", b"x") == engine.store.signer.sign("c", b"x")
            assert old.run("1 + 1", key="signed") == 2  # verified with the same secret
        finally:
            old.close()
        with pytest.raises(TypeError, match="give the signing secret once"):
            Engine(sqlite_url, secret="a", key="b")
    finally:
        engine.close()


def test_run_options_are_checked_once_and_taken_by_start_and_resume(sqlite_engine: Engine) -> None:
    from durable_monty_nb import RunOptions, WorkflowFailed

    for bad, message in (
        ({"workers": 0}, "workers must be a whole number of at least 1"),
        ({"rate": "fast"}, "rate 'fast' is not N/s"),
        ({"timeout": -1}, "timeout must be a positive number"),
    ):
        with pytest.raises(ValueError, match=message):
            RunOptions(**bad)
    with pytest.raises(TypeError, match="unknown run option\\(s\\): speed"):
        sqlite_engine.start("1", key="typo", speed=3)
    assert sqlite_engine.executions() == []  # refused before anything was stored

    import threading
    import time

    release = threading.Event()

    def hang(x: int) -> int:
        release.wait(30)
        return x

    options = RunOptions(timeout=0.2)
    try:
        with pytest.raises(WorkflowFailed, match=r"hang\(\) did not finish within 0\.2 s"):
            sqlite_engine.run("await hang(1)", {"hang": hang}, key="hung", options=options)

        def slow(x: int) -> int:
            time.sleep(0.6)  # over the options' 0.2 s, under the keyword's 5 s
            return x + 1

        run = sqlite_engine.resume("hung", {"hang": slow}, options=options, timeout=5)  # the keyword wins
        assert run.result(30) == 2
    finally:
        release.set()


def test_run_options_declare_their_command_line_and_are_read_back_through_one_check() -> None:
    import argparse
    import math

    from durable_monty_nb import RunOptions
    from durable_monty_nb.engine.options import ARGUMENTS, add_arguments, options_from_arguments
    from durable_monty_nb.engine.retry import RetryPolicy
    from durable_monty_nb.notebook.magics import DurableMagics

    parser = argparse.ArgumentParser()
    add_arguments(parser.add_argument)  # any argparse parser: a command line gets the same options
    args = parser.parse_args(
        ["--workers", "3", "--retries", "2", "--delay", "0.5", "--rate", "10/s", "--executor", "rq"]
    )
    options = options_from_arguments(args, {"timeout": 30.0, "rate": "1/s"})  # fallback: %config
    assert options == RunOptions(
        workers=3, retry=RetryPolicy(retries=2, delay=0.5), timeout=30.0, rate="10/s", executor="rq"
    )
    assert options_from_arguments(parser.parse_args([])) == RunOptions()  # nothing given: the engine's
    for line, message in (
        ("--workers 0", "workers must be a whole number of at least 1, not 0"),
        ("--retries 1 --max-delay nan", "max_delay must be a number of seconds, 0 or more, not nan"),
        ("--concurrency 0", "concurrency must be a whole number of at least 1, not 0"),
    ):
        with pytest.raises(ValueError, match=message):
            options_from_arguments(parser.parse_args(line.split()))
    with pytest.raises(ValueError, match="delay must be a number of seconds"):
        RetryPolicy(delay=math.nan)  # Engine(retry=...) too: the policy checks itself

    # The magics' parsers are generated from the same declarations: same flags, same help.
    durable = {a.dest: a for a in DurableMagics.durable.parser._actions}
    resume = {a.dest: a for a in DurableMagics.durable_resume.parser._actions}
    for name, argument in ARGUMENTS.items():
        assert durable[name].option_strings == [argument.flag] and durable[name].help == argument.help
    assert {"executor", "workers"} <= set(resume) and "retries" not in resume
