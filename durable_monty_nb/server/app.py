"""The ASGI app (Starlette) and how to serve it (uvicorn), in a process or a kernel's thread.

Endpoints, each authenticated by a capability token (:mod:`durable_monty_nb.tokens`):

- ``POST /executions/{name_or_id}/signals/{signal}``, body ``{"value": ..., "idempotency_key": ...}``,
  ``Authorization: Bearer <token>`` (a token of that execution and signal, or admin);
- ``GET /executions/{name_or_id}``: its status as JSON (a token of that execution, or admin),
  with the runner that drives it when it is detached;
- ``POST /executions/{name_or_id}/cancel``, body empty or ``{}``: cancel it, through the store as
  ``%durable_cancel`` does (a cancel token of that execution, or admin). A detached run's runner
  stops it; one the serving kernel drives (``%durable_serve``) stops at once;
- ``POST /calls/{token}/complete``, body ``{"value": ...}`` or ``{"error": {"type": ..., "message": ...}}``.

Answers: 401 missing, malformed, forged or expired token; 403 a token of another scope; 400
malformed JSON or arguments; 413 a body over the limit; 404 unknown execution or call; 409 a
delivery to a completed execution, a second different completion, a cancel of an execution that
ended or that a kernel (not this server's) drives. The code of a refusal is the
``http_status`` of its exception's class (:mod:`durable_monty_nb.errors`), never read from its
message. A refused request changes nothing; an unexpected failure answers 503 (never a bare 500)
and the log names only its type.
Log lines never hold a token: paths of ``/calls/...`` are redacted, headers are never logged.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .. import signals as signals_module
from ..engine import detached
from ..engine.engine import Engine
from ..errors import DurableError, ExecutionNotFound
from ..store import handoffs, mailbox
from ..store.mailbox import check_name
from ..store.store import Store
from ..tokens import Scope, TokenError, verify_token

log = logging.getLogger("durable_monty_nb.server")
MAX_BODY = 1 << 20  # bytes
SIGNAL_KEYS = frozenset(("value", "idempotency_key"))
COMPLETE_KEYS = frozenset(("value", "error"))
CANCEL_KEYS: frozenset[str] = frozenset()
_REDACT = re.compile(r"^/calls/[^/]*")


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def unauthorized(message: str) -> HTTPError:
    return HTTPError(401, message, {"WWW-Authenticate": "Bearer"})


def redact(path: str) -> str:
    return _REDACT.sub("/calls/<token>", path)


def create_app(
    store: Store | str | None = None, *, max_body: int = MAX_BODY, engine: Engine | None = None
) -> Starlette:
    """The app over a store (a Store, a URL or a SQLite path); ``engine``: the engine of the
    serving process (a kernel's), whose own runs a cancel stops at once."""
    own = not isinstance(store, Store)
    the_store = Store(store) if own else store  # type: ignore[arg-type]

    def scope_of(request: Request) -> Scope:
        header = request.headers.get("authorization", "")
        kind, _, token = header.partition(" ")
        if kind.lower() != "bearer" or not token.strip():
            raise unauthorized("a capability token is needed: Authorization: Bearer <token>")
        try:
            return verify_token(the_store.signer, token.strip())
        except TokenError as exc:
            raise unauthorized(str(exc)) from None

    async def read_json(request: Request, allowed: frozenset[str], empty: bool = False) -> dict[str, Any]:
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                if int(declared) > max_body:
                    raise HTTPError(413, f"the body is over {max_body} bytes")
            except ValueError:
                raise HTTPError(400, "bad Content-Length") from None
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body:
                raise HTTPError(413, f"the body is over {max_body} bytes")
        if empty and not body.strip():
            return {}
        try:
            data = json.loads(bytes(body).decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise HTTPError(400, "the body is not JSON") from None
        if not isinstance(data, dict):
            raise HTTPError(400, "the body is a JSON object")
        unknown = set(data) - allowed
        if unknown:
            raise HTTPError(400, f"unknown field(s): {', '.join(sorted(map(str, unknown)))[:200]}")
        return data

    def find(name_or_id: str) -> Any:
        try:
            return the_store.find_execution(name_or_id)
        except ExecutionNotFound:
            raise HTTPError(404, "no such execution") from None

    async def post_signal(request: Request) -> JSONResponse:
        scope = scope_of(request)
        data = await read_json(request, SIGNAL_KEYS)
        name_or_id, signal = request.path_params["name"], request.path_params["signal"]
        check_name(signal)  # a SignalError: 400
        key = data.get("idempotency_key")
        if key is not None and (not isinstance(key, str) or not key or len(key) > mailbox.MAX_KEY_LENGTH):
            raise HTTPError(400, f"idempotency_key is a string of 1 to {mailbox.MAX_KEY_LENGTH} characters")

        def deliver() -> JSONResponse:
            row = find(name_or_id)
            if not scope.allows_signal(row.id, signal):
                raise HTTPError(403, "this token does not allow this signal of this execution")
            delivery = signals_module.deliver_signal(  # a completed execution: ExecutionCompleted, 409
                the_store, row.id, signal, data.get("value"), idempotency_key=key, source="http", execution=row
            )
            return JSONResponse(
                {
                    "delivered": not delivery.duplicate,
                    "duplicate": delivery.duplicate,
                    "execution_id": row.id,
                    "signal": signal,
                    "seq": delivery.seq,
                }
            )

        return await run_in_threadpool(deliver)

    async def get_execution(request: Request) -> JSONResponse:
        scope = scope_of(request)
        name_or_id = request.path_params["name"]

        def status() -> JSONResponse:
            row = find(name_or_id)
            if not scope.allows_status(row.id):
                raise HTTPError(403, "this token does not allow reading this execution")
            return JSONResponse(status_json(the_store, row))

        return await run_in_threadpool(status)

    async def cancel(request: Request) -> JSONResponse:
        scope = scope_of(request)
        await read_json(request, CANCEL_KEYS, empty=True)
        name_or_id = request.path_params["name"]

        def stop() -> JSONResponse:
            row = find(name_or_id)
            if not scope.allows_cancel(row.id):
                raise HTTPError(403, "this token does not allow cancelling this execution")
            if engine is not None:
                done = engine.cancel(row.id)  # its own runs, then detached ones
            else:
                done = row.status != "completed" and detached.cancel_detached(the_store, row.id)
            if not done:
                raise detached.not_cancellable(the_store, row)  # NotCancellable: 409
            after = the_store.get_execution(row.id)
            handoff = handoffs.load_handoff(the_store, row.id)
            return JSONResponse(
                {
                    "cancelled": True,
                    "execution_id": row.id,
                    "status": detached.state_of(
                        after, (handoff := handoffs.load_handoff(the_store, row.id)) is not None
                    ),
                    "runner": detached.runner_state(after, handoff),
                }
            )

        return await run_in_threadpool(stop)

    async def complete(request: Request) -> JSONResponse:
        try:
            scope = verify_token(the_store.signer, request.path_params["token"])
        except TokenError as exc:
            raise unauthorized(str(exc)) from None
        if scope.call_id is None:
            raise HTTPError(403, "this token does not complete a call")
        data = await read_json(request, COMPLETE_KEYS)
        if ("value" in data) == ("error" in data):
            raise HTTPError(400, 'the body is {"value": ...} or {"error": {"type": ..., "message": ...}}')

        def run() -> JSONResponse:
            try:
                delivery = signals_module.complete_call(
                    the_store, scope, data.get("value"), data.get("error"), source="http"
                )
            except ExecutionNotFound:
                raise HTTPError(404, "no such execution") from None  # not the store's URL
            return JSONResponse(
                {"completed": not delivery.duplicate, "duplicate": delivery.duplicate, "call_id": scope.call_id}
            )

        return await run_in_threadpool(run)

    routes = [
        Route("/executions/{name}/signals/{signal}", post_signal, methods=["POST"]),
        Route("/executions/{name}", get_execution, methods=["GET"]),
        Route("/executions/{name}/cancel", cancel, methods=["POST"]),
        Route("/calls/{token}/complete", complete, methods=["POST"]),
    ]

    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        status, message, headers = _answer_for(exc)
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    app = Starlette(routes=routes, exception_handlers={HTTPError: on_error, Exception: on_error})
    app.state.store = the_store
    return Guard(app)  # type: ignore[return-value]


class Guard:
    """Outermost ASGI layer: every error becomes a JSON answer; one redacted log line a request."""

    def __init__(self, app: Starlette) -> None:
        self.app = app
        self.state = app.state

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]], send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        answered: dict[str, Any] = {"status": None}

        async def tracking_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                answered["status"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            status, message, headers = _answer_for(exc)
            if answered["status"] is None:
                response = JSONResponse({"error": message}, status_code=status, headers=headers)
                await response(scope, receive, tracking_send)
        log.info(
            "%s %s %s %.1f ms",
            scope.get("method", "?"),
            redact(scope.get("path", "?"))[:200],
            answered["status"],
            (time.monotonic() - started) * 1000,
        )


def _answer_for(exc: Exception) -> tuple[int, str, dict[str, str]]:
    if isinstance(exc, HTTPError):
        return exc.status, exc.message, exc.headers
    if isinstance(exc, DurableError):
        status = exc.http_status
        if status >= 500:  # the store (or another service) failed: its message may name it
            log.warning("store error: %s", type(exc).__name__)
            return status, "the store cannot answer right now", {}
        return status, str(exc)[:500], {}
    log.error("unexpected %s while answering a request", type(exc).__name__)
    return 503, "the server could not answer this request", {}


def status_json(store: Store, row: Any) -> dict[str, Any]:
    """An execution's status, its calls, its waits, its mailbox, and for a detached one the
    runner that drives it (``null`` for a run of a kernel); no tokens, no values of calls."""
    waits = signals_module.waits_from_store(store, row.id)
    handoff = handoffs.load_handoff(store, row.id)
    live = detached.live_counts(row, handoff)
    return {
        "id": row.id,
        "key": row.key,
        "status": detached.state_of(row, handoff is not None),
        "calls": {
            "total": row.calls_total,
            "done": row.calls_done,
            "failed": row.calls_failed,
            "reused": row.calls_reused,
            **{name: live.get(name, 0) for name in detached.LIVE_COUNTS},
        },
        "detached": handoff is not None,
        "runner": detached.runner_state(row, handoff),
        "created_at": row.created_at,
        "finished_at": row.finished_at,
        "error": (row.error or "").strip().splitlines()[-1] if row.error else None,
        "waiting_for": [
            {"kind": w.kind, "name": w.name, "call_id": w.call_id, "due_at": w.due_at, "attempt": w.attempt}
            for w in waits
        ],
        "mailbox": [
            {
                "seq": m.seq,
                "signal": m.name,
                "consumed": m.consumed_by is not None,
                "consumed_by": m.consumed_by,
                "source": m.source,
                "created_at": m.created_at,
            }
            for m in mailbox.mailbox(store, row.id)
        ],
    }


# -- serving ---------------------------------------------------------------------------------------


def _config(app: Any, host: str, port: int) -> Any:
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, access_log=False, log_level="info", server_header=False)


def serve(db: str | None, *, host: str = "127.0.0.1", port: int = 8787) -> None:
    """Serve a store until interrupted (``durable-monty-nb serve``)."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    app = create_app(db)
    print(
        f"durable-monty-nb: serving {app.state.store.display_url} on http://{host}:{port} "
        f"(tokens: durable-monty-nb token --db ... --help)",
        flush=True,
    )
    uvicorn.Server(_config(app, host, port)).run()


class BackgroundServer:
    """The app served by uvicorn in a daemon thread of this process (``%durable_serve``)."""

    def __init__(self, store: Store, host: str = "127.0.0.1", port: int = 8787, engine: Engine | None = None) -> None:
        import uvicorn

        self.host, self.port = host, port
        self.server = uvicorn.Server(_config(create_app(store, engine=engine), host, port))
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="durable-serve")

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise DurableError(f"the server could not start on {self.url} (is the port in use?)")
            if time.monotonic() > deadline:
                raise DurableError(f"the server did not start on {self.url} within {timeout:g} s")
            self.thread.join(0.02)
        signals_module.set_served_url(self.url)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        if signals_module.served_url() == self.url:
            signals_module.set_served_url(None)
