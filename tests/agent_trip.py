"""Agents for the tests of durable_monty_nb.agents, importable by kernels, runner processes and RQ
and Dask workers alike (pydantic-ai agents hold context variables: they reach workers by import,
not by value).

The models are pydantic-ai FunctionModels, scripted: offline and deterministic. Every model request
and tool call writes ``<pid> <entry>`` to $SIDE_LOG, the side-effect log, so a test counts them.

``plan(question)``: LOOKUPS lookups (a ``RunContext[Deps]`` tool, one model request each), then the
weather of the last city (a tool of the toolset ``weather``), then a structured ``Trip``.
``ask(prompt, decisions, messages)``: one turn of the booking agent, whose ``book`` needs approval.
``route(question)``: seats reserved and a station map (an image) fetched through the tools of a real
MCP server (tests/mcp_server.py at $MCP_URL), then a structured ``Route``.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel
from pydantic_ai import Agent, RunContext, Tool
from pydantic_ai.messages import BinaryContent, ModelResponse, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import DeltaToolCall, FunctionModel
from pydantic_ai.toolsets import FunctionToolset

from durable_monty_nb.agents import NotebookDurability, agent_turn

CITIES = ["Lisbon", "Porto", "Faro", "Braga", "Evora", "Coimbra", "Aveiro", "Sintra"]


def side(entry: str) -> None:
    """Log ``entry``; when it is $HOLD_AT and $HOLD_FILE does not exist yet, make that file and block
    for good (a model or tool that never answers): a test kills the process there, at a known place."""
    with open(os.environ["SIDE_LOG"], "a") as handle:
        handle.write(f"{os.getpid()} {entry}\n")
    hold = os.environ.get("HOLD_FILE")
    if hold and os.environ.get("HOLD_AT") == entry and not Path(hold).exists():
        Path(hold).write_text(str(os.getpid()))
        threading.Event().wait()


@dataclass
class Deps:
    traveller: str


class Trip(BaseModel):
    city: str
    lookups: int
    traveller: str
    weather: str


def returns(messages: list, tool: str) -> list[ToolReturnPart]:
    return [p for m in messages for p in m.parts if isinstance(p, ToolReturnPart) and p.tool_name == tool]


def transient_failure(n: int) -> None:
    """$FLAKY_REQUEST=n: the model request with n messages fails once (a marker file remembers)."""
    if os.environ.get("FLAKY_REQUEST") == str(n):
        marker = Path(os.environ["SIDE_LOG"] + f".flaky-{n}")
        if not marker.exists():
            marker.write_text("failed once")
            raise ConnectionError("the model service is unavailable (transient)")


def planner(messages: list, info) -> ModelResponse:
    n = len(messages)
    side(f"model {n}")
    time.sleep(float(os.environ.get("MODEL_DELAY", "0")))
    transient_failure(n)
    lookups = returns(messages, "lookup")
    weather = returns(messages, "weather")
    if len(lookups) < int(os.environ.get("AGENT_LOOKUPS", "2")):
        city = CITIES[len(lookups)]
        return ModelResponse(parts=[ToolCallPart("lookup", {"city": city}, tool_call_id=f"look-{len(lookups)}")])
    last = lookups[-1].content
    if not weather:
        return ModelResponse(parts=[ToolCallPart("weather", {"city": last["city"]}, tool_call_id="weather")])
    trip = {"city": last["city"], "lookups": len(lookups), "traveller": last["for"], "weather": weather[0].content}
    return ModelResponse(parts=[ToolCallPart(info.output_tools[0].name, trip, tool_call_id="trip")])


async def planner_stream(messages: list, info):
    """The same answers, streamed (runs with an event handler stream their model requests)."""
    response = planner(messages, info)
    yield {
        i: DeltaToolCall(name=p.tool_name, json_args=p.args_as_json_str(), tool_call_id=p.tool_call_id)
        for i, p in enumerate(response.parts)
    }


forecasts = FunctionToolset(id="weather")


@forecasts.tool_plain
def weather(city: str) -> str:
    """The weather of a city."""
    side(f"weather {city}")
    return f"sunny in {city}"


agent = Agent(
    FunctionModel(planner),
    name="planner",
    output_type=Trip,
    deps_type=Deps,
    toolsets=[forecasts],
    capabilities=[NotebookDurability(retry_delay=0.05)],
)


@agent.tool
def lookup(ctx: RunContext[Deps], city: str) -> dict:
    """Flights to a city."""
    side(f"lookup {city}")
    return {"city": city, "flights": len(city), "for": ctx.deps.traveller}


def plan(question: str) -> Trip:
    return agent.run_sync(question, deps=Deps("Ana")).output


# -- approvals -------------------------------------------------------------------------------------------


class Booking(BaseModel):
    city: str
    booked: bool
    answer: str


def booker_model(messages: list, info) -> ModelResponse:
    side(f"booker {len(messages)}")
    done = returns(messages, "book")
    if not done:
        return ModelResponse(parts=[ToolCallPart("book", {"city": "Faro"}, tool_call_id="book-1")])
    booking = {"city": "Faro", "booked": done[0].outcome != "denied", "answer": str(done[0].content)}
    return ModelResponse(parts=[ToolCallPart(info.output_tools[0].name, booking, tool_call_id="done")])


def book(city: str) -> str:
    """Book a flight (pays)."""
    side(f"book {city}")
    return f"booked {city}"


booker = Agent(
    FunctionModel(booker_model),
    name="booker",
    output_type=Booking,
    tools=[Tool(book, requires_approval=True)],
    capabilities=[NotebookDurability()],
)


def ask(prompt: str, decisions: dict | None = None, messages: list | None = None) -> dict:
    return agent_turn(booker, prompt, decisions, messages)


# -- an MCP server's tools (tests/mcp_server.py, at $MCP_URL) ----------------------------------------


class Route(BaseModel):
    seats: list[str]
    map_type: str
    map_bytes: int


def images(messages: list) -> list[BinaryContent]:
    """The images the model was shown (a tool's non-text output reaches it as content)."""
    found = []
    for message in messages:
        for part in message.parts:
            content = getattr(part, "content", None)
            for item in content if isinstance(content, list) else [content]:
                if isinstance(item, BinaryContent) and item.is_image:
                    found.append(item)
    return found


def router_model(messages: list, info) -> ModelResponse:
    """$MCP_SEATS reservations (one request each), the station map of the last city, then a Route
    that tells what the model saw of the map (an image)."""
    n = len(messages)
    side(f"router {n}")
    seats = returns(messages, "reserve")
    wanted = int(os.environ.get("MCP_SEATS", "2"))
    if len(seats) < wanted:
        city = CITIES[len(seats)]
        return ModelResponse(parts=[ToolCallPart("reserve", {"city": city}, tool_call_id=f"seat-{len(seats)}")])
    if not returns(messages, "station_map"):
        return ModelResponse(parts=[ToolCallPart("station_map", {"city": CITIES[wanted - 1]}, tool_call_id="map")])
    (image,) = images(messages)
    route = {"seats": [str(p.content) for p in seats], "map_type": image.media_type, "map_bytes": len(image.data)}
    return ModelResponse(parts=[ToolCallPart(info.output_tools[0].name, route, tool_call_id="route")])


@functools.cache
def router(url: str) -> Agent[None, Route]:
    """The agent whose tools are the MCP server's at ``url`` (its toolset's id names its units)."""
    from pydantic_ai.mcp import MCPToolset  # the agents-mcp extra: the other agents need not have it

    return Agent(
        FunctionModel(router_model),
        name="router",
        output_type=Route,
        toolsets=[MCPToolset(url, id="stations")],
        capabilities=[NotebookDurability(retry_delay=0.05)],
    )


def route(question: str) -> Route:
    return router(os.environ["MCP_URL"]).run_sync(question).output
