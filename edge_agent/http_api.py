"""The agent's optional OpenAI-compatible HTTP endpoint (loopback by default), standard library only.

    method path                  answer
    POST   /v1/chat/completions  chat.completion, or chat.completion.chunk events when ``stream``
    POST   /v1/completions       text_completion (``prompt``), streamed the same way
    GET    /v1/models            the one model this agent serves
    GET    /metrics              Prometheus text (``Metrics.render``)
    GET    /healthz              status, model, version and the heartbeat health summary

Bodies are mapped onto :class:`~edgeglm.protocol.InferRequest` and validated exactly as an MQTT
request is; ``temperature`` defaults to 0 (greedy), not OpenAI's 1; ``top_k`` and
``repetition_penalty`` are extensions. Generations run on the scheduler MQTT serving uses; its
callbacks hand text to the handler thread through a queue. Streams are server-sent events
(``data: {json}``, last ``data: [DONE]``) on an HTTP/1.1 response that closes the connection at its
end; a client that hangs up mid-stream cancels its generation. Every error is an OpenAI-shaped
``{"error": {...}}`` body with the status of ``_STATUS``; no exception in a handler stops the server.
"""

from __future__ import annotations

import json
import logging
import queue
import secrets
import socketserver
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from edge_agent.inference.engine import Engine
from edge_agent.inference.generation import Generation, GenerationResult
from edge_agent.inference.scheduler import Scheduler
from edge_agent.metrics import Metrics
from edgeglm.errors import ProtocolError, RequestError
from edgeglm.protocol import InferRequest, decode

__all__ = ["HttpApi"]

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024
_GRACE_S = 5.0  # the scheduler gives a request up at its deadline; wait this much longer for that
_KNOBS = ("top_p", "top_k", "repetition_penalty", "seed", "stream")
_STREAM_HEADERS = (("Cache-Control", "no-cache"), ("Connection", "close"))
_Events = queue.Queue[tuple[str, Any]]  # ("text", str) ... then ("done", GenerationResult)

# error code -> (HTTP status, OpenAI error type): the one table from domain errors to HTTP
_STATUS: dict[str, tuple[int, str]] = {
    "bad_request": (400, "invalid_request_error"),
    "too_long": (400, "invalid_request_error"),
    "model_not_found": (404, "invalid_request_error"),
    "not_found": (404, "invalid_request_error"),
    "method_not_allowed": (405, "invalid_request_error"),
    "length_required": (411, "invalid_request_error"),
    "too_large": (413, "invalid_request_error"),
    "busy": (429, "rate_limit_error"),
    "internal": (500, "server_error"),
    "unavailable": (503, "server_error"),
    "timeout": (504, "server_error"),
}


class _Refused(Exception):
    def __init__(self, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = "model_not_found" if code == "unknown_model" else code
        self.message, self.headers = message, headers or {}


def _error(code: str, message: str) -> dict[str, Any]:
    kind = _STATUS.get(code, _STATUS["internal"])[1]
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


class _Server(ThreadingHTTPServer):
    api: HttpApi

    def server_bind(self) -> None:  # as the base class, without its reverse DNS lookup of the host
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])


class HttpApi:
    """Serves ``engine`` over HTTP through ``scheduler``; :meth:`start` returns at once.

    ``current`` (instead of a fixed engine and scheduler) names what serves *now*: the daemon's
    front, whose engine an update swaps; while it has none, requests get 503 ``unavailable``.
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
    ) -> None:
        fixed = (engine, scheduler) if engine is not None and scheduler is not None else None
        self._current = current or (lambda: fixed)
        self.metrics = metrics
        self.default_timeout_s = default_timeout_s
        self._server = _Server((host, port), _Handler)
        self._server.api = self
        self._thread: threading.Thread | None = None

    def now(self) -> tuple[Engine, Scheduler] | None:
        return self._current()

    def live(self) -> tuple[Engine, Scheduler]:
        """The engine and scheduler serving now, or :class:`_Refused` ``unavailable``."""
        now = self._current()
        if now is None:
            raise _Refused("unavailable", "no model is installed on this box yet")
        return now

    @property
    def engine(self) -> Engine:
        return self.live()[0]

    @property
    def url(self) -> str:
        return f"http://{self._server.server_name}:{self._server.server_port}"

    def start(self) -> HttpApi:
        self._thread = threading.Thread(target=self._server.serve_forever, name="edge-http", daemon=True)
        self._thread.start()
        log.info("serving the OpenAI-compatible API on %s", self.url)
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def request(self, body: dict[str, Any], *, chat: bool) -> InferRequest:
        """The wire request for an OpenAI body, or :class:`_Refused`."""
        model, engine = body.get("model"), self.engine
        if model is not None and model != engine.model:
            raise _Refused("model_not_found", f"this agent serves {engine.model!r}, not {model!r}")
        if body.get("n") not in (None, 1):
            raise _Refused("bad_request", "field 'n': only 1 choice is supported")
        data: dict[str, Any] = {k: body[k] for k in _KNOBS if body.get(k) is not None}
        data["temperature"] = 0.0 if body.get("temperature") is None else body["temperature"]
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        if limit is not None:
            data["max_tokens"] = limit
        if (stop := body.get("stop")) is not None:
            data["stop"] = [stop] if isinstance(stop, str) else stop
        if chat:
            messages = body.get("messages")
            data["messages"] = [_message(m) for m in messages] if isinstance(messages, list) else messages
        else:
            data["prompt"] = body.get("prompt")
        try:
            return decode(InferRequest, json.dumps(data, ensure_ascii=False))
        except ProtocolError as exc:
            raise _Refused("bad_request", exc.why) from exc

    def submit(self, request: InferRequest, events: _Events) -> Generation:
        """Queue ``request`` on the scheduler; its text and its result arrive on ``events``."""
        arrived = time.monotonic()
        engine, scheduler = self.live()  # one pair for the whole request, even across a swap
        try:
            prompt = engine.prepare(request, deadline=arrived + self.default_timeout_s)
        except RequestError as exc:
            self.metrics.rejected(exc.code)
            raise _Refused(exc.code, exc.why) from exc

        def done(result: GenerationResult) -> None:
            self.metrics.request_finished(
                outcome=result.error_code or result.finish_reason,
                latency_s=time.monotonic() - arrived,
                ttft_s=None if result.ttft_ms is None else result.ttft_ms / 1000,
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
                queue_s=result.queue_ms / 1000,
                cached_tokens=result.cached_tokens,
            )
            events.put(("done", result))

        self.metrics.request_started()
        try:
            return scheduler.submit(prompt, lambda text, _ids: events.put(("text", text)), done)
        except RequestError as exc:  # balances request_started, as MQTT serving does
            self.metrics.request_finished(
                outcome=exc.code, latency_s=0.0, ttft_s=None, prompt_tokens=0, completion_tokens=0
            )
            raise _Refused(exc.code, exc.why, {"Retry-After": "1"} if exc.code == "busy" else None) from exc


def _message(message: Any) -> Any:
    """An OpenAI chat message as the wire has it: text parts joined, ``developer`` as ``system``."""
    if not isinstance(message, dict):
        return message
    content, role = message.get("content"), message.get("role")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        content = "".join(str(p.get("text", "")) for p in content)
    return {"role": "system" if role == "developer" else role, "content": content}


def _usage(result: GenerationResult) -> dict[str, Any]:
    prompt, completion = result.prompt_tokens, result.completion_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": result.cached_tokens},  # as OpenAI reports it
    }


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "edge-agent"
    timeout = 60  # seconds a socket may sit idle, or blocked on a client that does not read
    _started = False  # the status line went out: too late for an error status

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """What the base class refuses itself (a bad request line, an unknown method), as JSON."""
        error = {"message": message or explain or "", "type": "invalid_request_error", "param": None}
        body = {"error": {**error, "code": None}}
        self._send(code, json.dumps(body).encode(), "application/json")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_OTHER(self) -> None:
        self._dispatch(self.command)

    do_PUT = do_DELETE = do_PATCH = do_OTHER

    def _dispatch(self, method: str) -> None:
        routes: dict[str, tuple[str, Callable[[], None]]] = {
            "/v1/chat/completions": ("POST", lambda: self._complete(chat=True)),
            "/v1/completions": ("POST", lambda: self._complete(chat=False)),
            "/v1/models": ("GET", self._models),
            "/metrics": ("GET", self._metrics),
            "/healthz": ("GET", self._health),
        }
        self._started = False
        path = urlsplit(self.path).path
        try:
            if path not in routes:
                raise _Refused("not_found", f"no route {path!r}")
            allowed, handle = routes[path]
            if method != allowed:
                raise _Refused("method_not_allowed", f"{path} takes {allowed}", {"Allow": allowed})
            handle()
        except _Refused as exc:
            self._fail(exc.code, exc.message, exc.headers)
        except Exception:
            log.exception("the HTTP API failed on %s %s", method, path)
            self._fail("internal", "the agent failed on this request; see its log")

    def _fail(self, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        if self._started:  # mid-stream: end it; the client sees a stream without [DONE]
            self.close_connection = True
            return
        status = _STATUS.get(code, _STATUS["internal"])[0]
        self._send(status, json.dumps(_error(code, message)).encode(), "application/json", headers)

    def _send(self, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
        close = status >= 400  # an error may leave the request body unread: drop the connection
        self._started = True
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for name, value in {**(headers or {}), **({"Connection": "close"} if close else {})}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            close = True
            log.debug("client %s left before its reply", self.address_string())
        self.close_connection = self.close_connection or close

    def _json(self, obj: dict[str, Any]) -> None:
        self._send(200, json.dumps(obj, ensure_ascii=False).encode(), "application/json")

    def _length(self) -> int:
        length = self.headers.get("Content-Length", "")
        if not length.isdigit():
            raise _Refused("length_required", "send the body with a Content-Length header")
        if int(length) > MAX_BODY_BYTES:
            raise _Refused("too_large", f"the body is {length} bytes; the limit is {MAX_BODY_BYTES}")
        return int(length)

    def handle_expect_100(self) -> bool:
        """Refuse an oversized body before the client sends it, not after ``100 Continue``."""
        self._started = False
        try:
            self._length()
        except _Refused as exc:
            self._fail(exc.code, exc.message)
            return False
        return super().handle_expect_100()

    def _body(self) -> dict[str, Any]:
        raw = self.rfile.read(self._length())
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise _Refused("bad_request", f"the body is not UTF-8 JSON: {exc}"[:300]) from exc
        if not isinstance(body, dict):
            raise _Refused("bad_request", "the body must be a JSON object")
        return body

    # ------------------------------------------------------------------------------- routes
    def _models(self) -> None:
        model = {"id": self.server.api.engine.model, "object": "model", "created": 0, "owned_by": "edgeglm"}
        self._json({"object": "list", "data": [model]})

    def _metrics(self) -> None:
        self._send(200, self.server.api.metrics.render().encode(), "text/plain; version=0.0.4; charset=utf-8")

    def _health(self) -> None:
        health = self.server.api.metrics.health().model_dump()
        now = self.server.api.now()
        if now is None:
            self._send(503, json.dumps({"status": "no_model", "health": health}).encode(), "application/json")
            return
        engine = now[0]
        self._json({"status": "ok", "model": engine.model, "version": engine.version, "health": health})

    def _complete(self, *, chat: bool) -> None:
        api, body = self.server.api, self._body()
        request = api.request(body, chat=chat)
        events: _Events = queue.Queue()
        gen = api.submit(request, events)
        give_up = time.monotonic() + api.default_timeout_s + _GRACE_S

        def wait() -> tuple[str, Any]:
            try:
                return events.get(timeout=max(0.0, give_up - time.monotonic()))
            except queue.Empty:
                gen.cancel()
                raise _Refused("timeout", "the request's deadline passed before it finished") from None

        event, value = wait()
        if event == "done" and value.error_code is not None:  # failed before any text: a real status
            raise _Refused(value.error_code, value.error_message or value.error_code)
        kind = "chat.completion" if chat else "text_completion"
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"
        head: dict[str, Any] = dict(id=rid, object=kind, created=int(time.time()), model=api.engine.model)
        if not request.stream:
            answer = (
                {"message": {"role": "assistant", "content": value.text}} if chat else {"text": value.text}
            )
            choice = {"index": 0, **answer, "finish_reason": value.finish_reason}
            self._json({**head, "choices": [choice], "usage": _usage(value)})
            return
        head["object"] = f"{kind}.chunk" if chat else kind

        def chunk(piece: str | None, finish: str | None = None, role: bool = False) -> dict[str, Any]:
            if chat:
                delta = {"role": "assistant"} if role else {} if piece is None else {"content": piece}
                return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return {**head, "choices": [{"index": 0, "text": piece or "", "finish_reason": finish}]}

        options = body.get("stream_options")
        with_usage = isinstance(options, dict) and options.get("include_usage") is True
        try:
            self._started = self.close_connection = True
            self.send_response(200)
            for header, setting in (("Content-Type", "text/event-stream; charset=utf-8"), *_STREAM_HEADERS):
                self.send_header(header, setting)
            self.end_headers()

            def send(obj: dict[str, Any] | str) -> None:
                data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
                self.wfile.write(f"data: {data}\n\n".encode())

            if chat:
                send(chunk(None, role=True))
            while event == "text":
                if value:
                    send(chunk(value))
                event, value = wait()
            result: GenerationResult = value
            if result.error_code is not None:
                send(_error(_Refused(result.error_code, "").code, result.error_message))
                return
            send(chunk(None, result.finish_reason))
            if with_usage:
                send({**head, "choices": [], "usage": _usage(result)})
            send("[DONE]")
        except OSError:  # the client hung up (broken pipe, reset, a write timed out)
            gen.cancel()
            log.info("client %s left mid-stream; cancelled its generation", self.address_string())
