"""Durable pydantic-ai agents: :class:`NotebookDurability`, a capability on pydantic-ai's own
``durable_exec`` surface.

A notebook function that runs an agent is a durable call like any other. With the capability on
the agent, every model request, tool call, tool-list discovery and handled event of the agent's
run is a *durable unit* journaled in the store (table ``dm_agent_units``, signed like every row)
under the call that runs it. When that call runs again (a retry, a kernel killed mid-agent and
the cell run again, a resume on an RQ or Dask worker), the agent's loop replays: a unit that
completed returns its recorded result, so no model request or tool call that completed is made
again; only the one in flight at the kill runs again. The journal is in the store, not the
process, so a remote worker resumes from it too (tested on RQ and Dask; the agent must be importable
there: pydantic-ai agents hold context variables and cannot be pickled by value).

::

    from pydantic_ai import Agent
    from durable_monty_nb.agents import NotebookDurability

    agent = Agent("openai:gpt-5", output_type=CityInfo, deps_type=Deps, tools=[search],
                  capabilities=[NotebookDurability()])

    def plan(question):
        return agent.run_sync(question, deps=deps).output   # a CityInfo, on replay too

Everything else is pydantic-ai's: ``output_type``, ``deps`` and ``RunContext`` tools, toolsets and
MCP servers (an ``MCPToolset`` with an ``id``, which names its units; one session per run, entered by
the first unit that needs it), usage limits, message history, ``event_stream_handler``, and
``run_sync``, ``run``, ``iter``, ``run_stream`` and ``run_stream_events`` alike. Model requests are retried
3 times and tool calls 2 times by default (``NotebookDurability(model_retries=..., tool_retries=...)``,
or per tool with ``metadata={"durable_monty_nb": {"retries": N}}``).

Tools that need approval (``requires_approval=True``) end the run with ``DeferredToolRequests``;
:func:`agent_turn` turns a run into a JSON-like *turn* for workflow code, which waits for a signal
per approval (the widget's Approve / Reject buttons answer it) and runs the next turn with the
decisions: see :data:`APPROVAL_LOOP`.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import hashlib
import json
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from .engine.fingerprint import Fingerprinter, Unhashable, register_fingerprint
from .errors import DurableError
from .executors.current import CurrentCall, add_call_scope, current_call

try:
    from pydantic_ai import Agent
    from pydantic_ai.agent import EventStreamHandler
    from pydantic_ai.agent.abstract import AbstractAgent
    from pydantic_ai.capabilities.abstract import WrapRunHandler
    from pydantic_ai.durable_exec import (
        JSON_CODEC,
        BaseDurabilityCapability,
        DurabilityEngineSpec,
        DurableOperationBackend,
        DurableOperationId,
        EventStreamHandlerId,
        JournalCallableOperationBackend,
        ModelCancelSuspendedResponseId,
        ModelCompactMessagesId,
        ModelRequestId,
        RoleBasedOperationConfig,
        ToolsetCallToolId,
        ToolsetGetInstructionsId,
        ToolsetGetToolsId,
        ToolsetKind,
        ToolsetValidateToolArgumentsId,
        conversation_id_from_run_id,
        record_durable_unit,
        replay_scope,
    )
    from pydantic_ai.exceptions import UserError
    from pydantic_ai.messages import ModelMessagesTypeAdapter
    from pydantic_ai.models import Model
    from pydantic_ai.run import AgentRunResult
    from pydantic_ai.tools import AgentDepsT, DeferredToolRequests, DeferredToolResults, RunContext, ToolDenied
    from pydantic_ai.toolsets import ToolsetTool
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        f"durable_monty_nb.agents needs pydantic-ai: pip install 'durable-monty-nb[agents]' ({exc})"
    ) from None

__all__ = [
    "APPROVAL_LOOP",
    "DEFAULT_MODEL_RETRIES",
    "DEFAULT_TOOL_RETRIES",
    "AgentUnitError",
    "NotebookDurability",
    "agent_turn",
    "approval_signal",
    "approved",
    "decisions_to_results",
]

DEFAULT_MODEL_RETRIES = 3
"""Retries of a model request that raised (4 attempts in all), before the run fails."""
DEFAULT_TOOL_RETRIES = 2
"""Retries of a tool call that raised an error other than pydantic-ai's control flow (``ModelRetry``, ...)."""
DEFAULT_RETRY_DELAY = 0.5
"""Seconds before the first retry of a unit; each next retry waits twice as long."""
CONFIG_KEY = "durable_monty_nb"
"""The tool metadata key of per-tool unit config: ``{"retries": 0}``, or ``False`` for no durable unit."""
DEFAULT_AGENT_NAME = "agent"
APPROVAL_PREFIX = "approve-"
DENIED = "The user denied this tool call."


class AgentUnitError(DurableError):
    """A durable unit of an agent run that can never be journaled (its result is not JSON-able)."""


UnitConfig = dict[str, Any]
"""A unit's config: ``{"retries": int, "retry_delay": float}``."""


def _unit_kind(operation_id: DurableOperationId) -> str:
    match operation_id:
        case ModelRequestId() | ModelCompactMessagesId() | ModelCancelSuspendedResponseId():
            return "model"
        case ToolsetCallToolId() | ToolsetValidateToolArgumentsId():
            return "tool"
        case ToolsetGetToolsId() | ToolsetGetInstructionsId():
            return "discovery"
        case EventStreamHandlerId():
            return "event"
        case _:  # capability operations, and ids pydantic-ai adds in minor releases
            return "capability"


def _discriminator(operation_id: DurableOperationId, cache_key: tuple[object, ...]) -> str:
    """What tells apart units of one name that may start in any order: a tool call's id (parallel
    tool calls), an event's tool call; "" for units that run one after another (model requests)."""
    if isinstance(operation_id, ToolsetCallToolId | ToolsetValidateToolArgumentsId):
        for item in cache_key:
            if isinstance(item, RunContext) and item.tool_call_id:
                return item.tool_call_id
    if isinstance(operation_id, EventStreamHandlerId) and cache_key:
        event = cache_key[0]
        part = getattr(event, "part", None) or getattr(event, "result", None)
        call_id = getattr(event, "tool_call_id", None) or getattr(part, "tool_call_id", None)
        return f"{type(event).__name__}:{call_id or ''}"
    return ""


@dataclass
class _RunJournal:
    """The units of one agent run in one call: what the store has, and the places handed out."""

    call: CurrentCall
    run_id: str
    recorded: dict[str, Any]
    counters: dict[tuple[str, str], int] = field(default_factory=dict)

    def place(self, name: str, discriminator: str) -> str:
        """The unit key of the next unit named ``name`` (with this discriminator) of the run."""
        n = self.counters.get((name, discriminator), 0)
        self.counters[(name, discriminator)] = n + 1
        text = json.dumps([self.run_id, name, discriminator, n])
        return hashlib.sha256(text.encode()).hexdigest()


_JOURNAL: ContextVar[_RunJournal | None] = ContextVar("durable_monty_nb.agent_run_journal", default=None)


class NotebookOperationBackend(JournalCallableOperationBackend[UnitConfig]):
    """Runs each durable unit of an agent run once per call: journaled in the store, replayed after.

    Names follow pydantic-ai's ``JournalOperationNamer`` (``<agent>__model.request``,
    ``<agent>__function_toolset__<id>.call_tool:<tool>``, ...): they are part of each stored unit's
    key, so they are compatibility data (pinned by the tests).
    """

    async def execute(
        self,
        *,
        operation_id: DurableOperationId,
        name: str,
        body: Callable[[], Awaitable[object]],
        cache_key: tuple[object, ...],
        config: UnitConfig,
    ) -> object:
        journal = _JOURNAL.get()
        if journal is None:  # a unit outside a run this capability wraps: nothing to replay it from
            return await _with_retries(body, config, name)
        key = journal.place(name, _discriminator(operation_id, cache_key))
        stored = journal.recorded.get(key)
        if stored is not None:
            record_durable_unit(executed=False)
            return json.loads(stored.result)
        payload = await _with_retries(body, config, name)
        try:
            text = json.dumps(payload, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise AgentUnitError(f"the result of the agent unit {name!r} cannot be journaled: {exc}") from exc
        call = journal.call
        stored_text = await asyncio.to_thread(
            call.store.record_agent_unit,
            call.execution_id,
            call.call_id,
            call.attempt,
            key,
            run_id=journal.run_id,
            name=name,
            kind=_unit_kind(operation_id),
            result=text,
        )
        record_durable_unit(executed=True)
        return json.loads(stored_text) if stored_text != text else payload


NOT_RETRIED: tuple[type[BaseException], ...] = (UserError, AgentUnitError)


async def _with_retries(body: Callable[[], Awaitable[object]], config: UnitConfig, name: str) -> object:
    retries = int(config.get("retries", 0) or 0)
    delay = float(config.get("retry_delay", DEFAULT_RETRY_DELAY))
    attempt = 0
    while True:
        try:
            return await body()
        except NOT_RETRIED:
            raise
        except Exception:
            if attempt >= retries:
                raise
        await asyncio.sleep(delay * (2**attempt))
        attempt += 1


def _not_journaled(exc: Exception) -> BaseException:
    return AgentUnitError(f"an agent unit's result cannot be journaled as JSON: {exc}")


class NotebookDurability(BaseDurabilityCapability[AgentDepsT]):
    """Makes an agent's runs durable inside durable-monty-nb calls (see the module docstring).

    Outside a durable call (a plain cell, a script) it is transparent: the run is a normal run.

    Args:
        models: other models a run may switch to (``agent.run(model=...)``), by id, as for
            pydantic-ai's other engines; model-name strings need no registering.
        event_stream_handler: handles the run's events; each handled event is a durable unit, so a
            replayed run does not handle it twice.
        name: names the agent's units (default: the agent's ``name``, else ``"agent"``). Units are
            journaled per call, so two agents need distinct names only when one call runs both.
        model_retries, tool_retries, event_retries: retries of a unit of each role that raised
            (per tool: ``metadata={"durable_monty_nb": {"retries": N}}``).
        retry_delay: seconds before a unit's first retry, doubled for each next one.
    """

    engine_spec = DurabilityEngineSpec(
        engine_name="durable-monty-nb",
        durable_unit_noun="agent unit",
        durable_unit_plural="agent units",
        durable_container_noun="durable call",
        # Units are journaled as JSON in the store, and read back by other processes (RQ, Dask).
        codec=JSON_CODEC,
        serialization_failure=_not_journaled,
        # A toolset passed to one run (`agent.run(toolsets=...)`) is not bound to the agent: its
        # calls would bypass the journal and run again on replay. Refused inside a durable call.
        unsupported_runtime_toolset_kinds=frozenset({"function", "mcp", "dynamic"}),
        wrapped_toolset_kinds=frozenset({"function", "mcp", "dynamic"}),
        # Units run in the call's own process, so an MCP server is entered by its first unit and
        # kept for the run (one session), as the spec allows for in-process engines.
        toolset_lifecycles={"function": "enter-always", "mcp": "enter-in-durable-unit", "dynamic": "enter-never"},
        tool_call_result_upgrade_lenient=False,  # a new engine: no recordings of an older format
        journal_discovery=True,
        # Units are keyed by name, place and tool call id, so parallel tool calls replay in any order.
        sequential_tools_in_durable_context=False,
        tool_config_key=CONFIG_KEY,
        accepts_cancellation_token=False,
    )

    def __init__(
        self,
        *,
        models: Mapping[str, Model] | None = None,
        event_stream_handler: EventStreamHandler[AgentDepsT] | None = None,
        name: str | None = None,
        model_retries: int = DEFAULT_MODEL_RETRIES,
        tool_retries: int = DEFAULT_TOOL_RETRIES,
        event_retries: int = 0,
        retry_delay: float = DEFAULT_RETRY_DELAY,
    ) -> None:
        super().__init__(models=models, event_stream_handler=event_stream_handler, name=name)
        for what, value in (("model_retries", model_retries), ("tool_retries", tool_retries)):
            if value < 0:
                raise ValueError(f"{what} must be >= 0, not {value}")
        self._model_config: UnitConfig = {"retries": model_retries, "retry_delay": retry_delay}
        self._tool_config: UnitConfig = {"retries": tool_retries, "retry_delay": retry_delay}
        self._event_config: UnitConfig = {"retries": event_retries, "retry_delay": retry_delay}
        self._backend: NotebookOperationBackend | None = None

    # -- binding ------------------------------------------------------------------------------------

    def _bind_for_agent(self, agent: AbstractAgent[AgentDepsT, Any]) -> Any:
        # From the first durable agent of the process on, every attempt of a durable call is one
        # replay scope: spans (the run's own, opened by an outer Instrumentation capability, included)
        # that covered only replayed units are not exported, and a replayed model request's metrics
        # are not recorded again. (About 12 us per call; processes without such an agent pay nothing.)
        add_call_scope(replay_scope)
        named = self
        if not (self.name or agent.name):
            named = copy.copy(self)
            named.name = DEFAULT_AGENT_NAME
        return BaseDurabilityCapability._bind_for_agent(named, agent)

    def _bind_to_agent(self, agent: AbstractAgent[AgentDepsT, Any]) -> None:
        self._backend = None
        super()._bind_to_agent(agent)

    def get_durable_operation_backend(self) -> DurableOperationBackend[UnitConfig]:
        if self._backend is None:

            def tool_config(
                operation_id: DurableOperationId, tool: object | None, tool_name: str
            ) -> UnitConfig | Literal[False]:
                resolve = self._build_resolve_tool_config(self._tool_config)
                return cast(UnitConfig | Literal[False], resolve(cast(ToolsetTool[Any] | None, tool), tool_name))

            self._backend = NotebookOperationBackend(
                agent_name=self.name,
                default_model_id=self.default_model_id,
                config=RoleBasedOperationConfig(
                    model=self._model_config,
                    event=self._event_config,
                    capability=self._tool_config,
                    tool=self._tool_config,
                    resolve_tool=tool_config,
                ),
            )
        return self._backend

    def _toolset_base_config(self, kind: ToolsetKind) -> Any:
        return self._tool_config

    # -- the durable container: a durable call --------------------------------------------------------

    @property
    def in_durable_context(self) -> bool:
        return current_call() is not None

    def get_default_run_id(self) -> str | None:
        call = current_call()
        if call is None:
            return None
        # Deterministic: a later attempt of the call numbers its runs the same way, so it finds their units.
        return f"{call.execution_id}:{call.call_id}:{call.next_run()}"

    def get_default_conversation_id(self, run_id: str) -> str | None:
        return conversation_id_from_run_id(run_id) if self.in_durable_context else None

    async def wrap_run(self, ctx: RunContext[AgentDepsT], *, handler: WrapRunHandler) -> AgentRunResult[Any]:
        call = current_call()
        if call is None:
            return await handler()
        run_id = ctx.run_id or f"{call.execution_id}:{call.call_id}:{call.next_run()}"
        recorded = await asyncio.to_thread(call.store.load_agent_units, call.execution_id, call.call_id)
        journal = _RunJournal(call, run_id, {k: row for k, row in recorded.items() if row.run_id == run_id[:255]})
        token = _JOURNAL.set(journal)
        try:
            return await super().wrap_run(ctx, handler=handler)
        finally:
            _JOURNAL.reset(token)


# -- approvals through signals ----------------------------------------------------------------------------

APPROVAL_LOOP = """\
turn = await ask(prompt)
while turn["approvals"]:
    decisions = {}
    for call in turn["approvals"]:
        decisions[call["tool_call_id"]] = await signal("approve-" + call["tool_name"])
    turn = await ask(prompt, decisions, turn["messages"])
answer = turn["output"]
answer
"""
"""Workflow code that runs an agent to its end, waiting for ``signal("approve-<tool>")`` before each
tool call that needs approval. ``ask(prompt, decisions=None, messages=None)`` is a notebook function
returning :func:`agent_turn` (e.g. ``def ask(*a): return agent_turn(agent, *a, deps=deps)``)."""


def approval_signal(tool_name: str) -> str:
    """The name of the signal :data:`APPROVAL_LOOP` waits for before a call of ``tool_name``."""
    return APPROVAL_PREFIX + tool_name


def approved(decision: Any) -> bool:
    """``True`` and ``{"approved": true}`` (the widget's Approve button) approve; anything else denies."""
    if isinstance(decision, dict):
        return decision.get("approved") is True
    return decision is True


def decisions_to_results(decisions: Mapping[str, Any] | None) -> DeferredToolResults | None:
    """Signal values by tool call id -> pydantic-ai's ``DeferredToolResults`` (a denial tells the model
    why, with the decision's ``"reason"`` when it has one)."""
    if not decisions:
        return None
    approvals: dict[str, Any] = {}
    for call_id, decision in decisions.items():
        if approved(decision):
            approvals[call_id] = True
        else:
            reason = decision.get("reason") if isinstance(decision, dict) else None
            approvals[call_id] = ToolDenied(f"{DENIED} {reason}" if isinstance(reason, str) and reason else DENIED)
    return DeferredToolResults(approvals=approvals)


def agent_turn(
    agent: Agent[Any, Any],
    prompt: str | None = None,
    decisions: Mapping[str, Any] | None = None,
    messages: list[Any] | None = None,
    **run_options: Any,
) -> dict[str, Any]:
    """Run ``agent`` (synchronously) for one turn; returns what workflow code needs, JSON-like:

    ``{"output": ..., "approvals": [{"tool_name", "tool_call_id", "args"}], "messages": [...]}``.
    ``output`` is the run's output (a model instance crosses into the sandbox as a handle) or None
    while tool calls wait for approval; ``messages`` is the conversation (pydantic-ai's JSON form) to
    pass back with the ``decisions`` (signal values by tool call id) of the next turn. The agent's
    ``output_type`` needs ``DeferredToolRequests`` among its types for approvals (added here when
    the agent has tools that need approval and the run gives no ``output_type``).
    """
    history = ModelMessagesTypeAdapter.validate_python(messages) if messages else None
    results = decisions_to_results(decisions)
    if "output_type" not in run_options and _needs_deferred_output(agent):
        run_options["output_type"] = [agent.output_type, DeferredToolRequests]
    result = agent.run_sync(
        None if results is not None else prompt,
        message_history=history,
        deferred_tool_results=results,
        **run_options,
    )
    output = result.output
    approvals: list[dict[str, Any]] = []
    if isinstance(output, DeferredToolRequests):
        if output.calls:
            names = ", ".join(sorted({c.tool_name for c in output.calls}))
            raise AgentUnitError(f"tools deferred for external execution ({names}) are not supported by agent_turn")
        approvals = [
            {"tool_name": c.tool_name, "tool_call_id": c.tool_call_id, "args": c.args_as_dict()}
            for c in output.approvals
        ]
        output = None
    return {
        "output": output,
        "approvals": approvals,
        "messages": ModelMessagesTypeAdapter.dump_python(result.all_messages(), mode="json"),
    }


def _needs_deferred_output(agent: Agent[Any, Any]) -> bool:
    output_type = agent.output_type
    types = output_type if isinstance(output_type, list | tuple) else [output_type]
    if DeferredToolRequests in types:
        return False
    found: list[bool] = []

    def visit(toolset: Any) -> None:
        for tool in getattr(toolset, "tools", {}).values():
            if getattr(tool, "requires_approval", False):
                found.append(True)

    for toolset in agent.toolsets:
        toolset.apply(visit)
    return bool(found)


# -- what defines an agent, for the fingerprints of the notebook functions that run it ----------


def _agent_definition(agent: Agent[Any, Any], fingerprints: Fingerprinter) -> str:
    """An agent by what it does, not by the objects it holds (context variables, clients and locks
    that pickling cannot read): its name, model, settings, output and deps types, instructions and
    system prompts, and its tools (their functions' fingerprints). A notebook function that runs the
    agent then reuses its calls only while all of these are the same; an edited prompt or tool runs
    them again."""

    def part(value: Any) -> str:
        if value is None or isinstance(value, str | int | float | bool):
            return repr(value)
        if callable(value) and not isinstance(value, type):
            return fingerprints.function(value).digest
        try:
            return fingerprints.value(value)
        except Unhashable:
            return type(value).__qualname__

    model = agent.model
    if isinstance(model, str) or model is None:
        model_part = repr(model)
    else:  # what the model was made with (TestModel's settings, FunctionModel's functions; a client by
        # its type), not what it caches once used (cached properties such as its profile)
        made_with = {
            name: value
            for name, value in sorted(vars(model).items())
            if not isinstance(getattr(type(model), name, None), functools.cached_property)
        }
        model_part = type(model).__qualname__ + ":" + ",".join(f"{k}={part(v)}" for k, v in made_with.items())
    tools: list[str] = []

    def visit(toolset: Any) -> None:
        found = getattr(toolset, "tools", None)
        if not isinstance(found, dict):
            tools.append(f"toolset:{type(toolset).__qualname__}:{getattr(toolset, 'id', None)}")
            return
        for name, tool in sorted(found.items()):
            fn = getattr(tool, "function", None)
            tools.append(f"{name}:{getattr(tool, 'requires_approval', False)}:{part(fn) if fn else '-'}")

    for toolset in agent.toolsets:
        toolset.apply(visit)
    prompts = [part(p) for p in getattr(agent, "_system_prompts", ())]
    prompts += [part(getattr(r, "function", r)) for r in getattr(agent, "_system_prompt_functions", ())]
    instructions = getattr(agent, "_instructions", None)
    instructions = instructions if isinstance(instructions, list | tuple) else [instructions]
    return "\n".join(
        [
            f"name={agent.name!r}",
            f"model={model_part}",
            f"settings={part(agent.model_settings)}",
            f"output={part(agent.output_type)}",
            f"deps={part(getattr(agent, '_deps_type', None))}",
            "instructions=" + ",".join(part(getattr(i, "function", i)) for i in instructions),
            "prompts=" + ",".join(prompts),
            "tools=" + ",".join(tools),
        ]
    )


register_fingerprint(Agent, _agent_definition)
