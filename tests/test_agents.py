"""The durable pydantic-ai agent (durable_monty_nb.agents): model requests and tool calls are
durable calls; a run killed with SIGKILL (a process, a kernel) in the middle of a multi-step run
resumes without making a stored model request again; approval through a signal.

The model is pydantic-ai's FunctionModel, scripted: offline and deterministic. Every model
request and tool call writes ``<pid> <entry>`` to $SIDE_LOG, the side-effect log.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from ci import require_module
from procs import fuzz_random, kill, log_entries, wait_until

from durable_monty_nb import Engine
from durable_monty_nb.agents import AGENT_LOOP, DENIED, DurableAgent, agent_loop, approval_signal
from durable_monty_nb.store.store import Store

require_module("pydantic_ai", extra="agents")  # in CI a missing extra fails, never skips

# The agent, as source: run in this process, in runner subprocesses and in kernels alike.
# It looks up LOOKUPS cities one request at a time, then books a flight (approval needed), then answers.
AGENT_SETUP = '''
import os, time
from pydantic_ai import ModelRetry, Tool
from pydantic_ai.messages import ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import FunctionModel
from durable_monty_nb.agents import DurableAgent

LOOKUPS = int(os.environ.get("AGENT_LOOKUPS", "2"))
CITIES = ["Lisbon", "Porto", "Faro", "Braga", "Evora", "Coimbra", "Aveiro", "Sintra"]


def side(entry):
    with open(os.environ["SIDE_LOG"], "a") as handle:
        handle.write(f"{os.getpid()} {entry}\\n")
    gate = os.environ.get("HOLD_GATE", "")
    while gate and entry == os.environ.get("HOLD_AT") and os.path.exists(gate):  # in flight while the test holds it
        time.sleep(0.01)


def scripted(messages, info):
    side(f"model {len(messages)}")
    time.sleep(float(os.environ.get("MODEL_DELAY", "0")))
    parts = messages[-1].parts
    returns = [p for p in parts if isinstance(p, ToolReturnPart)]
    done = sum(1 for m in messages for p in m.parts if isinstance(p, ToolReturnPart) and p.tool_name == "lookup")
    if returns and returns[0].tool_name == "book":
        return ModelResponse(parts=[TextPart(f"{returns[0].content} after {done} lookups")])
    if done < LOOKUPS:
        return ModelResponse(parts=[ToolCallPart("lookup", {"city": CITIES[done]}, tool_call_id=f"look-{done}")])
    return ModelResponse(parts=[ToolCallPart("book", {"city": returns[0].content["city"]}, tool_call_id="book")])


def lookup(city: str) -> dict:
    """Flights to a city."""
    side(f"lookup {city}")
    return {"city": city, "flights": len(city)}


def book(city: str) -> str:
    """Book a flight (pays)."""
    side(f"book {city}")
    return f"booked {city}"


agent = DurableAgent(
    FunctionModel(scripted), tools=[lookup, Tool(book, requires_approval=True)], instructions="Be quick."
)
model_step, run_tool = agent.model_step, agent.run_tool
prompt, max_turns = "Fly me somewhere", 20
'''

RUNNER = """
import json, sys
from durable_monty_nb import Engine
exec(compile(open(sys.argv[3]).read(), "agent_setup", "exec"))
engine = Engine(sys.argv[1], lease_ttl=1.5)
run = agent.start(engine, prompt, key=sys.argv[2], max_turns=max_turns)
print("STARTED", run.execution_id, flush=True)
print("RESULT", json.dumps(run.result(120)), flush=True)
"""


def load_agent(log: Path, monkeypatch: pytest.MonkeyPatch, lookups: int = 2) -> dict[str, Any]:
    monkeypatch.setenv("SIDE_LOG", str(log))
    monkeypatch.setenv("AGENT_LOOKUPS", str(lookups))
    namespace: dict[str, Any] = {}
    exec(compile(AGENT_SETUP, "agent_setup", "exec"), namespace)
    return namespace


def entries(log: Path) -> list[str]:
    return [entry for _, entry in log_entries(log)]


def until_parked(run: Any) -> None:
    wait_until(lambda: run.parked, what="the run to wait for its approval")


# -- in one process ------------------------------------------------------------------------------------


def test_approved_run_then_every_step_is_reused(sqlite_engine: Engine, tmp_path: Path, monkeypatch: Any) -> None:
    log = tmp_path / "side.log"
    ns = load_agent(log, monkeypatch)
    run = ns["agent"].start(sqlite_engine, "Fly me somewhere", key="trip")
    until_parked(run)
    assert [w.name for w in run.waits()] == [approval_signal("book")] == ["approve-book"]
    assert entries(log) == ["model 1", "lookup Lisbon", "model 3", "lookup Porto", "model 5"]
    sqlite_engine.signal("trip", "approve-book", {"approved": True})
    assert run.result(30) == "booked Porto after 2 lookups"
    made = entries(log)
    assert made == ["model 1", "lookup Lisbon", "model 3", "lookup Porto", "model 5", "book Porto", "model 7"]
    # The same cell again: the stored result, nothing runs.
    again = ns["agent"].start(sqlite_engine, "Fly me somewhere", key="trip")
    assert again.result(30) == "booked Porto after 2 lookups" and again.cached
    assert entries(log) == made


def test_a_changed_loop_reuses_the_stored_steps_and_asks_for_its_own_approval(
    sqlite_engine: Engine, tmp_path: Path, monkeypatch: Any
) -> None:
    log = tmp_path / "side.log"
    ns = load_agent(log, monkeypatch)
    functions = {**ns["agent"].functions(), "prompt": "Fly me somewhere"}
    first = sqlite_engine.start(agent_loop("prompt", 8), functions, key="trip")
    until_parked(first)
    sqlite_engine.signal("trip", "approve-book", True)
    assert first.result(30) == "booked Porto after 2 lookups"
    made = entries(log)
    assert sqlite_engine.run(agent_loop("prompt", 8), functions, key="trip") == "booked Porto after 2 lookups"
    changed = sqlite_engine.start(agent_loop("prompt", 9), functions, key="trip")  # edited code: a new execution
    until_parked(changed)  # every step up to the approval came from the store
    assert entries(log) == made
    sqlite_engine.signal("trip", "approve-book", True)
    assert changed.result(30) == "booked Porto after 2 lookups"
    assert entries(log) == made  # the booking and the last request too
    assert changed.progress.reused >= 5


def test_rejected_tool_is_not_run_and_the_model_hears_why(
    sqlite_engine: Engine, tmp_path: Path, monkeypatch: Any
) -> None:
    log = tmp_path / "side.log"
    ns = load_agent(log, monkeypatch, lookups=1)
    seen: list[Any] = []

    def model(messages: list[Any], info: Any) -> Any:
        from pydantic_ai.messages import ModelResponse, TextPart, ToolCallPart

        seen.append(messages[-1].parts[0])
        if len(messages) == 1:
            return ModelResponse(parts=[ToolCallPart("book", {"city": "Faro"}, tool_call_id="b")])
        return ModelResponse(parts=[TextPart(f"gave up: {messages[-1].parts[0].content}")])

    from pydantic_ai.models.function import FunctionModel

    agent = DurableAgent(FunctionModel(model), tools=[ns["book"]], approval=["book"])
    run = agent.start(sqlite_engine, "book Faro", key="no")
    until_parked(run)
    sqlite_engine.signal("no", "approve-book", {"approved": False, "reason": "Too expensive."})
    assert run.result(30) == f"gave up: {DENIED} Too expensive."
    assert entries(log) == []  # book never ran
    assert seen[-1].tool_call_id == "b" and seen[-1].tool_name == "book"


def test_bad_arguments_unknown_tools_and_model_retry_go_back_to_the_model(tmp_path: Path, monkeypatch: Any) -> None:
    from pydantic_ai import ModelRetry
    from pydantic_ai.messages import ModelResponse, TextPart
    from pydantic_ai.models.function import FunctionModel

    def picky(city: str) -> str:
        """A tool that asks for another try."""
        raise ModelRetry(f"no flights to {city}, try another city")

    agent = DurableAgent(
        FunctionModel(lambda m, i: ModelResponse(parts=[TextPart("ok")])), tools=[picky], instructions="x"
    )
    bad = agent.run_tool({"tool_name": "picky", "args": {"town": 1}, "tool_call_id": "a"})
    assert (bad["part_kind"], bad["outcome"], bad["tool_call_id"]) == ("tool-return", "retried", "a")
    assert bad["retry"]["cause"] == "validation_error" and "city" in json.dumps(bad["content"])
    unknown = agent.run_tool({"tool_name": "nope", "args": "{}", "tool_call_id": "b"})
    assert unknown["outcome"] == "retried" and "Unknown tool name" in unknown["content"]
    retry = agent.run_tool({"tool_name": "picky", "args": '{"city": "Faro"}', "tool_call_id": "c"})
    assert retry["outcome"] == "retried" and retry["content"] == "no flights to Faro, try another city"
    assert retry["retry"]["cause"] == "model_retry"
    step = agent.model_step([{"kind": "request", "parts": [{"part_kind": "user-prompt", "content": "hi"}]}])
    assert step["done"] and step["output"] == "ok" and step["tool_calls"] == []
    assert step["response"]["kind"] == "response"
    json.dumps(step)  # JSON all the way: it crosses into the sandbox as it is


def test_the_fingerprint_follows_the_model_tools_and_instructions() -> None:
    from pydantic_ai.models.function import FunctionModel
    from pydantic_ai.models.test import TestModel

    from durable_monty_nb.engine.fingerprint import function_fingerprint

    def a(x: int) -> int:
        """A tool."""
        return x

    def b(y: str) -> str:
        """Another tool."""
        return y

    def fp(**options: Any) -> str:
        options.setdefault("tools", [a])
        return function_fingerprint(DurableAgent(options.pop("model", TestModel()), **options).model_step)

    base = fp()
    assert fp() == base  # stable
    assert fp(tools=[a, b]) != base
    assert fp(instructions="be brief") != base
    assert fp(model=FunctionModel(lambda m, i: None)) != base

    def a2(x: int) -> int:  # the same schema as a, other code
        """A tool."""
        return x + 1

    a2.__name__ = "a"
    tools = function_fingerprint(DurableAgent(TestModel(), tools=[a]).run_tool)
    assert function_fingerprint(DurableAgent(TestModel(), tools=[a]).run_tool) == tools
    assert function_fingerprint(DurableAgent(TestModel(), tools=[a2]).run_tool) != tools
    assert function_fingerprint(DurableAgent(TestModel(), tools=[a], approval=["a"]).run_tool) != tools


def test_from_agent_takes_the_model_and_function_tools() -> None:
    from pydantic_ai import Agent
    from pydantic_ai.models.test import TestModel

    def weather(city: str) -> str:
        """The weather of a city."""
        return f"sunny in {city}"

    agent = Agent(TestModel(), tools=[weather])

    @agent.tool_plain
    def book(city: str) -> str:
        """Book a trip."""
        return f"booked {city}"

    durable = DurableAgent.from_agent(agent, approval=["book"])
    assert sorted(durable.tools) == ["book", "weather"] and durable.needs_approval == {"book"}
    with pytest.raises(ValueError, match="unknown tools"):
        DurableAgent.from_agent(agent, approval=["nope"])


def test_test_model_runs_the_loop_end_to_end(sqlite_engine: Engine) -> None:
    """pydantic-ai's TestModel calls every tool once, then answers with their results as JSON."""
    from pydantic_ai.models.test import TestModel

    calls: list[str] = []

    def weather(city: str) -> str:
        """The weather of a city."""
        calls.append(city)
        return f"sunny in {city}"

    agent = DurableAgent(TestModel(), tools=[weather])
    answer = agent.start(sqlite_engine, "weather?", key="tm").result(30)
    assert calls == ["a"] and "sunny in a" in answer


# -- processes and kernels killed with SIGKILL -------------------------------------------------------------


def spawn(db: str, key: str, log: Path, tmp_path: Path, **env: str) -> subprocess.Popen[str]:
    setup, runner = tmp_path / "agent_setup.py", tmp_path / "agent_runner.py"
    setup.write_text(AGENT_SETUP)
    runner.write_text(RUNNER)
    full_env = {**os.environ, "SIDE_LOG": str(log), **env}
    return subprocess.Popen(
        [sys.executable, str(runner), db, key, str(setup)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
    )


def waiting_for_approval(store: Store, key: str) -> bool:
    row = store.latest_execution(key)
    return row is not None and any(
        c.kind == "signal" and c.status == "pending" and "approve-book" in c.args for c in store.load_calls(row.id)
    )


def test_process_killed_while_waiting_for_the_approval(sqlite_url: str, tmp_path: Path) -> None:
    store, log = Store(sqlite_url), tmp_path / "side.log"
    first = spawn(sqlite_url, "trip", log, tmp_path, AGENT_LOOKUPS="3")
    wait_until(lambda: waiting_for_approval(store, "trip"), what="the approval wait", procs=(first,))
    kill(first)
    before = entries(log)
    assert before == ["model 1", "lookup Lisbon", "model 3", "lookup Porto", "model 5", "lookup Faro", "model 7"]
    Engine(sqlite_url).signal("trip", "approve-book", {"approved": True})  # while nobody drives it: kept
    second = spawn(sqlite_url, "trip", log, tmp_path, AGENT_LOOKUPS="3")
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    assert 'RESULT "booked Faro after 3 lookups"' in out
    assert entries(log) == [*before, "book Faro", "model 9"]  # no model request made twice
    assert len({pid for pid, _ in log_entries(log)}) == 2
    third = spawn(sqlite_url, "trip", log, tmp_path, AGENT_LOOKUPS="3")  # once more: the stored result
    out, err = third.communicate(timeout=120)
    assert third.returncode == 0, err
    assert 'RESULT "booked Faro after 3 lookups"' in out
    assert entries(log) == [*before, "book Faro", "model 9"]
    assert len(store.list_executions(latest_only=False)) == 1


def in_flight(store: Store, key: str, function: str) -> list[Any]:
    row = store.latest_execution(key)
    return [c for c in store.load_calls(row.id) if c.function == function and c.status == "pending"] if row else []


@pytest.mark.parametrize(
    ("held", "function"),
    [("model 5", "model_step"), ("lookup Faro", "run_tool")],
    ids=["mid-model-request", "mid-tool-call"],
)
def test_process_killed_in_the_middle_of_a_step(sqlite_url: str, tmp_path: Path, held: str, function: str) -> None:
    """The kill lands where the test chooses: a model request (or a tool call) running, every
    earlier step stored. Only that step is made again; every stored one comes from the store."""
    store, log, gate = Store(sqlite_url), tmp_path / "side.log", tmp_path / "hold"
    gate.touch()
    env = {"AGENT_LOOKUPS": "5"}
    first = spawn(sqlite_url, "trip", log, tmp_path, **env, HOLD_AT=held, HOLD_GATE=str(gate))
    assert first.stdout.readline().startswith("STARTED")
    Engine(sqlite_url).signal("trip", "approve-book", {"approved": True})  # before the wait: kept in the mailbox
    wait_until(lambda: entries(log)[-1:] == [held], what=f"{held} to start", procs=(first,))
    wait_until(lambda: len(in_flight(store, "trip", function)) == 1, what=f"the {function} call in flight")
    stored = [c for c in store.load_calls(store.latest_execution("trip").id) if c.status == "done"]
    assert len(stored) == len(entries(log)) - 1  # the moment chosen: every step before it is stored
    kill(first)
    before = entries(log)
    second = spawn(sqlite_url, "trip", log, tmp_path, **env)
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    assert 'RESULT "booked Evora after 5 lookups"' in out
    made = entries(log)
    assert made[: len(before)] == before and made[len(before)] == held  # the step in flight, made again
    twice = [entry for entry, n in Counter(made).items() if n > 1]
    assert twice == [held]  # and no other
    assert len(made) == len(set(made)) + 1


@pytest.mark.parametrize("run", range(3))
def test_process_killed_at_a_random_moment_of_a_multi_step_run(sqlite_url: str, tmp_path: Path, run: int) -> None:
    """Beside the chosen moments above: wherever a random kill lands, a model request or tool
    call made twice can only be the one in flight at the kill (the last the killed process
    began): every stored one is answered from the store. The seed is printed (shown on failure)."""
    rng = fuzz_random(run)
    store, log = Store(sqlite_url), tmp_path / "side.log"
    env = {"AGENT_LOOKUPS": "5", "MODEL_DELAY": "0.05"}
    first = spawn(sqlite_url, "trip", log, tmp_path, **env)
    assert first.stdout.readline().startswith("STARTED")
    Engine(sqlite_url).signal("trip", "approve-book", {"approved": True})  # before the wait: kept in the mailbox
    threading.Event().wait(rng.uniform(0.05, 0.6))
    kill(first)
    killed = log_entries(log)
    second = spawn(sqlite_url, "trip", log, tmp_path, **env)
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    assert 'RESULT "booked Evora after 5 lookups"' in out
    made = [entry for _, entry in log_entries(log)]
    expected = [f"model {1 + 2 * i}" for i in range(7)] + [f"lookup {c}" for c in CITIES[:5]] + ["book Evora"]
    assert sorted(set(made)) == sorted(expected)
    twice = [entry for entry, n in Counter(made).items() if n > 1]
    assert len(twice) <= 1 and (not twice or twice == [killed[-1][1]]), (killed, made)
    assert waiting_for_approval(store, "trip") is False


CITIES = ["Lisbon", "Porto", "Faro", "Braga", "Evora"]


@pytest.mark.kernel
def test_kernel_killed_while_waiting_for_the_approval_then_rerun(tmp_path: Path) -> None:
    from kernels import Kernel

    db = f"sqlite:///{tmp_path / 'notebook.db'}"
    log = tmp_path / "side.log"
    env = {"SIDE_LOG": str(log), "DURABLE_MONTY_DB": db, "AGENT_LOOKUPS": "2"}
    cell = "%%durable trip\n" + AGENT_LOOP

    def start() -> Kernel:
        kernel = Kernel(tmp_path, env)
        kernel.ok("%load_ext durable_monty_nb")
        kernel.ok(AGENT_SETUP)
        return kernel

    kernel = start()
    reply = kernel.ok(cell)  # parked on the approval: the cell returns
    assert reply.result is None
    assert any("waiting for signal 'approve-book'" in text for text in reply.widget_text)
    kernel.kill()
    store = Store(db)
    assert waiting_for_approval(store, "trip")
    before = entries(log)
    assert before == ["model 1", "lookup Lisbon", "model 3", "lookup Porto", "model 5"]
    done = subprocess.run(
        [sys.executable, "-m", "durable_monty_nb", "signal", "--db", db, "trip", "approve-book", '{"approved": true}'],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    kernel = start()
    try:
        assert kernel.ok(cell).result == "'booked Porto after 2 lookups'"
        assert kernel.ok("len(messages)").result == "8"
    finally:
        kernel.close()
    assert entries(log) == [*before, "book Porto", "model 7"]  # no model request made twice
    assert store.latest_execution("trip").status == "completed"
