"""The HTTP server as a real uvicorn process (``durable-monty-nb serve``), hit over sockets with httpx.

Every refused request is checked to change nothing in the store; a Hypothesis fuzz of paths,
headers, tokens and bodies asserts that no bad request gets a 2xx and that nothing gets a 5xx.
Log lines are checked for tokens.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from ci import missing, require_module
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from procs import free_port, wait_until

from durable_monty_nb import Engine, external, retry
from durable_monty_nb.tokens import admin_token, call_token, cancel_token, make_token, signal_token

require_module("starlette", extra="server")  # in CI a missing extra fails, never skips
require_module("uvicorn", extra="server")
httpx = require_module("httpx", extra="test")
MAX_BODY = 1 << 20


class Served:
    def __init__(self, tmp: Path) -> None:
        self.url_db = f"sqlite:///{tmp / 'served.db'}"
        self.engine = Engine(self.url_db, lease_ttl=1.5)  # polls the mailbox every 0.5 s
        self.store = self.engine.store
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "server.log"
        self._log_handle = self.log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "durable_monty_nb", "serve", "--db", self.url_db, "--port", str(self.port)],
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
        )
        self.client = httpx.Client(base_url=self.base, timeout=30)
        try:
            wait_until(self._listening, what="the server to listen", procs=())
        except AssertionError as exc:
            self.close()
            missing(f"the server did not start: {exc}\n{self.log.read_text()}")

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"serve exited with {self.proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def close(self) -> None:
        self.client.close()
        self.proc.terminate()
        self.proc.wait(30)
        self._log_handle.close()
        for run in self.engine.active_runs():
            run.cancel()
            run.wait(30)
        self.engine.close()

    def snapshot(self) -> list[Any]:
        with self.store.engine.connect() as conn:
            return [
                conn.execute(sa.text(f"SELECT * FROM {table} ORDER BY 1, 2")).all()
                for table in ("dm_signals", "dm_calls", "dm_executions", "dm_checkpoints")
            ]


def parked(engine: Engine, key: str, code: str = 'v = await signal("approval")\nv') -> str:
    """An execution waiting for a signal that nobody drives (interrupted): the store stays still."""
    run = engine.start(code, {}, key=key)
    wait_until(lambda: run.parked, what="the run to park")
    run.cancel()
    run.wait(30)
    return run.execution_id


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    server = Served(tmp_path_factory.mktemp("served"))
    server.parked_id = parked(server.engine, "parked")  # type: ignore[attr-defined]
    server.engine.run("1 + 1", {}, key="done")
    server.done_id = server.store.latest_execution("done").id  # type: ignore[attr-defined]
    yield server
    server.close()
    text = server.log.read_text()
    assert "dm1." not in text  # no token in any log line
    assert "/calls/<token>/complete" in text  # completion paths are logged redacted


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- answers ------------------------------------------------------------------------------------


def test_signal_delivery_over_http_completes_a_live_run(served: Served) -> None:
    run = served.engine.start('v = await signal("approval", timeout=60)\nv', {}, key="live")
    wait_until(lambda: run.parked, what="the run to park")
    token = signal_token(served.store.signer, run.execution_id, "approval")
    answer = served.client.post(
        "/executions/live/signals/approval",
        headers=bearer(token),
        json={"value": {"approved": True}, "idempotency_key": "a"},
    )
    assert answer.status_code == 200 and answer.json()["delivered"] is True
    again = served.client.post(
        "/executions/live/signals/approval", headers=bearer(token), json={"value": 0, "idempotency_key": "a"}
    )
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert run.result(30) == {"approved": True}  # found by the driver's poll: the server is another process
    status = served.client.get(f"/executions/{run.execution_id}", headers=bearer(token))
    assert status.status_code == 200
    body = status.json()
    assert body["status"] == "completed" and body["mailbox"][0]["consumed"] is True
    assert served.client.post("/executions/live/signals/approval", headers=bearer(token), json={}).status_code == 409


def test_refusals_change_nothing(served: Served) -> None:
    signer = served.store.signer
    good = signal_token(signer, served.parked_id, "approval")
    other_execution = signal_token(signer, served.done_id, "approval")
    other_signal = signal_token(signer, served.parked_id, "other")
    expired = signal_token(signer, served.parked_id, "approval", expires_in=-1)
    forged = good[:-4] + ("0000" if not good.endswith("0000") else "1111")
    path = "/executions/parked/signals/approval"
    before = served.snapshot()
    cases = [
        (path, {}, b'{"value": 1}', 401),
        (path, bearer(forged), b'{"value": 1}', 401),
        (path, bearer(expired), b'{"value": 1}', 401),
        (path, {"Authorization": f"Basic {good}"}, b'{"value": 1}', 401),
        (path, bearer(other_execution), b'{"value": 1}', 403),
        (path, bearer(other_signal), b'{"value": 1}', 403),
        (path, bearer(good), b'{"value": ', 400),
        (path, bearer(good), b"[1]", 400),
        (path, bearer(good), b'{"value": 1, "extra": 2}', 400),
        (path, bearer(good), b'{"value": 1, "idempotency_key": 5}', 400),
        (path, bearer(good), b"\xff\xfe", 400),
        (path, bearer(good), b'{"value": "' + b"x" * MAX_BODY + b'"}', 413),
        ("/executions/nobody/signals/approval", bearer(admin_token(signer)), b'{"value": 1}', 404),
        ("/executions/parked/signals/bad%20name", bearer(admin_token(signer)), b'{"value": 1}', 400),
        ("/executions/done/signals/approval", bearer(admin_token(signer)), b'{"value": 1}', 409),
        ("/calls/" + good + "/complete", {}, b'{"value": 1}', 403),
        ("/calls/" + forged + "/complete", {}, b'{"value": 1}', 401),
        ("/calls/dm1.x.y/complete", {}, b'{"value": 1}', 401),
        ("/executions/parked/cancel", {}, b"", 401),
        ("/executions/parked/cancel", bearer(good), b"", 403),  # a signal token cancels nothing
        ("/executions/parked/cancel", bearer(cancel_token(signer, served.done_id)), b"", 403),
        ("/executions/parked/cancel", bearer(cancel_token(signer, served.parked_id)), b'{"now": 1}', 400),
        ("/executions/parked/cancel", bearer(cancel_token(signer, served.parked_id)), b"", 409),  # nobody drives it
        ("/executions/done/cancel", bearer(admin_token(signer)), b"{}", 409),
        ("/executions/nobody/cancel", bearer(admin_token(signer)), b"", 404),
    ]
    for url, headers, body, status in cases:
        answer = served.client.post(url, headers={**headers, "Content-Type": "application/json"}, content=body)
        assert answer.status_code == status, (url, body[:40], answer.text)
        assert "error" in answer.json()
    chunked = served.client.post(path, headers=bearer(good), content=iter([b'{"value": "', b"x" * MAX_BODY, b'"}']))
    assert chunked.status_code == 413
    assert served.client.get("/executions/parked").status_code == 401
    assert served.client.get("/executions/parked", headers=bearer(other_execution)).status_code == 403
    assert served.client.get("/executions/nobody", headers=bearer(admin_token(signer))).status_code == 404
    assert served.snapshot() == before
    status = served.client.get("/executions/parked", headers=bearer(admin_token(signer))).json()
    assert status["waiting_for"] == [{"kind": "signal", "name": "approval", "call_id": 0, "due_at": None, "attempt": 1}]


def test_external_call_completed_over_http(served: Served) -> None:
    published: queue.Queue[Any] = queue.Queue()

    @retry(retries=1, delay=0)
    @external(hook=published.put)
    def render(x: int) -> str:
        raise AssertionError("an external function never runs in the kernel")

    run = served.engine.start("r = await gather(render(1), render(2))\nr", {"render": render}, key="ext")
    first, second = sorted((published.get(timeout=30), published.get(timeout=30)), key=lambda c: c.call_id)
    assert first.args == (1,) and "/calls/" in first.url
    url = f"/calls/{first.token}/complete"
    assert served.client.post(url, json={"value": "one"}).status_code == 200
    assert served.client.post(url, json={"value": "one"}).json()["duplicate"] is True  # identical: idempotent
    assert served.client.post(url, json={"value": "uno"}).status_code == 409
    assert served.client.post(url, json={"value": 1, "error": {"type": "ValueError"}}).status_code == 400
    failed = served.client.post(
        f"/calls/{second.token}/complete", json={"error": {"type": "ValueError", "message": "render farm down"}}
    )
    assert failed.status_code == 200
    retried = published.get(timeout=30)  # the retry policy publishes attempt 2 with a token of its own
    assert retried.call_id == second.call_id and retried.attempt == 2
    stale = served.client.post(f"/calls/{second.token}/complete", json={"value": "late"})
    assert stale.status_code == 409
    assert served.client.post(f"/calls/{retried.token}/complete", json={"value": "two"}).status_code == 200
    assert run.result(30) == ["one", "two"]
    other = call_token(served.store.signer, "0" * 32, 0, 1)
    assert served.client.post(f"/calls/{other}/complete", json={"value": 1}).status_code == 404


# -- detached runs: a real runner drives them ------------------------------------------------------


@pytest.fixture
def runner_of(served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A ``durable-monty-nb runner`` subprocess of the served store (test_detach's), the side log
    and the gate file of test_detach's cell functions, and those functions."""
    from test_detach import CELL_FUNCTIONS, Runners, notebook

    log, gate = tmp_path / "side.log", tmp_path / "gate"
    monkeypatch.setenv("SIDE_LOG", str(log))
    monkeypatch.setenv("GATE_FILE", str(gate))
    runners = Runners(served.url_db, tmp_path)
    yield runners, log, gate, notebook(CELL_FUNCTIONS)
    runners.stop()


def test_cancel_over_http_stops_a_detached_run_and_the_status_names_its_runner(served: Served, runner_of: Any) -> None:
    from test_detach import SEQUENTIAL, logged

    runners, log, gate, ns = runner_of
    gate.touch()
    run = served.engine.start(SEQUENTIAL, ns, key="http-detached", detach=True)
    token = cancel_token(served.store.signer, run.execution_id)
    waiting = served.client.get("/executions/http-detached", headers=bearer(token)).json()
    assert waiting["detached"] is True and waiting["runner"]["state"] == "unclaimed"
    assert waiting["status"] == "handed over"  # not "crashed": a runner will take it
    runners.start("http-runner")
    wait_until(lambda: len(logged(log)) >= 3, what="three calls done by the runner")

    def driven() -> Any:
        body = served.client.get("/executions/http-detached", headers=bearer(token)).json()
        return body["calls"]["running"] == 1 and body  # the held call, as the runner sees it

    body = wait_until(driven, what="the runner's live counts")
    assert body["runner"]["runner"] == "http-runner" and body["runner"]["state"] == "driving"
    assert "process" in body["runner"]["owner"] and body["runner"]["cancel_requested"] is False
    assert body["calls"]["done"] == 3 and body["calls"]["queued"] == 0
    signal_only = signal_token(served.store.signer, run.execution_id, "approval")
    assert served.client.post("/executions/http-detached/cancel", headers=bearer(signal_only)).status_code == 403
    answer = served.client.post("/executions/http-detached/cancel", headers=bearer(token))
    assert answer.status_code == 200, answer.text
    assert answer.json()["cancelled"] is True and answer.json()["runner"]["cancel_requested"] is True
    wait_until(lambda: "cancels 'http-detached'" in runners.output("http-runner"), what="the runner passing it on")
    gate.unlink()  # the held call finishes and is kept; no other starts
    assert run.wait(60) and run.status == "interrupted"

    def ended() -> Any:  # the runner marks its hand-over ended in its next round, after the row
        body = served.client.get("/executions/http-detached", headers=bearer(token)).json()
        return body["runner"]["state"] == "ended" and body

    after = wait_until(ended, what="the runner marking the run ended")
    assert after["status"] == "interrupted"
    assert sorted(i for _, i in logged(log)) == [0, 1, 2, 3]
    again = served.client.post("/executions/http-detached/cancel", headers=bearer(token))
    assert again.status_code == 409 and "nothing to cancel" in again.json()["error"]


def test_cancel_over_http_of_a_handed_over_run_no_runner_claimed_interrupts_it_at_once(
    served: Served, runner_of: Any
) -> None:
    from test_detach import SEQUENTIAL

    _, log, _, ns = runner_of
    run = served.engine.start(SEQUENTIAL, ns, key="http-unclaimed", detach=True)
    answer = served.client.post("/executions/http-unclaimed/cancel", headers=bearer(admin_token(served.store.signer)))
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "interrupted" and answer.json()["runner"]["state"] == "ended"
    assert run.wait(30) and run.status == "interrupted" and not log.exists()  # nothing ran


def test_a_signal_over_http_reaches_a_detached_run_its_runner_drives(served: Served, runner_of: Any) -> None:
    from test_detach import logged

    runners, log, _, ns = runner_of
    code = "v = await signal('go')\nr = await step(v, held_from=99)\nr"
    run = served.engine.start(code, ns, key="http-signal", detach=True)
    runners.start("signal-runner")
    token = signal_token(served.store.signer, run.execution_id, "go")

    def parked() -> Any:
        body = served.client.get("/executions/http-signal", headers=bearer(token)).json()
        return body["waiting_for"] and body["runner"]["state"] == "driving" and body

    body = wait_until(parked, what="the runner's run to wait for the signal")
    assert body["waiting_for"][0]["name"] == "go"
    answer = served.client.post("/executions/http-signal/signals/go", headers=bearer(token), json={"value": 4})
    assert answer.status_code == 200 and answer.json()["delivered"] is True
    assert run.result(60) == 40
    assert [pid for pid, _ in logged(log)] == [runners.procs[0].pid]


def test_a_kernel_driven_run_is_cancelled_by_its_own_server_and_refused_by_another(served: Served) -> None:
    from durable_monty_nb.server.app import BackgroundServer

    run = served.engine.start('v = await signal("go", timeout=120)\nv', {}, key="kernel-driven")
    wait_until(lambda: run.parked, what="the run to park")
    token = cancel_token(served.store.signer, run.execution_id)
    before = served.snapshot()
    refused = served.client.post("/executions/kernel-driven/cancel", headers=bearer(token))
    assert refused.status_code == 409  # the served process does not drive it, and no runner does
    assert "not by a runner" in refused.json()["error"] and "%durable_cancel kernel-driven" in refused.json()["error"]
    assert served.snapshot() == before and not run.done
    status = served.client.get("/executions/kernel-driven", headers=bearer(token)).json()
    assert status["detached"] is False and status["runner"] is None
    own = BackgroundServer(served.store, port=free_port(), engine=served.engine)  # as %durable_serve serves
    own.start()
    try:
        with httpx.Client(base_url=own.url, timeout=30) as client:
            answer = client.post("/executions/kernel-driven/cancel", headers=bearer(token))
        assert answer.status_code == 200, answer.text
        assert run.wait(30) and run.status == "interrupted"
    finally:
        own.stop()


def listening_addresses(port: int) -> set[str]:
    """The local addresses of the sockets listening on ``port``, read from the kernel's tables."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as handle:
            for line in handle.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, port_hex = local.rsplit(":", 1)
                if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
                    found.add(address)
    return found


def test_an_external_call_nobody_completes_times_out_in_the_workflow(served: Served) -> None:
    published: queue.Queue[Any] = queue.Queue()

    @external(hook=published.put, timeout=0.5)
    def render(x: int) -> str:
        raise AssertionError("an external function never runs in the kernel")

    code = "try:\n    r = await render(1)\nexcept TimeoutError as e:\n    r = 'timed out: ' + str(e)\nr"
    run = served.engine.start(code, {"render": render}, key="ext-timeout")
    call = published.get(timeout=30)
    result = run.result(30)
    assert result == "timed out: render() was not completed within its timeout"
    late = served.client.post(f"/calls/{call.token}/complete", json={"value": "late"})
    assert late.status_code == 409  # the attempt is over: a late completion changes nothing
    assert served.engine.store.latest_execution("ext-timeout").status == "completed"


EXTERNAL_RUNNER = """
import json, os, sys
from durable_monty_nb import Engine, external

def publish(call):
    with open(os.environ["PUBLISHED"], "a") as handle:
        handle.write(json.dumps({"pid": os.getpid(), "attempt": call.attempt, "token": call.token}) + "\\n")

@external(hook=publish)
def render(x):
    raise AssertionError("never runs in the kernel")

engine = Engine(sys.argv[1], lease_ttl=1.5)
run = engine.start("r = await render(7)\\n'rendered ' + r", {"render": render}, key="ext-down")
print("RESULT", json.dumps(run.result(60)), flush=True)
"""


def test_a_completion_that_arrives_while_the_kernel_is_down_is_taken_on_resume(served: Served, tmp_path: Path) -> None:
    published = tmp_path / "published.jsonl"
    env = {**os.environ, "PUBLISHED": str(published)}

    def runner() -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-c", EXTERNAL_RUNNER, served.url_db],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )

    def hooks() -> list[dict[str, Any]]:
        return [json.loads(line) for line in published.read_text().splitlines()] if published.exists() else []

    first = runner()
    wait_until(lambda: len(hooks()) == 1, what="the attempt to be published", procs=(first,))
    first.kill()  # the moment chosen: the attempt is published, nobody has completed it
    first.communicate(timeout=30)
    (call,) = hooks()
    answer = served.client.post(f"/calls/{call['token']}/complete", json={"value": "while down"})
    assert answer.status_code == 200, answer.text  # taken by the store while no process drives the run
    second = runner()
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    assert 'RESULT "rendered while down"' in out
    assert hooks() == [call]  # the resumed run took the completion: the attempt was not published again


def test_binds_localhost_by_default(served: Served) -> None:
    # What is bound, not what the log says: one listening socket, on 127.0.0.1 (0100007F) only.
    assert listening_addresses(served.port) == {"0100007F"}
    assert f"on http://127.0.0.1:{served.port}" in served.log.read_text()


# -- fuzz ----------------------------------------------------------------------------------------------

SEGMENT = st.text(st.characters(codec="utf-8", exclude_characters="/?#"), min_size=0, max_size=20)


def bad_requests(signer: Any, parked_id: str, done_id: str) -> st.SearchStrategy[tuple[str, str, dict, bytes]]:
    good = signal_token(signer, parked_id, "approval")
    admin = admin_token(signer)
    tokens = st.one_of(
        st.just(""),
        st.text(max_size=60),
        st.just(good).map(lambda t: t[:-1] + ("0" if t[-1] != "0" else "1")),  # forged
        st.just(signal_token(signer, parked_id, "approval", expires_in=-5)),  # expired
        st.just(signal_token(signer, done_id, "approval")),  # another execution
        st.just(signal_token(signer, parked_id, "other")),  # another signal
        st.just(make_token(signer, {"e": parked_id})),  # no scope
        st.just(call_token(signer, parked_id, 99, 1)),  # a call token, on a signal
    )
    json_bodies = st.one_of(
        st.binary(max_size=50),
        st.just(b'{"value": '),
        st.just(b"[]"),
        st.just(b'{"valeu": 1}'),
        st.just(b'{"value": 1, "idempotency_key": ""}'),
        st.just(b'{"value": 1, "idempotency_key": ' + b'"' + b"k" * 300 + b'"}'),
    )
    # Each request is bad in at least one way, whatever else is drawn.
    bad_token = st.tuples(
        st.just("POST"),
        st.just("/executions/parked/signals/approval"),
        tokens.map(lambda t: {"Authorization": f"Bearer {t}"}),
        st.one_of(st.just(b'{"value": 1}'), st.binary(max_size=30)),
    )
    bad_body = st.tuples(
        st.just("POST"),
        st.sampled_from(["/executions/parked/signals/approval", f"/executions/{parked_id[:12]}/signals/approval"]),
        st.just({"Authorization": f"Bearer {good}"}),
        json_bodies,
    )
    junk_path = st.tuples(
        st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
        st.one_of(
            st.builds(lambda a, b: f"/executions/{a}/signals/{b}", SEGMENT, SEGMENT),
            st.builds(lambda a: f"/calls/{a}/complete", SEGMENT),
            st.builds(lambda a: f"/executions/{a}/cancel", SEGMENT),
            st.builds(lambda a: f"/{a}", SEGMENT),
        ),
        st.one_of(st.just({}), tokens.map(lambda t: {"Authorization": f"Bearer {t}"})),
        st.binary(max_size=30),
    )
    unknown = st.tuples(
        st.just("POST"),
        st.builds(
            lambda a, what: f"/executions/zz{a}/{what}",
            st.text("abcdef0123456789", max_size=8),
            st.sampled_from(["signals/approval", "cancel"]),
        ),
        st.just({"Authorization": f"Bearer {admin}"}),
        st.just(b'{"value": 1}'),
    )
    return st.one_of(bad_token, bad_body, junk_path, unknown)


def test_fuzz_no_2xx_for_bad_requests_no_5xx_ever_no_store_change(served: Served) -> None:
    before = served.snapshot()
    strategy = bad_requests(served.store.signer, served.parked_id, served.done_id)
    seen: list[int] = []
    lock = threading.Lock()

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def check(request: tuple[str, str, dict, bytes]) -> None:
        method, path, headers, body = request
        try:
            answer = served.client.request(method, path, headers=headers, content=body or None)
        except (httpx.InvalidURL, httpx.LocalProtocolError, UnicodeEncodeError):
            return  # the client refuses to send it at all
        with lock:
            seen.append(answer.status_code)
        assert 400 <= answer.status_code < 500, (method, path, headers, body[:50], answer.status_code, answer.text)

    check()
    assert served.snapshot() == before
    assert served.proc.poll() is None  # still serving
    assert len(set(seen)) >= 4  # the fuzz reached several kinds of refusal
