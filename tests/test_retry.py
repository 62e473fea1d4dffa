"""Retry policies: per function and default, backoff shapes, exceptions after the last attempt."""

from __future__ import annotations

from typing import Any

import pytest

from durable_monty_nb import CallFailed, CallRetrying, Engine, ExecutionFinished, RetryPolicy, WorkflowFailed, retry


def flaky_factory(failures: int, exc: type[Exception] = TimeoutError) -> tuple[Any, list[int]]:
    attempts: list[int] = []

    def flaky(x: int) -> int:
        attempts.append(x)
        if len(attempts) <= failures:
            raise exc(f"attempt {len(attempts)} failed")
        return x

    return flaky, attempts


@pytest.mark.parametrize(
    ("backoff", "waits"),
    [
        ("exponential", [0.5, 1.0, 2.0, 4.0, 5.0]),
        ("linear", [0.5, 1.0, 1.5, 2.0, 2.5]),
        ("constant", [0.5, 0.5, 0.5, 0.5, 0.5]),
    ],
)
def test_backoff_shapes_and_cap(backoff: str, waits: list[float]) -> None:
    policy = RetryPolicy(retries=5, backoff=backoff, delay=0.5, max_delay=5.0)  # type: ignore[arg-type]
    assert [policy.wait_before(n) for n in range(1, 6)] == waits


def test_jitter_stays_within_bounds() -> None:
    policy = RetryPolicy(retries=1, backoff="constant", delay=1.0, jitter=0.2)
    assert all(0.8 <= policy.wait_before(1) <= 1.2 for _ in range(200))


def test_invalid_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="backoff"):
        RetryPolicy(backoff="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        RetryPolicy(retries=-1)


def test_decorated_function_is_retried_with_its_policy(engine: Engine) -> None:
    flaky, attempts = flaky_factory(2)
    flaky = retry(retries=3, backoff="exponential", delay=0.01)(flaky)
    events: list[Any] = []
    run = engine.start("await flaky(7)", {"flaky": flaky}, key="retry-deco", paused=True)
    run.subscribe(events.append)  # before anything is dispatched: no event can be missed
    run.begin()
    assert run.result(timeout=30) == 7
    assert attempts == [7, 7, 7]
    retrying = [e for e in events if isinstance(e, CallRetrying)]
    assert [(e.function, e.attempt) for e in retrying] == [("flaky", 1), ("flaky", 2)]
    assert [e.wait for e in retrying] == pytest.approx([0.01, 0.02])  # the decorator's exponential backoff
    assert not [e for e in events if isinstance(e, CallFailed)]
    assert [e.status for e in events if isinstance(e, ExecutionFinished)] == ["completed"]
    (call,) = run.calls()
    assert call.attempts == 3 and call.status == "done"
    row = engine.store.load_calls(run.execution_id)[0]
    assert row.attempts == 3 and row.status == "done"


def test_retry_events_report_attempts_and_waits(sqlite_engine: Engine) -> None:
    flaky, _ = flaky_factory(2)
    flaky = retry(retries=2, backoff="linear", delay=0.02)(flaky)
    events: list[CallRetrying] = []
    run = sqlite_engine.start(
        "await flaky(1)", {"flaky": flaky}, key="retry-events", print_callback=lambda *_: None, paused=True
    )
    run.subscribe(lambda e: events.append(e) if isinstance(e, CallRetrying) else None)
    run.begin()  # subscribed before the first dispatch: every retry event is seen
    assert run.result(timeout=30) == 1
    assert [(e.attempt, e.wait) for e in events] == [(1, pytest.approx(0.02)), (2, pytest.approx(0.04))]
    assert ["attempt 1 failed" in events[0].error, "attempt 2 failed" in events[1].error] == [True, True]


def test_engine_default_policy_applies_to_undecorated_functions(sqlite_url: str) -> None:
    engine = Engine(sqlite_url, retry=RetryPolicy(retries=2, delay=0.01))
    flaky, attempts = flaky_factory(2)
    assert engine.run("await flaky(3)", {"flaky": flaky}, key="default") == 3
    assert len(attempts) == 3


def test_per_run_policy_and_decorator_wins(sqlite_engine: Engine) -> None:
    flaky, attempts = flaky_factory(1)
    once = retry(retries=0)(flaky)
    with pytest.raises(WorkflowFailed, match="after 1 attempt"):
        sqlite_engine.run("await once(1)", {"once": once}, key="deco-wins", retry=RetryPolicy(retries=5, delay=0.01))
    assert len(attempts) == 1


def test_only_matching_exceptions_are_retried(sqlite_engine: Engine) -> None:
    flaky, attempts = flaky_factory(1, exc=KeyError)
    flaky = retry(retries=3, delay=0.01, retry_on=TimeoutError)(flaky)
    with pytest.raises(WorkflowFailed):
        sqlite_engine.run("await flaky(1)", {"flaky": flaky}, key="retry-on")
    assert len(attempts) == 1


def test_exception_after_last_attempt_reaches_the_workflow(engine: Engine) -> None:
    flaky, attempts = flaky_factory(10)
    flaky = retry(retries=2, backoff="constant", delay=0.01)(flaky)
    code = "try:\n    r = await flaky(1)\nexcept TimeoutError as e:\n    r = 'handled ' + str(e)\nr"
    assert engine.run(code, {"flaky": flaky}, key="last-attempt") == "handled attempt 3 failed"
    assert len(attempts) == 3


def test_a_call_of_a_batched_gather_is_retried_alone(sqlite_engine: Engine) -> None:
    tries: dict[int, int] = {}

    @retry(retries=3, backoff="constant", delay=0.01)
    def shaky(x: int) -> int:
        tries[x] = tries.get(x, 0) + 1
        if x == 2 and tries[x] < 3:
            raise TimeoutError(f"try {tries[x]}")
        return x * 10

    run = sqlite_engine.start("await gather(*[shaky(i) for i in range(4)])", {"shaky": shaky}, key="batched-retry")
    assert run.result(timeout=30) == [0, 10, 20, 30]
    assert tries == {0: 1, 1: 1, 2: 3, 3: 1}
    assert [(c.call_id, c.attempts, c.status) for c in run.calls()] == [
        (0, 1, "done"),
        (1, 1, "done"),
        (2, 3, "done"),
        (3, 1, "done"),
    ]
