"""The agent's HTTP front: the OpenAI-compatible routes (:mod:`edge_agent.openai_routes`) on uvicorn.

    client ──> listening socket ──> uvicorn (h11; its own event loop on thread "edge-http")
               bound in __init__,      │  more than ``max_connections`` connections: 503 at once
               backlog 2048            v
                                    _Guard: a token is set and Authorization is not
                                    "Bearer <token>"? 401 invalid_api_key (every route but /healthz)
                                       │  ``max_concurrency`` requests in flight already? 503
                                       v  ``overloaded`` + Retry-After, at once (never queued)
                                    the routes ──> the scheduler (its queue full: 429 ``busy``)

The socket is bound when the object is built, so a taken port fails before any model loads;
:meth:`HttpApi.start` serves it on a thread with its own event loop and returns once uvicorn
listens, :meth:`HttpApi.stop` ends it (requests still running get ``_SHUTDOWN_S`` to finish).
Connections idle for ``keep_alive_s`` are closed, a fresh one included (no request within that
time), and so is one whose request has not arrived whole ``request_read_s`` after its first
byte. The token is compared with :func:`hmac.compare_digest` and never logged. Binding beyond
loopback is the serving stack's decision (:func:`is_loopback`); this module binds what it is given.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable

import h11
import uvicorn
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from edge_agent.inference.engine import Engine
from edge_agent.inference.scheduler import Scheduler
from edge_agent.metrics import Metrics
from edge_agent.openai_routes import OpenAIRoutes, error_response
from edgeglm.errors import UnavailableError

__all__ = ["BACKLOG", "DEFAULT_MAX_CONCURRENCY", "HttpApi", "is_loopback"]

log = logging.getLogger(__name__)

BACKLOG = 2048  # connections the kernel queues before uvicorn accepts them (the old front had 5)
DEFAULT_MAX_CONCURRENCY = 64
_OPEN = frozenset({"/healthz"})  # answered without the token: liveness probes
_UNGATED = frozenset({"/healthz", "/metrics"})  # cheap, bodiless: not counted against the limit
_SHUTDOWN_S = 5.0
REQUEST_READ_S = 15.0  # a request's head and body arrive within this of its first byte


def is_loopback(host: str) -> bool:
    """``host`` is this box only: ``localhost``, 127.0.0.0/8 or ::1 (0.0.0.0 and :: are not)."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False  # a name: it may resolve anywhere
    mapped = getattr(address, "ipv4_mapped", None)
    return bool((mapped or address).is_loopback)


class _Guard:
    """ASGI middleware: the bearer token, then at most ``limit`` requests in flight (else 503 at once)."""

    def __init__(self, app: ASGIApp, *, token: str | None, limit: int, metrics: Metrics) -> None:
        self.app, self.limit, self.metrics = app, limit, metrics
        self.token = None if token is None else token.encode()
        self.in_flight = 0  # touched on the event loop's thread only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if self.token is not None and path not in _OPEN and not self._authorized(scope):
            self.metrics.rejected("invalid_api_key", health=False)
            why = "a valid 'Authorization: Bearer <token>' header is required"
            await error_response("invalid_api_key", why, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
            return
        if path in _UNGATED:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            self.metrics.rejected("overloaded", health=False)
            why = f"{self.limit} requests are in flight already; retry later"
            await error_response("overloaded", why, {"Retry-After": "1"})(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    def _authorized(self, scope: Scope) -> bool:
        assert self.token is not None
        given = [v for k, v in scope["headers"] if k == b"authorization"]
        if len(given) != 1:
            return False
        scheme, _, credentials = given[0].partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), self.token)


class _Protocol(H11Protocol):
    """uvicorn's h11 protocol with two deadlines it lacks: the keep-alive timer is armed from the
    connection's start too (a client that connects and sends nothing is closed after
    ``timeout_keep_alive`` seconds), and a request must arrive whole (head and body) within
    ``read_s`` of its first byte (a pipelined one included), else the connection is closed: a
    client trickling its headers or its body a byte at a time holds a connection (and a request
    slot) that long, no longer; and a client that stops reading a stream gets ``read_s`` to drain
    the send buffer before its connection is closed (and its generation cancelled)."""

    read_s: float = REQUEST_READ_S
    _read_timer: asyncio.TimerHandle | None = None
    _write_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def data_received(self, data: bytes) -> None:
        if self._read_timer is None:
            self._read_timer = self.loop.call_later(self.read_s, self._read_expired)
        super().data_received(data)

    def on_response_complete(self) -> None:
        self._stop_read_timer()
        super().on_response_complete()  # may start a pipelined request already buffered
        if self._read_pending() and self._read_timer is None and not self.transport.is_closing():
            self._read_timer = self.loop.call_later(self.read_s, self._read_expired)

    def pause_writing(self) -> None:
        """The client stopped reading (the send buffer is full): it gets ``read_s`` to drain it."""
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.read_s, self._write_expired)

    def resume_writing(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        super().resume_writing()

    def _write_expired(self) -> None:
        self._write_timer = None
        log.info("dropped a connection whose client read nothing for %.0f s", self.read_s)
        self.transport.abort()  # close() would wait to flush what the client does not read

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_read_timer()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        super().connection_lost(exc)

    def _stop_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_pending(self) -> bool:
        """Part of a request has arrived and the rest has not: a head, or a body, unfinished."""
        head_pending = self.conn.their_state is h11.IDLE and bool(self.conn.trailing_data[0])
        return head_pending or self.conn.their_state is h11.SEND_BODY

    def _read_expired(self) -> None:
        self._read_timer = None
        if self._read_pending():
            log.info("closed a connection whose request did not arrive within %.0f s", self.read_s)
            self.transport.close()


class HttpApi:
    """Serves ``engine`` through ``scheduler`` over HTTP; :meth:`start` returns once it listens.

    ``current`` (instead of a fixed engine and scheduler) names what serves *now*: the daemon's
    front, whose engine an update swaps; while it has none, requests get 503 ``unavailable``.
    ``token``: every route but /healthz needs ``Authorization: Bearer <token>``. Raises
    :class:`OSError` when ``host:port`` cannot be bound.
    """

    def __init__(
        self,
        engine: Engine | None,
        scheduler: Scheduler | None,
        metrics: Metrics,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        default_timeout_s: float = 300.0,
        current: Callable[[], tuple[Engine, Scheduler] | None] | None = None,
        token: str | None = None,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        max_connections: int | None = None,
        keep_alive_s: int = 5,
        request_read_s: float = REQUEST_READ_S,
    ) -> None:
        fixed = (engine, scheduler) if engine is not None and scheduler is not None else None
        self.metrics = metrics
        self.routes = OpenAIRoutes(metrics, current or (lambda: fixed), default_timeout_s=default_timeout_s)
        self.max_concurrency = max_concurrency
        guard = Middleware(_Guard, token=token, limit=max_concurrency, metrics=metrics)
        self._sock = _listen(host, port)
        config = uvicorn.Config(
            self.routes.app([guard]),
            http=type("_Protocol", (_Protocol,), {"read_s": request_read_s}),
            loop="asyncio",
            ws="none",
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            backlog=BACKLOG,
            # connections (idle keep-alive ones included) past which uvicorn answers 503 itself
            limit_concurrency=max_connections or max(1024, 8 * max_concurrency),
            timeout_keep_alive=keep_alive_s,
            timeout_graceful_shutdown=int(_SHUTDOWN_S),
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._sock.getsockname()[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self) -> HttpApi:
        url = self.url
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, name="edge-http", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise UnavailableError("the HTTP API", f"uvicorn did not start on {url}; see the log above")
            time.sleep(0.01)
        log.info("serving the OpenAI-compatible API on %s", url)
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.should_exit = True
            self._thread.join()
            self._thread = None
        self._sock.close()


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` with a large backlog; :class:`OSError` if it cannot be."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT, never a live port
        sock.bind(address)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
