"""A real MCP server for the agent tests (the mcp package's ``MCPServer``, formerly FastMCP), run as
a process of its own: ``python mcp_server.py SIDE_LOG`` serves streamable HTTP on 127.0.0.1 at a
port the OS picks, printed as ``PORT <n>`` once the socket listens; ``python mcp_server.py SIDE_LOG
--stdio`` serves its client over stdio (the client starts it).

Every tool call writes ``<pid> <entry>`` to SIDE_LOG (the side-effect log the tests count), as
the agents' own tools do; the server outlives the kernels and workers that call it.
"""

from __future__ import annotations

import base64
import os
import socket
import sys
from typing import Any

import anyio
import uvicorn
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.utilities.types import Image

# A 1x1 PNG (a red pixel): a tool's non-text output.
PIXEL = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGP4z8DwHwAFAAH/iZk9HQAAAABJRU5ErkJggg=="
)


def side(entry: str) -> None:
    with open(sys.argv[1], "a") as handle:
        handle.write(f"{os.getpid()} {entry}\n")


async def log_requests(ctx: Any, call_next: Any) -> Any:
    """Every request but tool calls (which log themselves): ``mcp <method>``."""
    if ctx.request_id is not None and ctx.method != "tools/call":
        side(f"mcp {ctx.method}")
    return await call_next(ctx)


server = MCPServer("stations", log_level="WARNING", middleware=[log_requests])


@server.tool()
def reserve(city: str) -> str:
    """Reserve a seat on the train to a city (a side effect: it must run once)."""
    side(f"mcp reserve {city}")
    return f"seat for {city}"


@server.tool()
def station_map(city: str) -> Image:
    """The station map of a city, as an image."""
    side(f"mcp map {city}")
    return Image(data=PIXEL, format="png")


async def main() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)  # connections queue from here on: the port can be printed before uvicorn serves
    print("PORT", sock.getsockname()[1], flush=True)
    app = server.streamable_http_app(host="127.0.0.1")
    await uvicorn.Server(uvicorn.Config(app, log_level="warning")).serve(sockets=[sock])


if __name__ == "__main__":
    if sys.argv[2:] == ["--stdio"]:  # started by its client, over stdio
        side("mcp started")
        server.run("stdio")
    else:
        anyio.run(main)
