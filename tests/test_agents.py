"""Durable pydantic-ai agents (durable_monty_nb.agents.NotebookDurability): every model request and
tool call of an agent run inside a durable call is a unit journaled in the store; a call run again
(a retry, a process or kernel SIGKILLed mid-agent then resumed, a killed RQ worker) replays them and
makes no completed request again. The agents are in tests/agent_trip.py (offline FunctionModels
that log each request and tool call to $SIDE_LOG).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from ci import require_module
from procs import fuzz_random, kill, log_entries, wait_until

from durable_monty_nb import Engine, WorkflowFailed, retry
from durable_monty_nb.agents import (
    APPROVAL_LOOP,
    DEFAULT_MODEL_RETRIES,
    DEFAULT_TOOL_RETRIES,
    DENIED,
    NotebookDurability,
    approval_signal,
)
from durable_monty_nb.store.keys import scoped_key
from durable_monty_nb.store.store import Store

require_module("pydantic_ai", extra="agents")  # in CI a missing extra fails, never skips

TESTS = Path(__file__).resolve().parent
CELL = "trip = await plan('Fly me somewhere')\ntrip"


@pytest.fixture
def trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The agents of tests/agent_trip.py, logging to a fresh side-effect log."""
    import agent_trip

    monkeypatch.setenv("SIDE_LOG", str(tmp_path / "side.log"))
    monkeypatch.setenv("AGENT_LOOKUPS", "2")
    return agent_trip


def entries(log: Path | str) -> list[str]:
    return [entry for _, entry in log_entries(Path(log))]


def expected(lookups: int) -> list[str]:
    from agent_trip import CITIES

    made = []
    for i in range(lookups):
        made += [f"model {1 + 2 * i}", f"lookup {CITIES[i]}"]
    return [*made, f"model {1 + 2 * lookups}", f"weather {CITIES[lookups - 1]}", f"model {3 + 2 * lookups}"]


def units(store: Store, kind: str | None = None) -> list[Any]:
    query = "SELECT execution_id, call_id, attempt, name, kind, result FROM dm_agent_units"
    with store.engine.connect() as conn:
        rows = conn.execute(sa.text(query + (" WHERE kind = :k" if kind else "")), {"k": kind}).all()
    return list(rows)


# -- in one process (threads) ----------------------------------------------------------------------


def test_structured_output_deps_and_a_toolset_every_unit_journaled(sqlite_engine: Engine, trip: Any) -> None:
    result = sqlite_engine.run(CELL, {"plan": trip.plan}, key="trip")
    assert isinstance(result, trip.Trip)  # a real model instance back
    assert result == trip.Trip(city="Porto", lookups=2, traveller="Ana", weather="sunny in Porto")
    log = os.environ["SIDE_LOG"]
    assert entries(log) == expected(2)
    rows = units(sqlite_engine.store)
    assert Counter(r.kind for r in rows) == {"model": 4, "tool": 3}
    assert {(r.call_id, r.attempt) for r in rows} == {(0, 1)}  # under the call's attempt
    # The same cell again: the stored result, nothing runs.
    assert sqlite_engine.run(CELL, {"plan": trip.plan}, key="trip") == result
    assert entries(log) == expected(2)


def test_a_retried_call_replays_its_agent_run_with_no_request_made_again(
    sqlite_engine: Engine, trip: Any, tmp_path: Path
) -> None:
    marker = tmp_path / "failed-once"

    @retry(retries=1, backoff="constant", delay=0.05)
    def plan_then_fail_once(question):
        answer = trip.plan(question)
        if not marker.exists():
            marker.write_text("x")
            raise RuntimeError("the call fails after its agent run")
        return answer

    result = sqlite_engine.run(
        "trip = await plan('Fly me somewhere')\ntrip", {"plan": plan_then_fail_once}, key="retried"
    )
    assert result == trip.Trip(city="Porto", lookups=2, traveller="Ana", weather="sunny in Porto")
    assert entries(os.environ["SIDE_LOG"]) == expected(2)  # the second attempt made no request
    assert {r.attempt for r in units(sqlite_engine.store)} == {1}


def test_an_async_notebook_function_and_an_event_handler_replayed_without_handling_twice(
    sqlite_engine: Engine, trip: Any, tmp_path: Path
) -> None:
    from pydantic_ai import Agent

    handled: list[str] = []

    async def handler(ctx: Any, events: Any) -> None:
        async for event in events:
            handled.append(type(event).__name__)

    from pydantic_ai.models.function import FunctionModel

    agent = Agent(
        FunctionModel(trip.planner, stream_function=trip.planner_stream),
        name="evented",
        output_type=trip.Trip,
        deps_type=trip.Deps,
        toolsets=[trip.forecasts],
        tools=[trip.lookup],
        capabilities=[NotebookDurability(event_stream_handler=handler)],
    )
    marker = tmp_path / "failed-once"

    @retry(retries=1, backoff="constant", delay=0.05)
    async def plan(question):
        result = await agent.run(question, deps=trip.Deps("Ana"))
        if not marker.exists():
            marker.write_text("x")
            raise RuntimeError("the call fails after its agent run")
        return result.output

    assert sqlite_engine.run(CELL, {"plan": plan}, key="async").city == "Porto"
    assert entries(os.environ["SIDE_LOG"]) == expected(2)
    # Each event handled once although the run ran twice: the second time from the journal.
    assert Counter(handled)["FunctionToolCallEvent"] == Counter(handled)["FunctionToolResultEvent"] == 3
    assert {r.name for r in units(sqlite_engine.store, "model")} == {"evented__model.request_stream"}
    assert len(units(sqlite_engine.store, "event")) > 0


def streaming_agent(trip: Any) -> Any:
    from pydantic_ai import Agent
    from pydantic_ai.models.function import FunctionModel

    return Agent(
        FunctionModel(trip.planner, stream_function=trip.planner_stream),
        name="streamed",
        output_type=trip.Trip,
        deps_type=trip.Deps,
        toolsets=[trip.forecasts],
        tools=[trip.lookup],
        capabilities=[NotebookDurability()],
    )


async def run_as(agent: Any, how: str, question: str, deps: Any) -> tuple[Any, list[Any]]:
    """``agent``'s output got the way ``how`` says, and what that way showed on the way (the
    nodes of ``iter``, the partial outputs of ``run_stream``, the events of ``run_stream_events``)."""
    if how == "run_sync":
        return await asyncio.to_thread(lambda: agent.run_sync(question, deps=deps).output), []
    if how == "run":
        return (await agent.run(question, deps=deps)).output, []
    if how == "iter":
        async with agent.iter(question, deps=deps) as run:
            nodes = [type(node).__name__ async for node in run]
        return run.result.output, nodes
    if how == "run_stream":
        async with agent.run_stream(question, deps=deps) as stream:
            partial = [output async for output in stream.stream_output(debounce_by=None)]
            return await stream.get_output(), partial
    async with agent.run_stream_events(question, deps=deps) as stream:
        events = [event async for event in stream]
    return events[-1].result.output, [type(event).__name__ for event in events]


@pytest.mark.parametrize("how", ["run_sync", "run", "iter", "run_stream", "run_stream_events"])
def test_every_way_of_running_an_agent_is_replayed_without_a_request_made_again(
    sqlite_engine: Engine, trip: Any, tmp_path: Path, how: str
) -> None:
    agent = streaming_agent(trip)
    attempts: list[Any] = []

    @retry(retries=1, backoff="constant", delay=0.05)
    async def plan(question):
        attempts.append(await run_as(agent, how, question, trip.Deps("Ana")))
        if len(attempts) == 1:
            raise RuntimeError("the call fails after its agent run")
        return len(attempts)

    assert sqlite_engine.run(CELL, {"plan": plan}) == 2  # no key: the call names the agent's run
    # The second attempt got the same output, and was shown the same on the way, from the journal alone.
    assert attempts[0] == attempts[1]
    output, shown = attempts[0]
    assert output == trip.Trip(city="Porto", lookups=2, traveller="Ana", weather="sunny in Porto")
    if how == "run_stream_events":
        assert shown.count("FunctionToolResultEvent") == 3 and shown[-1] == "AgentRunResultEvent"
    elif how != "run" and how != "run_sync":
        assert shown  # the nodes, or the partial outputs
    assert entries(os.environ["SIDE_LOG"]) == expected(2)
    streamed = how in ("run_stream", "run_stream_events")
    assert {r.name for r in units(sqlite_engine.store, "model")} == {
        "streamed__model.request_stream" if streamed else "streamed__model.request"
    }


def test_a_tool_image_replayed_from_the_journal_reaches_the_model_intact(
    sqlite_engine: Engine, trip: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tool's non-text output: journaled as data, and a request made after a replay sees it."""
    from pydantic_ai import Agent
    from pydantic_ai.messages import BinaryImage, ModelResponse, TextPart, ToolCallPart
    from pydantic_ai.models.function import FunctionModel

    pixel = bytes(range(256)) * 4

    def model(messages: list, info: Any) -> ModelResponse:
        trip.side(f"model {len(messages)}")
        if len(messages) == 1:
            return ModelResponse(parts=[ToolCallPart("snapshot", {}, tool_call_id="s")])
        trip.transient_failure(len(messages))  # the request after the tool fails once: the call fails
        (image,) = trip.images(messages)
        return ModelResponse(parts=[TextPart(f"{image.media_type} {image.data == pixel}")])

    agent = Agent(FunctionModel(model), capabilities=[NotebookDurability(model_retries=0)])

    @agent.tool_plain
    def snapshot() -> Any:
        """A photo (a side effect: the camera fires)."""
        trip.side("snapshot")
        return BinaryImage(data=pixel, media_type="image/png")

    @retry(retries=1, backoff="constant", delay=0.05)
    def look(q):
        return agent.run_sync(q).output

    monkeypatch.setenv("FLAKY_REQUEST", "3")
    assert sqlite_engine.run("await look('What do you see?')", {"look": look}, key="look") == "image/png True"
    # The second attempt replayed the first request and the tool; only the failed request was made again.
    assert entries(os.environ["SIDE_LOG"]) == ["model 1", "snapshot", "model 3", "model 3"]


def test_replayed_units_are_not_emitted_to_traces_again(sqlite_engine: Engine, trip: Any, tmp_path: Path) -> None:
    require_module("opentelemetry.sdk", extra="test")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from pydantic_ai import Agent
    from pydantic_ai.capabilities.instrumentation import Instrumentation
    from pydantic_ai.models.instrumented import InstrumentationSettings

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    agent = Agent(
        trip.agent.model,
        name="traced",
        output_type=trip.Trip,
        deps_type=trip.Deps,
        toolsets=[trip.forecasts],
        tools=[trip.lookup],
        capabilities=[
            Instrumentation(settings=InstrumentationSettings(tracer_provider=provider)),
            NotebookDurability(),
        ],
    )
    first: list[str] = []

    @retry(retries=1, backoff="constant", delay=0.05)
    def plan(question):
        result = agent.run_sync(question, deps=trip.Deps("Ana"))
        if not first:
            first.extend(span.name for span in exporter.get_finished_spans())
            raise RuntimeError("the call fails after its agent run")
        return result.output

    assert sqlite_engine.run(CELL, {"plan": plan}, key="traced").city == "Porto"
    assert sum("chat" in name for name in first) == 4  # the first attempt's model requests
    # The second attempt replayed every unit: not one more span, not even its run's.
    assert [span.name for span in exporter.get_finished_spans()] == first


def test_a_transient_model_error_is_retried_and_only_that_request_is_made_again(
    sqlite_engine: Engine, trip: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLAKY_REQUEST", "3")
    result = sqlite_engine.run(CELL, {"plan": trip.plan}, key="flaky")
    assert result.city == "Porto"
    made = entries(os.environ["SIDE_LOG"])
    assert Counter(made) == Counter([*expected(2), "model 3"])


def test_model_retries_are_configurable_and_the_error_reaches_the_workflow(
    sqlite_engine: Engine, trip: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pydantic_ai import Agent

    assert (DEFAULT_MODEL_RETRIES, DEFAULT_TOOL_RETRIES) == (3, 2)
    monkeypatch.setenv("FLAKY_REQUEST", "1")
    strict = Agent(
        trip.agent.model,
        name="strict",
        output_type=trip.Trip,
        deps_type=trip.Deps,
        toolsets=[trip.forecasts],
        tools=[trip.lookup],
        capabilities=[NotebookDurability(model_retries=0)],
    )

    def plan(question):
        return strict.run_sync(question, deps=trip.Deps("Ana")).output

    code = "try:\n    r = await plan('go')\nexcept OSError as e:\n    r = 'failed: ' + str(e)\nr"
    assert sqlite_engine.run(code, {"plan": plan}, key="strict") == (
        "failed: the model service is unavailable (transient)"
    )
    assert entries(os.environ["SIDE_LOG"]) == ["model 1"]


@pytest.mark.parametrize("event_retries", [0, 1])
def test_event_retries_are_their_own_role(sqlite_engine: Engine, trip: Any, event_retries: int) -> None:
    from pydantic_ai import Agent
    from pydantic_ai.models.function import FunctionModel

    handled: list[str] = []
    failures: list[str] = []

    async def handler(ctx: Any, events: Any) -> None:
        async for event in events:
            name = type(event).__name__
            if name == "FunctionToolResultEvent" and not failures:
                failures.append(name)
                raise OSError("the event sink is unavailable (transient)")
            handled.append(name)

    agent = Agent(
        FunctionModel(trip.planner, stream_function=trip.planner_stream),
        name="evented",
        output_type=trip.Trip,
        deps_type=trip.Deps,
        toolsets=[trip.forecasts],
        tools=[trip.lookup],
        capabilities=[NotebookDurability(event_stream_handler=handler, event_retries=event_retries, retry_delay=0.01)],
    )

    def plan(question):
        return agent.run_sync(question, deps=trip.Deps("Ana")).output

    if event_retries == 0:  # the default: an event handler that raises fails the run
        with pytest.raises(WorkflowFailed, match="event sink is unavailable"):
            sqlite_engine.run(CELL, {"plan": plan}, key="events-0")
        return
    assert sqlite_engine.run(CELL, {"plan": plan}, key="events-1").city == "Porto"
    assert failures and Counter(handled)["FunctionToolResultEvent"] == 3  # the failed one handled on its retry
    assert entries(os.environ["SIDE_LOG"]) == expected(2)  # no model request or tool call made again


def test_tool_retries_default_to_two(sqlite_engine: Engine, trip: Any) -> None:
    from pydantic_ai import Agent
    from pydantic_ai.messages import ModelResponse, TextPart, ToolCallPart

    tries: list[str] = []

    def model(messages: list, info: Any) -> ModelResponse:
        if len(messages) == 1:
            return ModelResponse(parts=[ToolCallPart("fragile", {"n": 1}, tool_call_id="f")])
        return ModelResponse(parts=[TextPart(str(messages[-1].parts[0].content))])

    from pydantic_ai.models.function import FunctionModel

    agent = Agent(FunctionModel(model), capabilities=[NotebookDurability(retry_delay=0.01)])

    @agent.tool_plain
    def fragile(n: int) -> str:
        """Fails twice, then works."""
        tries.append("try")
        if len(tries) < 3:
            raise OSError("connection reset")
        return "worked"

    def run(q):
        return agent.run_sync(q).output

    assert sqlite_engine.run("await run('go')", {"run": run}, key="fragile") == "worked"
    assert len(tries) == 3

    # Per tool, in the tool's metadata: no retry.
    tries.clear()
    once = Agent(FunctionModel(model), capabilities=[NotebookDurability(retry_delay=0.01)])
    once.tool_plain(fragile, metadata={"durable_monty_nb": {"retries": 0}})

    def run_once(q):
        return once.run_sync(q).output

    with pytest.raises(WorkflowFailed, match="connection reset"):
        sqlite_engine.run("await run('go')", {"run": run_once}, key="fragile-once")
    assert len(tries) == 1


def test_a_usage_limit_stops_the_run(sqlite_engine: Engine, trip: Any) -> None:
    from pydantic_ai.usage import UsageLimits

    def plan(question):
        return trip.agent.run_sync(question, deps=trip.Deps("Ana"), usage_limits=UsageLimits(request_limit=2)).output

    with pytest.raises(WorkflowFailed, match="request_limit"):
        sqlite_engine.run(CELL, {"plan": plan}, key="limited")
    # checked before each request: the third is never made
    assert entries(os.environ["SIDE_LOG"]) == ["model 1", "lookup Lisbon", "model 3", "lookup Porto"]


def test_message_history_continues_a_conversation(sqlite_engine: Engine, trip: Any) -> None:
    from pydantic_ai import Agent
    from pydantic_ai.messages import ModelMessagesTypeAdapter, ModelResponse, TextPart
    from pydantic_ai.models.function import FunctionModel

    seen: list[int] = []

    def model(messages: list, info: Any) -> ModelResponse:
        seen.append(len(messages))
        return ModelResponse(parts=[TextPart(f"answer {len(messages)}")])

    agent = Agent(FunctionModel(model), capabilities=[NotebookDurability()])

    def chat(prompt, history=None):
        messages = ModelMessagesTypeAdapter.validate_python(history) if history else None
        result = agent.run_sync(prompt, message_history=messages)
        return {
            "text": result.output,
            "history": ModelMessagesTypeAdapter.dump_python(result.all_messages(), mode="json"),
        }

    code = "a = await chat('hi')\nb = await chat('more', a['history'])\n[a['text'], b['text']]"
    assert sqlite_engine.run(code, {"chat": chat}, key="chat") == ["answer 1", "answer 3"]
    assert seen == [1, 3]


@pytest.mark.parametrize("decision", [{"approved": True}, {"approved": False, "reason": "Too expensive."}])
def test_a_tool_that_needs_approval_waits_for_its_signal(sqlite_engine: Engine, trip: Any, decision: Any) -> None:
    namespace = {"ask": trip.ask, "prompt": "Book me Faro"}
    run = sqlite_engine.start(APPROVAL_LOOP, namespace, key="booking")
    wait_until(lambda: run.parked, what="the run to wait for its approval")
    assert [w.name for w in run.waits()] == [approval_signal("book")] == ["approve-book"]
    log = os.environ["SIDE_LOG"]
    assert entries(log) == ["booker 1"]
    sqlite_engine.signal("booking", "approve-book", decision)
    booking = run.result(30)
    assert isinstance(booking, trip.Booking)
    if decision["approved"]:
        assert booking == trip.Booking(city="Faro", booked=True, answer="booked Faro")
        assert entries(log) == ["booker 1", "book Faro", "booker 3"]
    else:
        assert booking == trip.Booking(city="Faro", booked=False, answer=f"{DENIED} Too expensive.")
        assert entries(log) == ["booker 1", "booker 3"]  # book never ran


def test_a_dynamic_toolset_has_its_tool_list_discovery_journaled_and_replayed(
    sqlite_engine: Engine, tmp_path: Path
) -> None:
    from pydantic_ai import Agent
    from pydantic_ai.messages import ModelResponse, TextPart, ToolCallPart
    from pydantic_ai.models.function import FunctionModel
    from pydantic_ai.toolsets import DynamicToolset, FunctionToolset

    discovered: list[str] = []
    first: list[int] = []
    marker = tmp_path / "failed-once"

    def tools_for(ctx: Any) -> FunctionToolset:
        discovered.append("list")
        toolset = FunctionToolset()

        @toolset.tool_plain
        def greet(name: str) -> str:
            """Greet someone."""
            return f"hello {name}"

        return toolset

    def model(messages: list, info: Any) -> ModelResponse:
        if len(messages) == 1:
            return ModelResponse(parts=[ToolCallPart("greet", {"name": "Ana"}, tool_call_id="g")])
        return ModelResponse(parts=[TextPart(str(messages[-1].parts[0].content))])

    agent = Agent(
        FunctionModel(model), toolsets=[DynamicToolset(tools_for, id="people")], capabilities=[NotebookDurability()]
    )

    @retry(retries=1, backoff="constant", delay=0.05)
    def run(q):
        answer = agent.run_sync(q).output
        if not marker.exists():
            first.append(len(discovered))
            marker.write_text("x")
            raise RuntimeError("the call fails after its agent run")
        return answer

    assert sqlite_engine.run("await run('hi')", {"run": run}, key="dynamic") == "hello Ana"
    rows = units(sqlite_engine.store)
    assert {r.name for r in rows if r.kind == "discovery"} == {"agent__dynamic_toolset__people.get_tools"}
    assert {r.name for r in rows if r.kind == "tool"} == {"agent__dynamic_toolset__people.call_tool:greet"}
    assert first[0] > 0 and len(discovered) == first[0]  # the second attempt discovered nothing again


def test_outside_a_durable_call_the_capability_is_transparent(trip: Any, sqlite_url: str) -> None:
    assert trip.plan("Fly me somewhere").city == "Porto"
    assert entries(os.environ["SIDE_LOG"]) == expected(2)
    assert units(Store(sqlite_url)) == []


def test_a_toolset_given_to_one_run_is_refused_inside_a_durable_call(sqlite_engine: Engine, trip: Any) -> None:
    from pydantic_ai.toolsets import FunctionToolset

    extra = FunctionToolset(id="extra")

    def plan(question):
        return trip.agent.run_sync(question, deps=trip.Deps("Ana"), toolsets=[extra]).output

    with pytest.raises(WorkflowFailed, match="cannot be added at runtime with durable-monty-nb"):
        sqlite_engine.run(CELL, {"plan": plan}, key="runtime-toolset")
    assert entries(os.environ["SIDE_LOG"]) == []


def test_the_engine_spec_and_the_operation_names_are_pinned(sqlite_engine: Engine, trip: Any) -> None:
    """The names are part of every stored unit's key: compatibility data for journals already in
    stores. Changing one strands the runs recorded under it; never update these pins for a rename."""
    from pydantic_ai.durable_exec import (
        EventStreamHandlerId,
        ModelCancelSuspendedResponseId,
        ModelCompactMessagesId,
        ModelRequestId,
        ToolsetCallToolId,
        ToolsetGetInstructionsId,
        ToolsetGetToolsId,
        ToolsetValidateToolArgumentsId,
    )

    spec = NotebookDurability.engine_spec
    assert (spec.engine_name, spec.durable_unit_noun, spec.durable_container_noun) == (
        "durable-monty-nb",
        "agent unit",
        "durable call",
    )
    assert spec.wrapped_toolset_kinds == {"function", "mcp", "dynamic"}
    assert dict(spec.toolset_lifecycles) == {
        "function": "enter-always",
        "mcp": "enter-in-durable-unit",
        "dynamic": "enter-never",
    }
    assert spec.unsupported_runtime_toolset_kinds == {"function", "mcp", "dynamic"}
    assert (spec.journal_discovery, spec.sequential_tools_in_durable_context) == (True, False)
    assert (spec.tool_call_result_upgrade_lenient, spec.tool_config_key, spec.accepts_cancellation_token) == (
        False,
        "durable_monty_nb",
        False,
    )
    # The names a real run journals.
    sqlite_engine.run(CELL, {"plan": trip.plan}, key="names")
    assert sorted({r.name for r in units(sqlite_engine.store)}) == [
        "planner__function_toolset__<agent>.call_tool:lookup",
        "planner__function_toolset__weather.call_tool:weather",
        "planner__model.request",
    ]
    # Every operation id pydantic-ai 2.68 has, through the namer the backend uses.
    bound = NotebookDurability.from_agent(trip.agent)
    assert bound is not None
    namer = bound.get_durable_operation_backend()._namer
    names = {
        "request": ModelRequestId(None, model_name="function"),
        "request_other": ModelRequestId("openai:gpt-5", model_name="gpt-5"),
        "stream": ModelRequestId(None, model_name="function", streaming=True),
        "compact": ModelCompactMessagesId(None, model_name="function"),
        "cancel": ModelCancelSuspendedResponseId(None, model_name="function"),
        "event": EventStreamHandlerId(),
        "get_tools": ToolsetGetToolsId("mcp", toolset_id="files"),
        "dynamic_tools": ToolsetGetToolsId("dynamic", toolset_id="dyn"),
        "instructions": ToolsetGetInstructionsId(toolset_id="files"),
        "validate": ToolsetValidateToolArgumentsId("function", toolset_id="weather"),
        "mcp_call": ToolsetCallToolId("mcp", toolset_id="files"),
        "call": ToolsetCallToolId("function", toolset_id="weather"),
    }
    assert {k: namer.operation_name(v) for k, v in names.items()} == {
        "request": "planner__model.request",
        "request_other": "planner__model.request.openai:gpt-5",
        "stream": "planner__model.request_stream",
        "compact": "planner__model.compact_messages",
        "cancel": "planner__model.cancel_suspended_response",
        "event": "planner__event_stream_handler",
        "get_tools": "planner__mcp_server__files.get_tools",
        "dynamic_tools": "planner__dynamic_toolset__dyn.get_tools",
        "instructions": "planner__mcp_server__files.get_instructions",
        "validate": "planner__function_toolset__weather.validate_args",
        "mcp_call": "planner__mcp_server__files.call_tool",
        "call": "planner__function_toolset__weather.call_tool",
    }


def test_an_agent_without_a_name_is_named_agent(sqlite_engine: Engine) -> None:
    from pydantic_ai import Agent
    from pydantic_ai.models.test import TestModel

    agent = Agent(TestModel(), capabilities=[NotebookDurability()])

    @agent.tool_plain
    def weather(city: str) -> str:
        """The weather of a city."""
        return f"sunny in {city}"

    def run(q):
        return agent.run_sync(q).output

    answer = sqlite_engine.run("await run('weather?')", {"run": run}, key="tm")
    assert "sunny in a" in answer
    assert {r.name for r in units(sqlite_engine.store)} == {
        "agent__model.request",
        "agent__function_toolset__<agent>.call_tool:weather",
    }

    named = Agent(TestModel(), capabilities=[NotebookDurability(name="custom")])

    def run_named(q):
        return named.run_sync(q).output

    sqlite_engine.run("await run('hello')", {"run": run_named}, key="named")
    assert "custom__model.request" in {r.name for r in units(sqlite_engine.store)}


def test_a_tampered_unit_is_refused(sqlite_engine: Engine, trip: Any) -> None:
    from durable_monty_nb.errors import TamperedDataError

    sqlite_engine.run(CELL, {"plan": trip.plan}, key="tamper")
    store = sqlite_engine.store
    execution = store.latest_execution("tamper").id
    with store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE dm_agent_units SET result = replace(result, 'Porto', 'Paris')"))
    with pytest.raises(TamperedDataError, match="agent unit"):
        store.load_agent_units(execution, 0)


def test_an_agent_does_not_travel_by_value_and_a_function_fingerprint_covers_it() -> None:
    from pydantic_ai import Agent
    from pydantic_ai.models.test import TestModel

    from durable_monty_nb.engine.fingerprint import function_fingerprint
    from durable_monty_nb.errors import ValueCrossingError
    from durable_monty_nb.values import ship_function

    namespace: dict[str, Any] = {"Agent": Agent, "TestModel": TestModel, "NotebookDurability": NotebookDurability}
    exec(
        "agent = Agent(TestModel(), capabilities=[NotebookDurability()])\n"
        "def plan(q):\n    return agent.run_sync(q).output",
        namespace,
    )
    with pytest.raises(ValueCrossingError, match=r"cannot be shipped to workers.*ContextVar"):
        ship_function(namespace["plan"], "plan")
    before = function_fingerprint(namespace["plan"])
    namespace["agent"] = Agent(TestModel(custom_output_text="another"), capabilities=[NotebookDurability()])
    assert function_fingerprint(namespace["plan"]) != before  # another model: the calls run again
    namespace["agent"] = Agent(TestModel(custom_output_text="another"), capabilities=[NotebookDurability()])
    again = function_fingerprint(namespace["plan"])
    assert function_fingerprint(namespace["plan"]) == again  # the same definition: reused


# -- the tools of a real MCP server ------------------------------------------------------------------------

MCP_RUN = [
    "mcp server/discover",  # the run's one MCP session: entered by its first unit (enter-in-durable-unit)
    "mcp tools/list",
    "router 1",
    "mcp reserve Lisbon",
    "router 3",
    "mcp reserve Porto",
    "router 5",
    "mcp map Porto",
    "router 7",
]
ROUTE_CELL = "route_ = await route('Two seats, and the map')\nroute_"


@pytest.fixture
def mcp_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A real MCP server (tests/mcp_server.py, streamable HTTP) in a process of its own, logging
    its tool calls and requests to tmp_path/side.log; its URL is also $MCP_URL."""
    require_module("pydantic_ai.mcp", extra="agents-mcp")  # the client: pydantic-ai's MCPToolset
    require_module("mcp.server.mcpserver", extra="test")  # the server
    server = subprocess.Popen(
        [sys.executable, str(TESTS / "mcp_server.py"), str(tmp_path / "side.log")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = server.stdout.readline() if server.stdout else ""
        assert line.startswith("PORT "), f"the MCP server did not start: {line!r}"
        url = f"http://127.0.0.1:{line.split()[1]}/mcp"
        monkeypatch.setenv("MCP_URL", url)
        yield url
    finally:
        kill(server)


def expected_route() -> Any:
    from agent_trip import Route
    from mcp_server import PIXEL

    return Route(seats=["seat for Lisbon", "seat for Porto"], map_type="image/png", map_bytes=len(PIXEL))


def test_mcp_tool_calls_are_units_a_retried_call_does_not_make_again(
    sqlite_engine: Engine, trip: Any, mcp_url: str, tmp_path: Path
) -> None:
    marker = tmp_path / "failed-once"

    @retry(retries=1, backoff="constant", delay=0.05)
    def route(question):
        answer = trip.route(question)
        if not marker.exists():
            marker.write_text("x")
            raise RuntimeError("the call fails after its agent run")
        return answer

    result = sqlite_engine.run(ROUTE_CELL, {"route": route}, key="mcp")
    # A structured output; the model saw the image the MCP tool returned (non-text output).
    assert result == expected_route()
    # The second attempt replayed every unit: no tool call, no tool listing, not even a session.
    assert entries(tmp_path / "side.log") == MCP_RUN
    rows = units(sqlite_engine.store)
    assert Counter((r.name, r.kind) for r in rows) == {
        ("router__mcp_server__stations.get_tools", "discovery"): 1,  # cache_tools: listed once a run
        ("router__mcp_server__stations.call_tool", "tool"): 3,
        ("router__model.request", "model"): 4,
    }
    (image,) = [json.loads(r.result) for r in rows if "binary" in r.result]
    assert image["result"]["media_type"] == "image/png"  # journaled as data, not as its text form

    # An MCP toolset without an id has nothing to name its units by: refused when the agent is made.
    from pydantic_ai import Agent
    from pydantic_ai.exceptions import UserError
    from pydantic_ai.mcp import MCPToolset

    with pytest.raises(UserError, match="need to have a unique `id`"):
        Agent(trip.agent.model, toolsets=[MCPToolset(mcp_url)], capabilities=[NotebookDurability()])


def test_a_stdio_mcp_server_is_started_by_the_run_and_not_again_on_replay(
    sqlite_engine: Engine, trip: Any, tmp_path: Path
) -> None:
    require_module("pydantic_ai.mcp", extra="agents-mcp")
    require_module("mcp.server.mcpserver", extra="test")
    from fastmcp.client import Client
    from fastmcp.client.transports import PythonStdioTransport
    from pydantic_ai import Agent
    from pydantic_ai.mcp import MCPToolset
    from pydantic_ai.models.function import FunctionModel

    log, marker = tmp_path / "side.log", tmp_path / "failed-once"
    server = PythonStdioTransport(TESTS / "mcp_server.py", args=[str(log), "--stdio"], keep_alive=False)
    agent = Agent(
        FunctionModel(trip.router_model),
        name="router",
        output_type=trip.Route,
        toolsets=[MCPToolset(Client(server), id="stations")],
        capabilities=[NotebookDurability()],
    )

    @retry(retries=1, backoff="constant", delay=0.05)
    def route(question):
        answer = agent.run_sync(question).output
        if not marker.exists():
            marker.write_text("x")
            raise RuntimeError("the call fails after its agent run")
        return answer

    assert sqlite_engine.run(ROUTE_CELL, {"route": route}, key="stdio") == expected_route()
    made = log_entries(log)
    # One server process, started by the first unit that needed it; the replay started none.
    assert [entry for _, entry in made] == ["mcp started", *MCP_RUN]
    servers = {pid for pid, entry in made if entry.startswith("mcp")}
    assert len(servers) == 1 and os.getpid() not in servers


# -- processes and kernels killed with SIGKILL ---------------------------------------------------------

RUNNER = """
import sys
from durable_monty_nb import Engine
from agent_trip import plan
engine = Engine(sys.argv[1], lease_ttl=1.5)
run = engine.start(sys.argv[3], {"plan": plan}, key=sys.argv[2])
print("STARTED", run.execution_id, flush=True)
print("RESULT", repr(run.result(120)), flush=True)
"""


def spawn(db: str, key: str, tmp_path: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    runner = tmp_path / "agent_runner.py"
    runner.write_text(RUNNER)
    full_env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, str(runner), db, key, CELL],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
    )


def assert_resumed_without_repeats(killed: list[str], made: list[str], lookups: int) -> None:
    """Everything ran, and a model request or tool call made twice can only be the one in flight at
    the kill (the last the killed process began): every journaled one came from the store."""
    assert sorted(set(made)) == sorted(expected(lookups))
    twice = [entry for entry, n in Counter(made).items() if n > 1]
    assert len(twice) <= 1 and (not twice or twice == [killed[-1]]), (killed, made)


@pytest.mark.parametrize("kill_after", [1, 3, 5])
def test_process_killed_after_the_nth_model_request_is_journaled(
    sqlite_url: str, tmp_path: Path, kill_after: int
) -> None:
    store, log, hold = Store(sqlite_url), tmp_path / "side.log", tmp_path / "held"
    run = expected(4)
    at = run.index(f"model {2 * kill_after + 1}")  # the next model request: the process is killed in it
    env = {"SIDE_LOG": str(log), "AGENT_LOOKUPS": "4", "HOLD_AT": run[at], "HOLD_FILE": str(hold)}
    first = spawn(sqlite_url, "trip", tmp_path, env)
    wait_until(hold.exists, what=f"the model request after {kill_after}", procs=(first,))
    kill(first)
    killed = entries(log)
    assert killed == run[: at + 1]
    assert len(units(store, "model")) == kill_after  # killed mid-run, at the moment chosen
    second = spawn(sqlite_url, "trip", tmp_path, env)
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    assert "RESULT Trip(city='Braga', lookups=4, traveller='Ana', weather='sunny in Braga')" in out
    made = entries(log)
    assert made == [*killed, *run[at:]]  # only the request in flight at the kill made again
    assert_resumed_without_repeats(killed, made, 4)
    assert len({pid for pid, _ in log_entries(log)}) == 2


NOTEBOOK = "agent.ipynb"


def notebook_kernel(tmp_path: Path, imports: str, **env: str) -> Any:
    """A real kernel with the extension loaded and ``imports`` run, its store tmp_path/notebook.db.

    The kernel is told its notebook, as JupyterLab tells it (JPY_SESSION_NAME), so its keys are
    ``agent.ipynb::NAME`` however pytest was started (no headless guess from pytest's arguments)."""
    from kernels import Kernel

    kernel = Kernel(
        tmp_path,
        {
            "DURABLE_MONTY_DB": f"sqlite:///{tmp_path / 'notebook.db'}",
            "JPY_SESSION_NAME": str(tmp_path / NOTEBOOK),
            "SIDE_LOG": str(tmp_path / "side.log"),
            "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
            **env,
        },
    )
    kernel.ok("%load_ext durable_monty_nb")
    kernel.ok(imports)
    return kernel


def kill_held(kernel: Any, hold: Path, cell: str) -> None:
    """Run ``cell`` in ``kernel`` and SIGKILL the kernel once the run holds (see agent_trip.side)."""
    try:
        kernel.submit(cell)
        wait_until(hold.exists, what="the run to reach its held model request")
        kernel.kill()
    finally:
        kernel.close()


@pytest.mark.kernel
def test_kernel_killed_mid_agent_then_the_cell_run_again(tmp_path: Path) -> None:
    """The kernel is killed in a model request or tool call drawn at random (the session's seed)."""
    store, log, hold = Store(f"sqlite:///{tmp_path / 'notebook.db'}"), tmp_path / "side.log", tmp_path / "held"
    run = expected(3)
    at = fuzz_random(0).randrange(len(run))
    env = {"AGENT_LOOKUPS": "3", "HOLD_AT": run[at], "HOLD_FILE": str(hold)}
    cell = "%%durable trip\n" + CELL
    kill_held(notebook_kernel(tmp_path, "from agent_trip import plan", **env), hold, cell)
    killed = entries(log)
    assert killed == run[: at + 1], f"killed in {run[at]!r}"
    done = Counter("model" if entry.startswith("model") else "tool" for entry in run[:at])
    assert Counter(r.kind for r in units(store)) == done  # the units before the one in flight
    key = scoped_key(NOTEBOOK, "trip")
    assert store.latest_execution(key).status != "completed"
    kernel = notebook_kernel(tmp_path, "from agent_trip import plan", **env)
    try:
        assert kernel.ok(cell).result == "Trip(city='Faro', lookups=3, traveller='Ana', weather='sunny in Faro')"
        assert kernel.ok("type(trip).__name__").result == "'Trip'"
    finally:
        kernel.close()
    # Only the request or tool call in flight at the kill was made again, then the rest of the run.
    assert entries(log) == [*killed, *run[at:]], f"killed in {run[at]!r}"
    assert store.latest_execution(key).status == "completed"


@pytest.mark.kernel
def test_kernel_killed_mid_agent_makes_no_completed_mcp_tool_call_again(tmp_path: Path, mcp_url: str) -> None:
    store, log, hold = Store(f"sqlite:///{tmp_path / 'notebook.db'}"), tmp_path / "side.log", tmp_path / "held"
    env = {"MCP_URL": mcp_url, "HOLD_AT": "router 7", "HOLD_FILE": str(hold)}  # the request after the map
    cell = "%%durable seats\n" + ROUTE_CELL
    kill_held(notebook_kernel(tmp_path, "from agent_trip import route", **env), hold, cell)
    assert entries(log) == MCP_RUN  # every MCP tool call done, the last model request in flight
    assert Counter(r.kind for r in units(store)) == {"discovery": 1, "tool": 3, "model": 3}
    kernel = notebook_kernel(tmp_path, "from agent_trip import route", **env)
    try:
        reply = kernel.ok(cell)
        assert kernel.ok("type(route_).__name__").result == "'Route'"
    finally:
        kernel.close()
    assert reply.result == repr(expected_route())
    # The resumed run replayed the 3 MCP tool calls and the listing without connecting to the server,
    # and made the one model request in flight at the kill again: it saw the journaled image.
    assert entries(log) == [*MCP_RUN, "router 7"]
    assert len({pid for pid, entry in log_entries(log) if entry == "router 7"}) == 2
    assert store.latest_execution(scoped_key(NOTEBOOK, "seats")).status == "completed"


# -- on RQ, with real workers ---------------------------------------------------------------------------


@pytest.fixture
def rq_workers(redis_url: str, tmp_path: Path) -> Any:
    from test_rq import Workers

    pool = Workers(
        redis_url,
        f"q-{tmp_path.name[-20:]}",
        {"PYTHONPATH": str(TESTS), "SIDE_LOG": str(tmp_path / "side.log"), "AGENT_LOOKUPS": "3", "MODEL_DELAY": "0.1"},
    )
    yield pool
    pool.stop()


def test_on_rq_a_worker_killed_mid_agent_and_the_run_resumed_on_another(
    rq_workers: Any, sqlite_url: str, tmp_path: Path
) -> None:
    from agent_trip import plan

    from durable_monty_nb.executors.rq import RQ

    log = tmp_path / "side.log"
    rq_workers.start(1, preload=("agent_trip",))  # pydantic-ai imported once, not per job
    engine = Engine(sqlite_url, executor=RQ(rq_workers.url, rq_workers.queue))
    run = engine.start(CELL, {"plan": plan}, key="rq-trip")
    store = engine.store
    wait_until(lambda: len(units(store, "model")) >= 2, what="2 model units journaled on the worker")
    horse = log_entries(log)[0][0]  # the job's process (RQ's work horse, in a process group of its own)
    rq_workers.kill(rq_workers.procs[0])  # the worker dies mid-agent, and its horse with it
    os.kill(horse, signal.SIGKILL)
    killed = entries(log)
    rq_workers.start(1, preload=("agent_trip",))  # pydantic-ai imported once, not per job
    trip = run.result(120)
    assert repr(trip) == "Trip(city='Faro', lookups=3, traveller='Ana', weather='sunny in Faro')"
    assert_resumed_without_repeats(killed, entries(log), 3)
    assert len({pid for pid, _ in log_entries(log)}) == 2  # two workers did the work
    assert {r.attempt for r in units(store)} == {1, 2}
    engine.close()


def test_on_rq_an_approval_through_a_signal(rq_workers: Any, sqlite_url: str, tmp_path: Path) -> None:
    """Two runs on one worker, parked at once: the approved one books, the rejected one does not."""
    from agent_trip import ask

    from durable_monty_nb.executors.rq import RQ

    rq_workers.start(1, preload=("agent_trip",))  # pydantic-ai imported once, not per job
    engine = Engine(sqlite_url, executor=RQ(rq_workers.url, rq_workers.queue))
    runs = {
        approve: engine.start(APPROVAL_LOOP, {"ask": ask, "prompt": "Book me Faro"}, key=f"rq-booking-{approve}")
        for approve in (True, False)
    }
    for approve, run in runs.items():
        wait_until(lambda run=run: run.parked, what=f"the approval wait of rq-booking-{approve}")
        engine.signal(f"rq-booking-{approve}", "approve-book", {"approved": approve})
    approved, rejected = runs[True].result(120), runs[False].result(120)
    assert (approved.booked, approved.answer) == (True, "booked Faro")
    assert (rejected.booked, rejected.answer) == (False, DENIED)
    # One booking in all (the approved run's); each run asked the booker twice.
    made = entries(tmp_path / "side.log")
    assert sorted(made) == sorted(["booker 1", "book Faro", "booker 3", "booker 1", "booker 3"])
    json.dumps([r.result for r in units(engine.store)])
    engine.close()


# -- on Dask, with real workers --------------------------------------------------------------------------


@pytest.fixture
def agent_cluster(tmp_path: Path) -> Any:
    """A `dask scheduler` and two workers of this test alone, which import the agents (tests/ on their
    path), fail the 2nd model request of a run once and hold at its 4th (see agent_trip)."""
    require_module("distributed", extra="dask")
    from test_dask import Cluster

    from durable_monty_nb.executors.dask import close_clients

    (tmp_path / "dask").mkdir()
    env = {
        "PYTHONPATH": str(TESTS),
        "SIDE_LOG": str(tmp_path / "side.log"),
        "AGENT_LOOKUPS": "3",
        "HOLD_AT": "model 7",
        "HOLD_FILE": str(tmp_path / "held"),
        "FLAKY_REQUEST": "3",  # the 2nd model request fails once (transient), on the worker
    }
    cluster = Cluster(tmp_path / "dask", env=env)
    yield cluster
    close_clients()
    cluster.close()


def test_on_dask_an_agent_runs_on_a_worker_and_one_killed_mid_agent_resumes_exactly(
    agent_cluster: Any, sqlite_url: str, tmp_path: Path
) -> None:
    from agent_trip import plan

    from durable_monty_nb.executors.dask import Dask

    log, hold = tmp_path / "side.log", tmp_path / "held"
    workers = {w.pid for w in agent_cluster.workers}
    engine = Engine(sqlite_url, executor=Dask(agent_cluster.address))
    try:
        run = engine.start(CELL, {"plan": plan}, key="dask-trip")
        wait_until(hold.exists, what="the run to hold in its 4th model request, on a worker")
        victim = int(hold.read_text())
        killed = log_entries(log)
        # Every model request and tool call so far ran on that worker, none in this process, and the
        # transient failure of the 2nd request was retried there (the request made twice).
        assert [entry for _, entry in killed] == [*expected(3)[:3], "model 3", *expected(3)[3:7]]
        assert {pid for pid, _ in killed} == {victim} and victim in workers
        os.kill(victim, signal.SIGKILL)
        agent_cluster.worker_of(victim).wait(30)
        trip = run.result(120)
    finally:
        engine.close()
    assert repr(trip) == "Trip(city='Faro', lookups=3, traveller='Ana', weather='sunny in Faro')"
    # The other worker replayed the 3 journaled requests and 3 tool calls and made only the one in
    # flight at the kill again, then the rest of the run.
    resumed = log_entries(log)[len(killed) :]
    assert [entry for _, entry in resumed] == expected(3)[6:]
    assert {pid for pid, _ in resumed} == workers - {victim}
    assert Counter(r.kind for r in units(Store(sqlite_url))) == {"model": 5, "tool": 4}


def test_an_agent_counts_in_fingerprints_by_its_definition() -> None:
    # An Agent holds context variables and clients that pickling cannot read: the notebook function
    # that runs it must still reuse its calls while the agent is the same, and not when it changed.
    from pydantic_ai import Agent
    from pydantic_ai.models.test import TestModel

    from durable_monty_nb.engine.fingerprint import Fingerprinter

    def make(instructions: str) -> Any:
        agent = Agent(TestModel(), instructions=instructions, capabilities=[NotebookDurability()])

        @agent.tool_plain
        def lookup(city: str) -> str:
            return city.upper()

        return agent

    same = [Fingerprinter().value(make("Be brief.")) for _ in range(2)]
    assert same[0] == same[1]
    assert Fingerprinter().value(make("Be thorough.")) != same[0]
