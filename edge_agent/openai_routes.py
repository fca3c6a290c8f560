"""The OpenAI-compatible API as Starlette routes: bodies onto wire requests, scheduler events onto replies.

    method path                  answer
    POST   /v1/chat/completions  chat.completion, or chat.completion.chunk events when ``stream``
    POST   /v1/completions       text_completion (``prompt``), streamed the same way
    GET    /v1/models            the one model this agent serves
    GET    /v1/models/{id}       that model (the OpenAI SDK's ``models.retrieve``); another id: 404
    GET    /metrics              Prometheus text (``Metrics.render``)
    GET    /healthz              status, model, version and the heartbeat health summary

Bodies are mapped onto :class:`~edgeglm.protocol.InferRequest` and validated exactly as an MQTT
request is; ``temperature`` defaults to 0 (greedy), not OpenAI's 1; ``top_k`` and
``repetition_penalty`` are extensions. A body needs a ``Content-Length`` (else 411) of at most
``MAX_BODY_BYTES`` (else 413, answered from the header before the body is read, so an
``Expect: 100-continue`` client never sends it). Parsing, mapping and tokenizing run on a worker
thread; the event loop only moves bytes. Generations run on the scheduler MQTT serving uses; its
callbacks (on the scheduler's thread) hand events to the event loop with ``call_soon_threadsafe``
into an ``asyncio.Queue``. Streams are server-sent events (``data: {json}``, last ``data: [DONE]``;
``stream_options.include_usage`` adds a usage chunk before it); a client that hangs up mid-stream
cancels its generation. Every error is an OpenAI-shaped ``{"error": {...}}`` body with the status
of ``STATUS``; a bug in a handler is a 500 ``internal`` (logged with its traceback) and the server
carries on. The transport in front of these routes (socket, limits, token) is
:mod:`edge_agent.http_api`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from edge_agent.inference.engine import Engine
from edge_agent.inference.generation import Generation, GenerationResult, Prompt
from edge_agent.inference.scheduler import Scheduler
from edge_agent.inference.tools import ToolPlan
from edge_agent.metrics import Metrics
from edgeglm.errors import ProtocolError, RequestError
from edgeglm.protocol import InferRequest, TokenLogprob, TopLogprob, decode

__all__ = ["MAX_BODY_BYTES", "STATUS", "OpenAIRoutes", "Refused", "error_response"]

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024
_GRACE_S = 5.0  # the scheduler gives a request up at its deadline; wait this much longer for that
_KNOBS = (
    "top_p",
    "top_k",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stream",
    "response_format",
)
# Every body field this front reads; "user" and "stream_options" change no tokens.
_FIELDS = frozenset(
    {*_KNOBS, "model", "n", "temperature", "max_tokens", "max_completion_tokens", "stop", "user"}
    | {"stream_options", "logprobs"}
)
_CHAT_FIELDS = _FIELDS | {"messages", "top_logprobs", "tools", "tool_choice"}
_TEXT_FIELDS = _FIELDS | {"prompt"}
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's bound on the completions API's ``logprobs``
# OpenAI fields this front does not implement, taken at the value that means "not used" (clients
# and SDK wrappers send these defaults); any other value is refused by name, never ignored.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "logit_bias": ({},),
    "echo": (False,),
    "best_of": (1,),
    "suffix": ("",),
    "parallel_tool_calls": (False, True),
    "functions": ([],),
    "store": (False,),
    "metadata": ({},),
}
_SSE = "text/event-stream; charset=utf-8"

# error code -> (HTTP status, OpenAI error type): the one table from domain errors to HTTP
STATUS: dict[str, tuple[int, str]] = {
    "bad_request": (400, "invalid_request_error"),
    "too_long": (400, "invalid_request_error"),
    "invalid_api_key": (401, "invalid_request_error"),
    "model_not_found": (404, "invalid_request_error"),
    "not_found": (404, "invalid_request_error"),
    "method_not_allowed": (405, "invalid_request_error"),
    "length_required": (411, "invalid_request_error"),
    "too_large": (413, "invalid_request_error"),
    "busy": (429, "rate_limit_error"),
    "internal": (500, "server_error"),
    "unavailable": (503, "server_error"),
    "overloaded": (503, "server_error"),
    "timeout": (504, "server_error"),
}


class Refused(Exception):
    """A request answered with an error: ``code`` (a key of :data:`STATUS`), a message, headers."""

    def __init__(self, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = "model_not_found" if code == "unknown_model" else code
        self.message, self.headers = message, headers or {}


def _error(code: str, message: str) -> dict[str, Any]:
    kind = STATUS.get(code, STATUS["internal"])[1]
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def error_response(code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The OpenAI-shaped error; the connection closes after it (its body may be left unread)."""
    status = STATUS.get(code, STATUS["internal"])[0]
    return JSONResponse(_error(code, message), status, {**(headers or {}), "Connection": "close"})


_Prepared = tuple[dict[str, Any], InferRequest, Engine, Scheduler, Prompt]


class OpenAIRoutes:
    """The routes over what serves *now*: ``current()`` gives the engine and scheduler, or None.

    While ``current()`` is None (no model installed yet) requests get 503 ``unavailable``; an
    engine swap takes effect at the next request, and a request keeps the pair it started with.
    """

    def __init__(
        self,
        metrics: Metrics,
        current: Callable[[], tuple[Engine, Scheduler] | None],
        *,
        default_timeout_s: float = 300.0,
    ) -> None:
        self.metrics, self.current = metrics, current
        self.default_timeout_s = default_timeout_s

    def live(self) -> tuple[Engine, Scheduler]:
        """The engine and scheduler serving now, or :class:`Refused` ``unavailable``."""
        now = self.current()
        if now is None:
            raise Refused("unavailable", "no model is installed on this box yet")
        return now

    def app(self, middleware: Sequence[Middleware] = ()) -> Starlette:
        routes = [
            Route("/v1/chat/completions", self._chat, methods=["POST"]),
            Route("/v1/completions", self._text, methods=["POST"]),
            Route("/v1/models", self._models, methods=["GET"]),
            Route("/v1/models/{model:path}", self._model, methods=["GET"]),
            Route("/metrics", self._metrics, methods=["GET"]),
            Route("/healthz", self._health, methods=["GET"]),
        ]
        handlers: dict[Any, Callable[..., Any]] = {
            Refused: _refused,
            HTTPException: _http_error,
            ClientDisconnect: _gone,
            Exception: _bug,
        }
        return Starlette(routes=routes, middleware=list(middleware), exception_handlers=handlers)

    # ---------------------------------------------------------------------- the mapping
    def request(self, body: dict[str, Any], engine: Engine, *, chat: bool) -> InferRequest:
        """The wire request for an OpenAI body, or :class:`Refused`."""
        model = body.get("model")
        if model is not None and model != engine.model:
            raise Refused("model_not_found", f"this agent serves {engine.model!r}, not {model!r}")
        if body.get("n") not in (None, 1):
            raise Refused("bad_request", "field 'n': only 1 choice is supported")
        known = _CHAT_FIELDS if chat else _TEXT_FIELDS
        for name, value in body.items():
            if name not in known and not (name in _NEUTRAL and value in (None, *_NEUTRAL[name])):
                raise Refused("bad_request", f"field {name[:60]!r}: not supported by this agent")
        data: dict[str, Any] = {k: body[k] for k in _KNOBS if body.get(k) is not None}
        data |= _logprobs(body, chat=chat)
        data["temperature"] = 0.0 if body.get("temperature") is None else body["temperature"]
        limit = body.get("max_completion_tokens")
        limit = body.get("max_tokens") if limit is None else limit
        if limit is not None:
            data["max_tokens"] = limit
        if (stop := body.get("stop")) is not None:
            data["stop"] = [stop] if isinstance(stop, str) else stop
        if chat:
            messages = body.get("messages")
            data["messages"] = [_message(m) for m in messages] if isinstance(messages, list) else messages
            data |= {k: body[k] for k in ("tools", "tool_choice") if body.get(k) not in (None, [])}
        else:
            data["prompt"] = body.get("prompt")
        try:
            return decode(InferRequest, json.dumps(data, ensure_ascii=False))
        except ProtocolError as exc:
            raise Refused("bad_request", exc.why) from exc

    def _prepared(self, raw: bytes, *, chat: bool) -> _Prepared:
        """Body bytes to a tokenized prompt on the engine serving now (on a worker thread)."""
        body = _parse(raw)
        engine, scheduler = self.live()  # one pair for the whole request, even across a swap
        request = self.request(body, engine, chat=chat)
        try:
            prompt = engine.prepare(request, deadline=time.monotonic() + self.default_timeout_s)
        except RequestError as exc:
            self.metrics.rejected(exc.code)
            raise Refused(exc.code, exc.why) from exc
        return body, request, engine, scheduler, prompt

    def submit(
        self, scheduler: Scheduler, prompt: Prompt, put: Callable[[tuple[str, Any]], None]
    ) -> Generation:
        """Queue ``prompt``; its text (``("text", str)``) and result (``("done", result)``) go to ``put``."""
        arrived = time.monotonic()

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
            put(("done", result))

        self.metrics.request_started()
        try:
            return scheduler.submit(prompt, lambda text, _ids, lps=None: put(("text", (text, lps))), done)
        except RequestError as exc:  # balances request_started, as MQTT serving does
            self.metrics.request_finished(
                outcome=exc.code, latency_s=0.0, ttft_s=None, prompt_tokens=0, completion_tokens=0
            )
            raise Refused(exc.code, exc.why, {"Retry-After": "1"} if exc.code == "busy" else None) from exc

    # --------------------------------------------------------------------------- routes
    async def _models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [_model_card(self.live()[0])]})

    async def _model(self, request: Request) -> Response:
        engine, wanted = self.live()[0], request.path_params["model"]
        if wanted != engine.model:
            raise Refused("model_not_found", f"this agent serves {engine.model!r}, not {wanted!r}")
        return JSONResponse(_model_card(engine))

    async def _metrics(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def _health(self, request: Request) -> Response:
        health = self.metrics.health().model_dump()
        now = self.current()
        if now is None:
            return JSONResponse({"status": "no_model", "health": health}, 503)
        engine = now[0]
        ok = {"status": "ok", "model": engine.model, "version": engine.version}
        return JSONResponse({**ok, "health": health})

    async def _chat(self, request: Request) -> Response:
        return await self._complete(request, chat=True)

    async def _text(self, request: Request) -> Response:
        return await self._complete(request, chat=False)

    async def _complete(self, request: Request, *, chat: bool) -> Response:
        body, wire, engine, scheduler, prompt = await run_in_threadpool(
            self._prepared, await _read_body(request), chat=chat
        )
        loop, events = asyncio.get_running_loop(), asyncio.Queue[tuple[str, Any]]()

        def put(event: tuple[str, Any]) -> None:  # on the scheduler's thread: never blocks it
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop is closed: the server stopped and nobody waits
                log.debug("an event arrived after the HTTP server stopped")

        gen = self.submit(scheduler, prompt, put)
        give_up = time.monotonic() + self.default_timeout_s + _GRACE_S
        # A stream notices a hang-up when it writes; a whole answer is written only at its end,
        # so a client that leaves before then cancels its generation through this watcher.
        watcher = None if wire.stream else asyncio.ensure_future(_cancel_on_disconnect(request, gen))

        async def wait() -> tuple[str, Any]:
            try:
                async with asyncio.timeout(max(0.0, give_up - time.monotonic())):
                    return await events.get()
            except TimeoutError:
                raise Refused("timeout", "the request's deadline passed before it finished") from None

        handed_over = False
        try:
            event, value = await wait()
            if event == "done" and value.error_code is not None:  # failed before any text: a status
                raise Refused(value.error_code, value.error_message or value.error_code)
            kind = "chat.completion" if chat else "text_completion"
            rid = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"
            head: dict[str, Any] = dict(id=rid, object=kind, created=int(time.time()), model=engine.model)
            if not wire.stream:
                while event == "text":  # a non-streaming request gets no text events; be safe
                    event, value = await wait()
                text = value.text
                answer = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
                if value.tool_calls:
                    calls = [c.model_dump() for c in value.tool_calls]
                    answer = {"message": {"role": "assistant", "content": None, "tool_calls": calls}}
                choice = {"index": 0, **answer, "finish_reason": value.finish_reason}
                if value.logprobs is not None:
                    choice["logprobs"] = _logprobs_body(value.logprobs, engine.stop_tokens, chat=chat)
                return JSONResponse({**head, "choices": [choice], "usage": _usage(value)})
            head["object"] = f"{kind}.chunk" if chat else kind
            options = body.get("stream_options")
            usage = isinstance(options, dict) and options.get("include_usage") is True
            tools = None if prompt.tools is None else _ToolStream(prompt.tools)
            stream = _events(
                gen, head, (event, value), wait, chat=chat, usage=usage, stops=engine.stop_tokens, tools=tools
            )
            handed_over = True
            return StreamingResponse(stream, media_type=_SSE, headers={"Cache-Control": "no-cache"})
        finally:
            if watcher is not None:
                watcher.cancel()
            if not handed_over and not gen.done:  # refused, timed out, or the server stopping
                gen.cancel()


async def _cancel_on_disconnect(request: Request, gen: Generation) -> None:
    """Cancel ``gen`` when the client hangs up (its body read whole, ``receive`` waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    if not gen.done:
        gen.cancel()
        log.info("a client left before its answer; cancelled its generation")


async def _events(
    gen: Generation,
    head: dict[str, Any],
    first: tuple[str, Any],
    wait: Callable[[], Any],
    *,
    chat: bool,
    usage: bool,
    stops: frozenset[int] = frozenset(),
    tools: _ToolStream | None = None,
) -> AsyncIterator[str]:
    """The SSE stream of one generation; it is cancelled when the client hangs up, and so is ``gen``.
    With tools, the text goes through ``tools``, which turns a call into ``tool_calls`` deltas."""
    # The completions API's ``text_offset``: where each token's text starts, counted over the
    # tokens already reported (not over the text sent: a piece held back for a stop string goes
    # out later, while its token's logprob went out with it).
    offset = 0

    def chunk(
        piece: str | None, finish: str | None = None, role: bool = False, lps: Any = None
    ) -> dict[str, Any]:
        if chat:
            delta = {"role": "assistant"} if role else {} if piece is None else {"content": piece}
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": piece or "", "finish_reason": finish}
        if lps is not None:
            choice["logprobs"] = _logprobs_body(lps, stops, chat=chat, offset=offset)
        return {**head, "choices": [choice]}

    def delta_chunk(delta: dict[str, Any], lps: Sequence[TokenLogprob] = ()) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": None}
        if lps:
            choice["logprobs"] = _logprobs_body(lps, stops, chat=True)
        return {**head, "choices": [choice]}

    def sse(obj: dict[str, Any] | str) -> str:
        return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"

    finished = False
    held_lps: list[TokenLogprob] = []
    try:
        if chat:
            yield sse(chunk(None, role=True))
        event, value = first
        while event == "text":
            piece, lps = value
            if tools is not None:  # a piece's logprobs ride on the next delta sent (text may be held)
                held_lps.extend(lps or ())
                for delta in tools.feed(piece):
                    yield sse(delta_chunk(delta, held_lps))
                    held_lps = []
            elif piece or lps:
                yield sse(chunk(piece, lps=lps))
                offset += sum(len(e.text) for e in lps or () if e.token not in stops)
            try:
                event, value = await wait()
            except Refused as exc:  # the deadline passed mid-stream: an error event, no [DONE]
                yield sse(_error(exc.code, exc.message))
                return
        finished = True
        result: GenerationResult = value
        if result.error_code is not None:
            yield sse(_error(Refused(result.error_code, "").code, result.error_message))
            return
        if tools is not None:
            for delta in tools.finish(result):
                yield sse(delta_chunk(delta, held_lps))
                held_lps = []
        yield sse(chunk(None, result.finish_reason, lps=held_lps or None))
        if usage:
            yield sse({**head, "choices": [], "usage": _usage(result)})
        yield sse("[DONE]")
    finally:
        if not finished:
            gen.cancel()
            log.info("a client left mid-stream (or its deadline passed); cancelled its generation")


class _ToolStream:
    """A tool-using chat stream's text as OpenAI deltas: plain text as ``content``; a call (its
    name on the first line) as a ``tool_calls`` head (id, name) and then ``arguments`` pieces.

    A forced call (``required``, a named function) streams its arguments as they come; with
    ``auto`` an answer that starts with a tool's name is held to its end and sent as one call if it
    is one (else as content): only then is it known to be a call.
    """

    def __init__(self, plan: ToolPlan) -> None:
        self.plan, self.forced = plan, bool(plan.forced)
        self.mode = "open"  # open (deciding) | content | call (streaming arguments) | held (auto)
        self.held = ""
        self.id = f"call_{secrets.token_hex(12)}"

    def feed(self, piece: str) -> list[dict[str, Any]]:
        if self.mode == "content":
            return [{"content": piece}] if piece else []
        if self.mode == "call":
            return [self._arguments(piece)] if piece else []
        self.held += piece
        if self.mode == "held":
            return []
        name, newline, rest = self.held.partition("\n")
        if not newline and (self.forced or any(n.startswith(name.strip()) for n in self.plan.tools)):
            return []  # still the start of a name
        if newline and name.strip() in self.plan.tools:
            if not self.forced:
                self.mode = "held"
                return []
            self.mode, self.held = "call", ""
            return [self._head(name.strip(), ""), *([self._arguments(rest)] if rest else [])]
        self.mode, text, self.held = "content", self.held, ""
        return [{"content": text}]

    def finish(self, result: GenerationResult) -> list[dict[str, Any]]:
        if self.mode == "call":
            return []
        if result.tool_calls:
            call = result.tool_calls[0]
            self.id = call.id
            return [self._head(call.function.name, call.function.arguments)]
        return [{"content": self.held}] if self.held else []

    def _head(self, name: str, arguments: str) -> dict[str, Any]:
        function = {"name": name, "arguments": arguments}
        return {"tool_calls": [{"index": 0, "id": self.id, "type": "function", "function": function}]}

    def _arguments(self, piece: str) -> dict[str, Any]:
        return {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}


async def _read_body(request: Request) -> bytes:
    """The body, refused from its headers alone when it has no length or is too large."""
    length = request.headers.get("content-length", "")
    if not length.isdigit():
        raise Refused("length_required", "send the body with a Content-Length header")
    if int(length) > MAX_BODY_BYTES:
        raise Refused("too_large", f"the body is {length} bytes; the limit is {MAX_BODY_BYTES}")
    return await request.body()


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise Refused("bad_request", f"the body is not UTF-8 JSON: {exc}"[:300]) from exc
    if not isinstance(body, dict):
        raise Refused("bad_request", "the body must be a JSON object")
    return body


def _logprobs(body: dict[str, Any], *, chat: bool) -> dict[str, Any]:
    """The wire's ``logprobs``/``top_logprobs`` for chat's spelling (a flag and a count) or the
    completions API's (``logprobs``: how many alternatives, 0 to 5)."""
    if chat:
        return {k: body[k] for k in ("logprobs", "top_logprobs") if body.get(k) is not None}
    wanted = body.get("logprobs")
    if wanted is None:
        return {}
    if isinstance(wanted, bool) or not isinstance(wanted, int) or not 0 <= wanted <= MAX_COMPLETION_LOGPROBS:
        raise Refused(
            "bad_request",
            f"field 'logprobs': an integer 0 to {MAX_COMPLETION_LOGPROBS} (alternatives per token)",
        )
    return {"logprobs": True, "top_logprobs": wanted}


def _logprobs_body(
    entries: Sequence[TokenLogprob], stops: frozenset[int], *, chat: bool, offset: int = 0
) -> dict[str, Any]:
    """OpenAI's ``logprobs`` object for the chosen tokens (a closing stop token is not among them:
    it is no part of the text). Chat: ``content`` entries with ``bytes`` and ``top_logprobs``;
    completions: the parallel ``tokens`` / ``token_logprobs`` / ``top_logprobs`` / ``text_offset``."""
    shown = [e for e in entries if e.token not in stops]
    if chat:

        def one(e: TopLogprob) -> dict[str, Any]:
            return {"token": e.text, "logprob": e.logprob, "bytes": list(e.text.encode("utf-8"))}

        content = [{**one(e), "top_logprobs": [one(t) for t in e.top]} for e in shown]
        return {"content": content, "refusal": None}
    offsets = []
    for e in shown:
        offsets.append(offset)
        offset += len(e.text)
    return {
        "tokens": [e.text for e in shown],
        "token_logprobs": [e.logprob for e in shown],
        "top_logprobs": [{t.text: t.logprob for t in e.top} for e in shown],
        "text_offset": offsets,
    }


def _model_card(engine: Engine) -> dict[str, Any]:
    return {"id": engine.model, "object": "model", "created": 0, "owned_by": "edgeglm"}


def _message(message: Any) -> Any:
    """An OpenAI chat message as the wire has it: text parts joined, ``developer`` as ``system``, a
    null ``content`` (an assistant's tool call) as empty, ``tool_calls`` and ``tool_call_id`` kept."""
    if not isinstance(message, dict):
        return message
    content, role = message.get("content"), message.get("role")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        content = "".join(str(p.get("text", "")) for p in content)
    out = {"role": "system" if role == "developer" else role, "content": "" if content is None else content}
    return out | {k: message[k] for k in ("tool_calls", "tool_call_id") if message.get(k) is not None}


def _usage(result: GenerationResult) -> dict[str, Any]:
    prompt, completion = result.prompt_tokens, result.completion_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": result.cached_tokens},  # as OpenAI reports it
    }


# ------------------------------------------------------------------------ error handlers
async def _refused(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Refused)
    return error_response(exc.code, exc.message, exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    """What the router refuses itself: no such route (404), a method the route does not take (405)."""
    assert isinstance(exc, HTTPException)
    path = request.url.path
    if exc.status_code == 405:
        methods = (exc.headers or {}).get("Allow", "").split(", ")
        allowed = ", ".join(sorted(m for m in methods if m != "HEAD"))
        return error_response("method_not_allowed", f"{path} takes {allowed}", {"Allow": allowed})
    if exc.status_code == 404:
        return error_response("not_found", f"no route {path!r}")
    return error_response("bad_request", str(exc.detail))


async def _gone(request: Request, exc: Exception) -> Response:
    """The client left while its body was being read (or a read deadline dropped it): nobody to
    answer, nothing to log as a failure."""
    log.debug("a client left before its request body arrived")
    return Response(status_code=400)


async def _bug(request: Request, exc: Exception) -> Response:
    """A bug in a handler: 500 ``internal``; uvicorn logs the traceback and the server carries on."""
    return error_response("internal", "the agent failed on this request; see its log")
