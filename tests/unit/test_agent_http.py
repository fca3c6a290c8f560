"""The agent's OpenAI-compatible HTTP front (uvicorn + starlette), served from a real tiny bundle
over loopback: the routes, their errors, and the front's guards (token, concurrency, idle sockets)."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import pytest

from edge_agent.http_api import HttpApi
from edge_agent.inference.engine import Engine
from edge_agent.inference.generation import Generation, GenerationResult
from edge_agent.inference.scheduler import Scheduler
from edge_agent.metrics import Metrics
from edge_agent.openai_routes import STATUS
from edgeglm.protocol import InferRequest

CHAT = [{"role": "user", "content": "The pressure sensor on line three reported"}]
PROMPT = "Check the valve in the south bay"
N = 16


class Reply(NamedTuple):
    status: int
    headers: Any
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def call(
    api: HttpApi,
    method: str,
    path: str,
    body: Any = None,
    *,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    url = urlsplit(api.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    try:
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return Reply(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


def events(reply: Reply) -> list[Any]:
    """The ``data:`` payloads of an SSE body, JSON-decoded except the final ``[DONE]``."""
    text = reply.body.decode()
    assert text.endswith("\n\n")
    out: list[Any] = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


@pytest.fixture(scope="module")
def engine(tiny_bundle) -> Engine:
    folder, profile, _ = tiny_bundle("fused-int8")
    return Engine.load(folder, profile=profile)


@pytest.fixture(scope="module")
def direct(engine: Engine) -> dict[str, GenerationResult]:
    """Greedy results of the engine's own loop, computed before any scheduler runs."""
    run = engine.generate
    return {
        "chat": run(engine.prepare(InferRequest(messages=CHAT, max_tokens=N))),
        "prompt": run(engine.prepare(InferRequest(prompt=PROMPT, max_tokens=N))),
    }


@pytest.fixture(scope="module")
def metrics(engine: Engine) -> Metrics:
    return Metrics(model=engine.model, version=engine.version)


@pytest.fixture(scope="module")
def scheduler(engine: Engine, direct, metrics: Metrics) -> Iterator[Scheduler]:
    with Scheduler(engine, metrics=metrics) as scheduler:
        yield scheduler


@pytest.fixture(scope="module")
def api(engine: Engine, scheduler: Scheduler, metrics: Metrics) -> Iterator[HttpApi]:
    api = HttpApi(engine, scheduler, metrics).start()
    yield api
    api.stop()


# ------------------------------------------------------------------------------- completions
def test_chat_completion_is_the_engines_greedy_answer(api, engine, direct):
    reply = call(
        api, "POST", "/v1/chat/completions", {"model": engine.model, "messages": CHAT, "max_tokens": N}
    )
    assert reply.status == 200, reply.body
    assert reply.headers["Content-Type"] == "application/json"
    body = reply.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == engine.model and isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": direct["chat"].text}
    assert choice["finish_reason"] == direct["chat"].finish_reason
    expected = direct["chat"]
    assert body["usage"] == {
        "prompt_tokens": expected.prompt_tokens,
        "completion_tokens": expected.completion_tokens,
        "total_tokens": expected.prompt_tokens + expected.completion_tokens,
        # the direct run had this prompt already: all but its last token come from the prefix cache
        "prompt_tokens_details": {"cached_tokens": expected.prompt_tokens - 1},
    }
    assert engine.profile.prefix_cache_mb > 0


def test_openai_spellings_map_onto_the_wire_request(api, direct):
    """Text parts, ``max_completion_tokens``, explicit nulls and ``n: 1`` as OpenAI clients send them,
    with the "not used" values of fields this agent does not implement (what SDK wrappers send)."""
    parts = [{"role": "user", "content": [{"type": "text", "text": CHAT[0]["content"]}]}]
    body = {"messages": parts, "max_completion_tokens": N, "temperature": None, "stop": None, "n": 1}
    body |= {"frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {}, "user": "u-1", "tools": None}
    body |= {"max_tokens": 99}  # max_completion_tokens wins when both are set
    reply = call(api, "POST", "/v1/chat/completions", body)
    assert reply.status == 200, reply.body
    assert reply.json()["choices"][0]["message"]["content"] == direct["chat"].text


def test_completion_is_the_engines_greedy_answer(api, direct):
    reply = call(api, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": N})
    assert reply.status == 200, reply.body
    body = reply.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == direct["prompt"].text
    assert body["choices"][0]["finish_reason"] == direct["prompt"].finish_reason
    assert body["usage"]["completion_tokens"] == direct["prompt"].completion_tokens


def test_chat_stream_deltas_add_up_to_the_reply(api, direct):
    body = {"messages": CHAT, "max_tokens": N, "stream": True, "stream_options": {"include_usage": True}}
    reply = call(api, "POST", "/v1/chat/completions", body)
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/event-stream")
    *chunks, usage, done = events(reply)
    assert done == "[DONE]"
    assert all(c["object"] == "chat.completion.chunk" for c in [*chunks, usage])
    assert len({c["id"] for c in [*chunks, usage]}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "finish_reason": direct["chat"].finish_reason,
    }
    middle = [c["choices"][0] for c in chunks[1:-1]]
    assert all(c["finish_reason"] is None and set(c["delta"]) == {"content"} for c in middle)
    assert "".join(c["delta"]["content"] for c in middle) == direct["chat"].text
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == direct["chat"].completion_tokens


def test_completion_stream_texts_add_up_to_the_reply(api, direct):
    reply = call(api, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": N, "stream": True})
    assert reply.status == 200
    *chunks, done = events(reply)
    assert done == "[DONE]"
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == direct["prompt"].text
    assert chunks[-1]["choices"][0]["finish_reason"] == direct["prompt"].finish_reason


def test_replies_keep_the_connection_open_for_the_next_request(api, direct):
    url = urlsplit(api.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        body = json.dumps({"prompt": PROMPT, "max_tokens": N}).encode()
        conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        first = conn.getresponse()
        assert json.loads(first.read())["choices"][0]["text"] == direct["prompt"].text
        sock = conn.sock
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200
        assert conn.sock is sock
    finally:
        conn.close()


# ------------------------------------------------------------------------------ other routes
def test_models_lists_the_served_model(api, engine):
    reply = call(api, "GET", "/v1/models")
    assert reply.status == 200
    assert reply.json() == {
        "object": "list",
        "data": [{"id": engine.model, "object": "model", "created": 0, "owned_by": "edgeglm"}],
    }


def test_models_retrieve_names_the_served_model_and_no_other(api, engine):
    """``GET /v1/models/{id}``: the OpenAI SDK's ``models.retrieve``."""
    reply = call(api, "GET", f"/v1/models/{engine.model}")
    assert reply.status == 200
    assert reply.json() == {"id": engine.model, "object": "model", "created": 0, "owned_by": "edgeglm"}
    other = call(api, "GET", "/v1/models/gpt-4o")
    assert other.status == 404
    assert other.json()["error"]["code"] == "model_not_found"


def test_healthz_reports_model_and_health(api, engine):
    reply = call(api, "GET", "/healthz?verbose=1")
    assert reply.status == 200
    body = reply.json()
    assert (body["status"], body["model"], body["version"]) == ("ok", engine.model, engine.version)
    assert {"latency_p50_ms", "queue_depth", "requests"} <= set(body["health"])


def test_metrics_count_the_requests_served(api):
    assert call(api, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 2}).status == 200
    reply = call(api, "GET", "/metrics")
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    lines = reply.body.decode().splitlines()
    served = [line for line in lines if line.startswith("edgeglm_agent_requests_total{")]
    assert served and any('outcome="stop"' in line or 'outcome="length"' in line for line in served)
    assert "edgeglm_agent_requests_in_flight 0" in lines


# ------------------------------------------------------------------------------------ errors
ERRORS = [
    # (method, path, body bytes, status, error code)
    ("POST", "/v1/chat/completions", b'{"model": "gpt-4o", "messages": []}', 404, "model_not_found"),
    ("POST", "/v1/chat/completions", b'{"messages": [', 400, "bad_request"),
    ("POST", "/v1/chat/completions", b'{"prompt": "\xff\xfe"}', 400, "bad_request"),
    ("POST", "/v1/chat/completions", b"[1, 2]", 400, "bad_request"),
    ("POST", "/v1/chat/completions", b'{"messages": "hi"}', 400, "bad_request"),
    (
        "POST",
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "hi"}], "n": 2}',
        400,
        "bad_request",
    ),
    ("POST", "/v1/completions", b'{"prompt": "hi", "temperature": "hot"}', 400, "bad_request"),
    ("POST", "/v1/completions", b'{"prompt": "hi", "frequency_penalty": 2.5}', 400, "frequency_penalty"),
    ("POST", "/v1/completions", b'{"prompt": "hi", "presence_penalty": -3}', 400, "presence_penalty"),
    ("POST", "/v1/completions", b'{"prompt": "hi", "logprobs": 6}', 400, "logprobs"),
    ("POST", "/v1/completions", b'{"prompt": "hi", "logit_bias": {"7": 5}}', 400, "logit_bias"),
    ("POST", "/v1/completions", b'{"prompt": "hi", "mirostat": 2}', 400, "mirostat"),
    (
        "POST",
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}',
        400,
        "tools.0.function",
    ),
    (
        "POST",
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "xml"}}',
        400,
        "response_format.type",
    ),
    (
        "POST",
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema",'
        b' "json_schema": {"name": "x", "schema": {"type": "objekt"}}}}',
        400,
        "response_format.json_schema.schema",
    ),
    (
        "POST",
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}',
        400,
        "top_logprobs",
    ),
    ("POST", "/v1/completions", b'{"prompt": "hi", "max_tokens": 0}', 400, "bad_request"),
    ("POST", "/v1/completions", b'{"messages": [{"role": "user", "content": "hi"}]}', 400, "bad_request"),
    ("GET", "/v1/nothing", None, 404, "not_found"),
    ("GET", "/v1/chat/completions", None, 405, "method_not_allowed"),
    ("PUT", "/v1/models", b"{}", 405, "method_not_allowed"),
]


@pytest.mark.parametrize(("method", "path", "raw", "status", "code"), ERRORS)
def test_bad_requests_get_openai_shaped_errors(api, method, path, raw, status, code):
    reply = call(api, method, path, raw=raw)
    assert reply.status == status, reply.body
    error = reply.json()["error"]
    if code not in STATUS:  # a field refused by name
        code, named = "bad_request", code
        assert repr(named) in error["message"], error
    assert error["code"] == code and error["message"] and error["type"] == "invalid_request_error"
    assert call(api, "GET", "/healthz").status == 200  # and the server carries on


def test_wrong_method_names_the_allowed_one(api):
    assert call(api, "GET", "/v1/completions").headers["Allow"] == "POST"


def test_an_oversized_body_is_refused_before_it_is_read(api):
    url = urlsplit(api.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Content-Length", str(1024 * 1024 + 1))
    conn.endheaders()  # no body follows: the server must answer from the headers alone
    resp = conn.getresponse()
    assert resp.status == 413
    assert json.loads(resp.read())["error"]["code"] == "too_large"
    conn.close()


def test_an_oversized_body_is_refused_instead_of_100_continue(api):
    url = urlsplit(api.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Length", str(2 * 1024 * 1024))
    conn.putheader("Expect", "100-continue")
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413
    assert json.loads(resp.read())["error"]["code"] == "too_large"
    conn.close()


def test_a_prompt_longer_than_the_context_is_400(api, engine):
    prompt = " ".join(f"w{i}" for i in range(2000))
    assert len(engine.codec.encode(prompt)) > engine.limits.max_context
    reply = call(api, "POST", "/v1/completions", {"prompt": prompt, "max_tokens": 4})
    assert reply.status == 400
    assert reply.json()["error"]["code"] == "too_long"


def test_a_full_queue_is_429_with_retry_after(engine):
    metrics = Metrics()
    with Scheduler(engine, queue_size=0) as full:
        api = HttpApi(engine, full, metrics).start()
        try:
            reply = call(api, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
        finally:
            api.stop()
    assert reply.status == 429 and reply.headers["Retry-After"] == "1"
    assert reply.json()["error"] | {"message": ""} == {
        "message": "",
        "type": "rate_limit_error",
        "param": None,
        "code": "busy",
    }
    text = metrics.render()
    assert 'edgeglm_agent_requests_total{outcome="busy"} 1' in text
    assert "edgeglm_agent_requests_in_flight 0" in text


def test_a_request_past_its_deadline_is_504(engine, scheduler, metrics):
    api = HttpApi(engine, scheduler, metrics, default_timeout_s=-1.0).start()
    try:
        reply = call(api, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
    finally:
        api.stop()
    assert reply.status == 504
    assert reply.json()["error"]["code"] == "timeout"


class BrokenMetrics(Metrics):
    def render(self) -> str:
        raise RuntimeError("a bug")


def test_a_handler_bug_is_500_and_the_server_keeps_serving(engine, scheduler):
    api = HttpApi(engine, scheduler, BrokenMetrics()).start()
    try:
        reply = call(api, "GET", "/metrics")
        assert reply.status == 500
        assert reply.json()["error"]["code"] == "internal"
        assert call(api, "GET", "/v1/models").status == 200
    finally:
        api.stop()


class DrippingScheduler:
    """A fake scheduler: streams a piece every few milliseconds until the generation is cancelled."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.cancelled = threading.Event()

    def submit(self, prompt, on_text=None, on_done=None) -> Generation:
        gen = self.engine.start(prompt, on_text, on_done)

        def drip() -> None:
            for _ in range(2000):  # ten seconds at most
                time.sleep(0.005)
                if gen.cancelled:
                    self.cancelled.set()
                    gen.finish("cancelled")
                    return
                on_text("tick ", [1])
            gen.finish("length")

        threading.Thread(target=drip, name="test-drip", daemon=True).start()
        return gen


def test_a_client_that_hangs_up_mid_stream_cancels_its_generation(engine):
    fake = DrippingScheduler(engine)
    metrics = Metrics()
    api = HttpApi(engine, fake, metrics).start()  # type: ignore[arg-type]
    try:
        url = urlsplit(api.url)
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        body = json.dumps({"prompt": PROMPT, "stream": True}).encode()
        conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.readline().startswith(b"data: ")
        conn.close()
        resp.close()
        assert fake.cancelled.wait(10)
    finally:
        api.stop()


def test_a_client_that_hangs_up_before_a_whole_answer_cancels_its_generation(engine):
    fake = DrippingScheduler(engine)
    api = HttpApi(engine, fake, Metrics()).start()  # type: ignore[arg-type]
    try:
        url = urlsplit(api.url)
        body = json.dumps({"prompt": PROMPT, "max_tokens": 4000}).encode()
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        with socket.create_connection((url.hostname, url.port), timeout=30) as client:
            client.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            time.sleep(0.3)  # the generation runs
        assert fake.cancelled.wait(10)
    finally:
        api.stop()


# ---------------------------------------------------------------------------- the front's guards
TOKEN = "edge-test-token-0123456789abcdef"


def test_a_token_guards_every_route_but_healthz(engine, scheduler, metrics):
    api = HttpApi(engine, scheduler, metrics, token=TOKEN).start()
    good = {"Authorization": f"Bearer {TOKEN}"}
    try:
        for path in ("/v1/models", "/metrics"):
            for headers in ({}, {"Authorization": f"Bearer {TOKEN[:-1]}X"}, {"Authorization": TOKEN}):
                reply = call(api, "GET", path, headers=headers)
                assert reply.status == 401, (path, headers)
                assert reply.headers["WWW-Authenticate"] == "Bearer"
                assert reply.json()["error"]["code"] == "invalid_api_key"
                assert TOKEN not in reply.body.decode()
            assert call(api, "GET", path, headers=good).status == 200
        # the token is checked before the body is read: a bad body without it is 401, not 400
        assert call(api, "POST", "/v1/completions", raw=b"{", headers={}).status == 401
        reply = call(api, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 2}, headers=good)
        assert reply.status == 200, reply.body
        assert call(api, "GET", "/healthz").status == 200  # liveness probes need no token
    finally:
        api.stop()


def test_requests_past_the_concurrency_limit_get_503_at_once(engine):
    fake = DrippingScheduler(engine)
    api = HttpApi(engine, fake, Metrics(), max_concurrency=1).start()  # type: ignore[arg-type]
    try:
        url = urlsplit(api.url)
        held = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        body = json.dumps({"prompt": PROMPT, "stream": True}).encode()
        held.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        resp = held.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data: ")
        reply = call(api, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
        assert reply.status == 503 and reply.headers["Retry-After"] == "1"
        assert reply.json()["error"]["code"] == "overloaded"
        assert call(api, "GET", "/healthz").status == 200  # not counted against the limit
        held.close()
        resp.close()
        assert fake.cancelled.wait(10)
        assert call(api, "GET", "/v1/models").status == 200  # the slot is free again
    finally:
        api.stop()


def test_a_connection_that_sends_nothing_is_closed_after_the_keep_alive_time(engine, scheduler, metrics):
    api = HttpApi(engine, scheduler, metrics, keep_alive_s=1).start()
    try:
        url = urlsplit(api.url)
        with socket.create_connection((url.hostname, url.port), timeout=30) as idle:
            assert idle.recv(1) == b""  # the server closed it; a timeout here raises instead
    finally:
        api.stop()


@pytest.mark.parametrize("stalls", ["head", "body"])
def test_a_request_trickled_byte_by_byte_is_cut_off_at_the_read_deadline(
    engine, scheduler, metrics, stalls, caplog
):
    """A slow sender (slowloris) holds its connection ``request_read_s``, not as long as it likes;
    the keep-alive timer alone never fires while bytes keep coming."""
    api = HttpApi(engine, scheduler, metrics, keep_alive_s=1, request_read_s=2).start()
    try:
        url = urlsplit(api.url)
        body = json.dumps({"messages": CHAT, "max_tokens": 2}).encode()
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        head += b"Content-Length: %d\r\n\r\n" % len(body)
        trickle = head if stalls == "head" else body
        with socket.create_connection((url.hostname, url.port), timeout=30) as slow:
            if stalls == "body":
                slow.sendall(head)
            started = time.monotonic()
            closed = False
            for byte in trickle[:-1]:
                try:
                    slow.sendall(bytes([byte]))
                except OSError:
                    closed = True
                    break
                slow.settimeout(0.3)
                try:
                    if slow.recv(1024) == b"":
                        closed = True
                        break
                except TimeoutError:
                    pass
                if time.monotonic() - started > 20:
                    break
            assert closed, "the server kept reading a trickled request"
        assert call(api, "GET", "/v1/models").status == 200  # and serves on
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors == [], "a client that left is not an application error"
    finally:
        api.stop()


def test_a_pipelined_request_gets_the_read_deadline_too(engine, scheduler, metrics):
    """A whole request followed, in the same packet, by the head of one whose body never comes."""
    api = HttpApi(engine, scheduler, metrics, keep_alive_s=1, request_read_s=2).start()
    try:
        url = urlsplit(api.url)
        first = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        stuck = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        stuck += b"Content-Length: 1000\r\n\r\n{"
        with socket.create_connection((url.hostname, url.port), timeout=15) as client:
            client.sendall(first + stuck)
            started, got = time.monotonic(), b""
            while chunk := client.recv(65536):  # a timeout here (15 s) fails the test
                got += chunk
            assert got.startswith(b"HTTP/1.1 200"), got[:200]
            assert time.monotonic() - started < 10
        assert call(api, "GET", "/v1/models").status == 200
    finally:
        api.stop()


class FloodingScheduler(DrippingScheduler):
    """Streams 16 KiB pieces as fast as it can until the generation is cancelled (30 s at most)."""

    def submit(self, prompt, on_text=None, on_done=None) -> Generation:
        gen = self.engine.start(prompt, on_text, on_done)

        def flood() -> None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if gen.cancelled:
                    self.cancelled.set()
                    gen.finish("cancelled")
                    return
                on_text("x" * 16384, [1])
                time.sleep(0.001)
            gen.finish("length")

        threading.Thread(target=flood, name="test-flood", daemon=True).start()
        return gen


def test_a_stream_whose_client_stops_reading_is_cut_off_and_cancelled(engine):
    fake = FloodingScheduler(engine)
    api = HttpApi(engine, fake, Metrics(), request_read_s=2).start()  # type: ignore[arg-type]
    try:
        url = urlsplit(api.url)
        body = json.dumps({"prompt": PROMPT, "stream": True}).encode()
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect((url.hostname, url.port))
        try:
            client.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            # never read: the server's buffers fill, then it gives the client 2 s to drain them
            assert fake.cancelled.wait(25), "the stream kept its slot while its client read nothing"
        finally:
            client.close()
    finally:
        api.stop()


def test_a_null_max_completion_tokens_leaves_max_tokens_in_charge(api):
    body = {"messages": CHAT, "max_completion_tokens": None, "max_tokens": 2}
    reply = call(api, "POST", "/v1/chat/completions", body)
    assert reply.status == 200, reply.body
    assert reply.json()["usage"]["completion_tokens"] <= 2
