"""A durable pydantic-ai agent: every model request and tool call is a durable call.

Workflow code runs in the Monty sandbox, which can only call notebook functions with JSON-like
values; a pydantic-ai ``Agent`` cannot run there. So the agent's loop is a few lines of
workflow code, and each of its steps is one durable call of a function this module builds:

- ``model_step(messages) -> step``: one request to the model. ``messages`` is the conversation
  so far as JSON (pydantic-ai's ``ModelMessagesTypeAdapter`` form); ``step`` is
  ``{"response": ..., "tool_calls": [...], "done": bool, "output": str | None}``.
- ``run_tool(call, decision=None) -> part``: one tool call, answered with the JSON of a
  ``ToolReturnPart`` (with ``outcome="retried"`` for bad arguments, an unknown tool and ``ModelRetry``,
  as pydantic-ai answers them, so the model tries again). A tool
  that needs approval runs only when ``decision`` approves it (``True`` or
  ``{"approved": true}``); otherwise the model is told the call was denied.

The loop (:data:`AGENT_LOOP`, or :func:`agent_loop`) waits for ``signal("approve-<tool>")``
before each call of a tool that needs approval. A kernel killed anywhere resumes at its last
checkpoint: every model request and tool call whose result was stored is answered from the
store, never made again (a request in flight at the kill is made again, as any call is).
Re-running the cell, or a changed cell with the same conversation, reuses them the same way.

::

    from pydantic_ai import Tool
    from durable_monty_nb.agents import DurableAgent

    agent = DurableAgent("openai:gpt-5", tools=[search, Tool(book, requires_approval=True)],
                         instructions="Plan trips.")
    model_step, run_tool = agent.model_step, agent.run_tool

then the loop in a ``%%durable`` cell (see :data:`AGENT_LOOP`). Supported: text output, plain
tool functions (no ``RunContext``); not supported: structured output types, streaming, toolsets
other than function tools, ``deps``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .engine.fingerprint import function_fingerprint, sha256

try:
    from pydantic import ValidationError
    from pydantic_ai import Agent, ModelRetry, Tool
    from pydantic_ai.direct import model_request_sync
    from pydantic_ai.messages import (
        ModelMessagesTypeAdapter,
        ModelRequest,
        ModelResponse,
        RetryInfo,
        TextPart,
        ToolCallPart,
        ToolReturnPart,
    )
    from pydantic_ai.models import Model, ModelRequestParameters, infer_model
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        f"durable_monty_nb.agents needs pydantic-ai: pip install 'durable-monty-nb[agents]' ({exc})"
    ) from None

__all__ = ["AGENT_LOOP", "DENIED", "DurableAgent", "agent_loop", "approval_signal"]

DENIED = "The user denied this tool call."
APPROVAL_PREFIX = "approve-"

AGENT_LOOP = """\
messages = [{"kind": "request", "parts": [{"part_kind": "user-prompt", "content": prompt}]}]
for turn in range(max_turns):
    step = await model_step(messages)
    messages.append(step["response"])
    if step["done"]:
        break
    parts = []
    for call in step["tool_calls"]:
        decision = None
        if call["needs_approval"]:
            decision = await signal("approve-" + call["tool_name"])
        parts.append(await run_tool(call, decision))
    messages.append({"kind": "request", "parts": parts})
answer = step["output"]
answer
"""
"""The agent loop, as workflow code: needs ``prompt``, ``max_turns``, ``model_step`` and ``run_tool``."""


def agent_loop(prompt: str = "prompt", max_turns: int | str = "max_turns") -> str:
    """:data:`AGENT_LOOP` with another prompt expression or turn limit, e.g. ``agent_loop("question", 5)``."""
    code = AGENT_LOOP.replace('content": prompt}', f'content": {prompt}}}')
    return code.replace("range(max_turns)", f"range({max_turns})")


def approval_signal(tool_name: str) -> str:
    """The name of the signal the loop waits for before a call of ``tool_name``."""
    return APPROVAL_PREFIX + tool_name


def approved(decision: Any) -> bool:
    """``True`` and ``{"approved": true}`` (the widget's Approve button) approve; anything else denies."""
    if isinstance(decision, dict):
        return decision.get("approved") is True
    return decision is True


class DurableAgent:
    """The durable steps of a pydantic-ai agent: :attr:`model_step` and :attr:`run_tool`.

    ``model`` is a pydantic-ai ``Model`` or a model name (``"openai:gpt-5"``); ``tools`` are plain
    functions or ``pydantic_ai.Tool`` objects (their names, docstrings and type hints make the
    schema the model sees; their arguments are validated as pydantic-ai validates them);
    ``approval`` names tools that need a human approval, in addition to tools made with
    ``Tool(fn, requires_approval=True)``. ``instructions`` are sent with every request.

    Both are closures over what identifies them (``model_step``: the model's name, the tools'
    schemas, the instructions; ``run_tool``: the tools' code and which need approval), so another
    agent has other fingerprints and does not reuse this one's stored steps. The loop ends when
    the model answers without tool calls; after ``max_turns`` requests without one, ``answer`` is None.
    """

    def __init__(
        self,
        model: Model | str,
        *,
        tools: Sequence[Tool[Any] | Callable[..., Any]] = (),
        instructions: str | None = None,
        approval: Iterable[str] = (),
        model_settings: Any = None,
    ) -> None:
        self.model = infer_model(model) if isinstance(model, str) else model
        self.instructions = instructions
        self.model_settings = model_settings
        self.tools: dict[str, Tool[Any]] = {}
        for item in tools:
            tool = item if isinstance(item, Tool) else Tool(item, takes_ctx=False)
            if tool.takes_ctx:
                raise TypeError(f"tool {tool.name!r} takes a RunContext: durable tools are plain functions")
            if tool.name in self.tools:
                raise ValueError(f"two tools are named {tool.name!r}")
            self.tools[tool.name] = tool
        wanted = set(approval)
        unknown = wanted - set(self.tools)
        if unknown:
            raise ValueError(f"approval names unknown tools: {sorted(unknown)}")
        self.needs_approval = frozenset(name for name, tool in self.tools.items() if tool.requires_approval) | wanted
        # The model sees every tool as a plain function tool: approval is the workflow's business.
        self.tool_defs = [dataclasses.replace(tool.tool_def, kind="function") for tool in self.tools.values()]
        self.model_step = self._make_model_step()
        self.run_tool = self._make_run_tool()

    @classmethod
    def from_agent(cls, agent: Agent[Any, Any], *, approval: Iterable[str] = (), **options: Any) -> DurableAgent:
        """The model and function tools of an ``Agent`` (its ``tools=[...]``, ``@agent.tool_plain``).

        Instructions are not read from the agent (they may be dynamic): pass ``instructions=``.
        """
        from pydantic_ai.toolsets import FunctionToolset

        if agent.model is None:
            raise ValueError("the agent has no model: DurableAgent(model, tools=...) instead")
        tools: list[Tool[Any]] = []
        for toolset in agent.toolsets:
            if isinstance(toolset, FunctionToolset):
                tools.extend(toolset.tools.values())
        return cls(agent.model, tools=tools, approval=approval, **options)

    def functions(self) -> dict[str, Callable[..., Any]]:
        """``{"model_step": ..., "run_tool": ...}``, for a workflow's namespace."""
        return {"model_step": self.model_step, "run_tool": self.run_tool}

    def start(self, engine: Any, prompt: str, *, key: str, max_turns: int = 10, **options: Any) -> Any:
        """Run :data:`AGENT_LOOP` for ``prompt`` on ``engine`` (an ``Engine``): returns the ``Run``."""
        namespace = {**self.functions(), "prompt": prompt, "max_turns": max_turns}
        return engine.start(AGENT_LOOP, namespace, key=key, **options)

    # -- the durable steps ------------------------------------------------------------------------

    def _make_model_step(self) -> Callable[[list[Any]], dict[str, Any]]:
        # The step function declares its fingerprint (the agent object itself is not plain data):
        # what identifies the step, so another model, other tool schemas or other instructions make
        # another step function, whose stored calls are not reused.
        agent = self
        identity = json.dumps(
            [
                f"{self.model.system}:{self.model.model_name}",
                [dataclasses.asdict(d) for d in self.tool_defs],
                self.instructions,
            ],
            sort_keys=True,
            default=str,
        )

        def model_step(messages: list[Any]) -> dict[str, Any]:
            """One model request: the conversation so far (JSON) -> the response and its tool calls."""
            _ = identity
            return agent._request(messages)

        model_step.__durable_fingerprint__ = sha256(identity)  # type: ignore[attr-defined]
        return model_step

    def _request(self, messages: list[Any]) -> dict[str, Any]:
        history = ModelMessagesTypeAdapter.validate_python(messages)
        if self.instructions is not None and history and isinstance(history[-1], ModelRequest):
            history[-1] = dataclasses.replace(history[-1], instructions=self.instructions)
        parameters = ModelRequestParameters(function_tools=list(self.tool_defs), allow_text_output=True)
        response = model_request_sync(
            self.model, history, model_settings=self.model_settings, model_request_parameters=parameters
        )
        return self._step(response)

    def _step(self, response: ModelResponse) -> dict[str, Any]:
        calls = [part for part in response.parts if isinstance(part, ToolCallPart)]
        text = "".join(part.content for part in response.parts if isinstance(part, TextPart))
        return {
            "response": ModelMessagesTypeAdapter.dump_python([response], mode="json")[0],
            "tool_calls": [
                {
                    "tool_name": call.tool_name,
                    "args": call.args,
                    "tool_call_id": call.tool_call_id,
                    "needs_approval": call.tool_name in self.needs_approval,
                }
                for call in calls
            ],
            "done": not calls,
            "output": None if calls else text,
        }

    def _make_run_tool(self) -> Callable[..., dict[str, Any]]:
        agent = self
        identity = json.dumps(  # the tools' code and which need approval: see _make_model_step
            [
                (name, function_fingerprint(tool.function), name in self.needs_approval)
                for name, tool in sorted(self.tools.items())
            ]
        )

        def run_tool(call: dict[str, Any], decision: Any = None) -> dict[str, Any]:
            """Run one tool call of a model response (if approved, when it needs approval)."""
            _ = identity
            return agent._tool_part(call, decision)

        run_tool.__durable_fingerprint__ = sha256(identity)  # type: ignore[attr-defined]
        return run_tool

    def _tool_part(self, call: dict[str, Any], decision: Any) -> dict[str, Any]:
        return _part_json(self._run(call, decision))

    def _run(self, call: dict[str, Any], decision: Any) -> ToolReturnPart[Any]:
        name, call_id, args = call["tool_name"], call["tool_call_id"], call.get("args")
        tool = self.tools.get(name)
        if tool is None:
            known = ", ".join(sorted(self.tools)) or "none"
            return _retried(name, call_id, f"Unknown tool name: {name!r}. Available tools: {known}", "unknown_tool")
        if name in self.needs_approval and not approved(decision):
            reason = decision.get("reason") if isinstance(decision, dict) else None
            content = f"{DENIED} {reason}" if isinstance(reason, str) and reason else DENIED
            return ToolReturnPart(name, content, tool_call_id=call_id, outcome="denied")
        schema = tool.function_schema
        try:
            if isinstance(args, str):
                valid = schema.validator.validate_json(args or "{}")
            else:
                valid = schema.validator.validate_python(args or {})
        except ValidationError as exc:
            errors = exc.errors(include_url=False, include_context=False)
            return _retried(name, call_id, errors, "validation_error")
        try:
            result = asyncio.run(schema.call(valid, None))  # type: ignore[arg-type] # plain tools: no RunContext
        except ModelRetry as exc:
            return _retried(name, call_id, exc.message, "model_retry")
        return ToolReturnPart(name, result, tool_call_id=call_id)


def _retried(name: str, call_id: str, content: Any, cause: Any) -> ToolReturnPart[Any]:
    """The model has to make the call again (pydantic-ai's form of a retry that answers a tool call)."""
    return ToolReturnPart(name, content, tool_call_id=call_id, outcome="retried", retry=RetryInfo(cause=cause))


def _part_json(part: Any) -> dict[str, Any]:
    """The JSON of one request part, as it appears in ``ModelMessagesTypeAdapter`` dumps."""
    return ModelMessagesTypeAdapter.dump_python([ModelRequest(parts=[part])], mode="json")[0]["parts"][0]
