"""``edgectl agent serve`` and ``edge-agent run`` serve through the one serving stack.

Both entry points run as real processes on the same signed tiny bundle (``agent serve`` given it
directly, the daemon as its ``bootstrap_bundle``) against a private mosquitto. One helper asks
each the same things: an MQTT inference request, and every route of the OpenAI-compatible HTTP
API, good and bad, with the bearer token both are configured with (``--http-token-file``,
``serving.http_token_file``) and once without it. The answers, less what varies by nature (ids,
timestamps, timings), must be equal; both logs show ``edge_agent.serving_stack`` subscribing to
the infer topic; both stop cleanly (exit 0) on SIGTERM.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edgectl.demo.agent_box import AgentBox
from edgectl.demo.fleet import Sensor
from edgectl.demo.procs import Proc, free_port, healthy, tool, wait_for
from edgeglm.protocol import infer_topic

pytestmark = pytest.mark.integration

EDGECTL = tool("edgectl")
PROMPT = "The sensor reads"
TOKEN = "serving-stack-token-0123456789"


@dataclass
class Served:
    device_id: str
    http_port: int
    log: Callable[[], str]


def _token_file(root: Path) -> Path:
    path = root / "http.token"
    path.write_text(TOKEN + "\n")
    return path


@contextlib.contextmanager
def agent_serve(bundle: Path, public: Path, broker: int, root: Path) -> Iterator[Served]:
    """``edgectl -v agent serve BUNDLE`` with MQTT and HTTP; stopped with SIGTERM."""
    device, port, log_path = f"serve-{uuid.uuid4().hex[:6]}", free_port(), root / "serve.log"
    cmd = [EDGECTL, "-v", "agent", "serve", str(bundle), "--device-id", device, "--trust", str(public)]
    cmd += ["--broker", f"127.0.0.1:{broker}", "--http", f"127.0.0.1:{port}", "--queue-size", "8"]
    cmd += ["--http-token-file", str(_token_file(root))]
    proc = Proc("edgectl agent serve", cmd, log_path).start()
    try:
        yield Served(device, port, proc.log)
    finally:
        assert proc.stop(grace=30) == 0


@contextlib.contextmanager
def edge_agent_run(bundle: Path, public: Path, broker: int, root: Path) -> Iterator[Served]:
    """``edge-agent run`` with ``bootstrap_bundle`` and ``serving.http_listen``; stopped with SIGTERM."""
    device, port = f"run-{uuid.uuid4().hex[:6]}", free_port()
    (root / "box").mkdir()
    serving = {"http_listen": f"127.0.0.1:{port}", "queue_size": 8, "http_token_file": str(_token_file(root))}
    agent = AgentBox(root / "box", device, broker, public, bootstrap_bundle=str(bundle), serving=serving)
    agent.start()
    try:
        agent.wait_log(r"edge agent \S+ up", 120)
        yield Served(device, port, agent.log)
    finally:
        assert agent.stop() == 0


def call(
    port: int, method: str, path: str, body: bytes | None = None, token: str | None = TOKEN
) -> tuple[int, Any, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    auth = {} if token is None else {"Authorization": f"Bearer {token}"}
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **auth})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def _completion(status: int, body: bytes) -> dict[str, Any]:
    """A completion's answer less its id and timestamp; ``usage`` less the prefix cache's share."""
    doc = json.loads(body)
    usage = {k: v for k, v in doc["usage"].items() if k != "prompt_tokens_details"}
    head = {"status": status, "id": doc["id"].split("-")[0], "object": doc["object"], "model": doc["model"]}
    return {**head, "choices": doc["choices"], "usage": usage}


def observe(served: Served, broker: int) -> dict[str, Any]:
    """What a sensor and an HTTP client see, with what varies by nature taken out."""
    port, seen = served.http_port, {}
    sensor = Sensor(broker)
    try:
        reply = sensor.ask(served.device_id, PROMPT, max_tokens=4, timeout=120, stop=())
    finally:
        sensor.close()
    assert reply.usage is not None and reply.timings is not None
    seen["mqtt"] = {
        "fields": sorted(reply.model_dump(exclude_none=True)),
        "reply": reply.model_dump(include={"text", "tokens", "done", "finish_reason", "error"}),
        "usage": reply.usage.model_dump(exclude={"cached_tokens"}),
        "timings": sorted(reply.timings.model_dump()),
    }
    status, headers, body = call(port, "GET", "/healthz")
    health = json.loads(body)
    seen["healthz"] = (status, {**health, "health": sorted(health["health"])})
    status, headers, body = call(port, "GET", "/v1/models")
    seen["models"] = (status, headers["Content-Type"], json.loads(body))
    completion = json.dumps({"prompt": PROMPT, "max_tokens": 4}).encode()
    seen["completions"] = _completion(*call(port, "POST", "/v1/completions", completion)[::2])
    chat = json.dumps({"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4}).encode()
    seen["chat"] = _completion(*call(port, "POST", "/v1/chat/completions", chat)[::2])
    for name, method, path, raw in (
        ("no_route", "GET", "/nope", None),
        ("wrong_method", "GET", "/v1/completions", None),
        ("bad_body", "POST", "/v1/completions", b"{"),
        ("wrong_model", "POST", "/v1/completions", json.dumps({"model": "other", "prompt": "x"}).encode()),
    ):
        status, headers, body = call(port, method, path, raw)
        error = json.loads(body)["error"]
        seen[name] = (status, headers.get("Allow"), error["type"], error["code"])
    status, headers, body = call(port, "GET", "/v1/models", token=None)
    seen["no_token"] = (status, headers["WWW-Authenticate"], json.loads(body)["error"]["code"])
    status, headers, body = call(port, "GET", "/metrics")
    text = body.decode()
    assert re.search(r'^edgeglm_agent_requests_total\{outcome="length"\} [1-9]', text, re.M)
    seen["metrics"] = (status, headers["Content-Type"], sorted(re.findall(r"^# TYPE (\S+)", text, re.M)))
    return seen


def test_agent_serve_and_edge_agent_run_serve_through_the_one_stack(
    tiny_bundle: Any, private_broker: int, tmp_path: Path
) -> None:
    folder, _profile, public = tiny_bundle("fused-int8")
    seen: dict[str, dict[str, Any]] = {}
    for name, start in (("agent serve", agent_serve), ("edge-agent run", edge_agent_run)):
        root = tmp_path / name.replace(" ", "-")
        root.mkdir()
        with start(folder, public, private_broker, root) as served:
            wait_for(lambda s=served: healthy(s.http_port), 120, f"{name}: its HTTP API")
            seen[name] = observe(served, private_broker)
            topic = infer_topic(served.device_id)
            assert re.search(
                rf"edge_agent\.serving_stack.*taking inference requests on {topic}", served.log()
            )

    serve, run = seen["agent serve"], seen["edge-agent run"]
    assert serve == run
    mqtt = serve["mqtt"]["reply"]
    assert mqtt["error"] is None and mqtt["done"] and mqtt["finish_reason"] == "length"
    assert len(mqtt["tokens"]) == 4 and serve["mqtt"]["usage"]["completion_tokens"] == 4
    assert serve["healthz"][0] == 200 and serve["healthz"][1]["model"] == "tiny-edge"
    assert serve["models"][2]["data"][0]["id"] == "tiny-edge"
    assert serve["completions"]["choices"][0]["text"] == mqtt["text"]  # the same greedy engine
    assert (
        serve["completions"]["object"] == "text_completion" and serve["chat"]["object"] == "chat.completion"
    )
    assert serve["no_route"] == (404, None, "invalid_request_error", "not_found")
    assert serve["wrong_method"] == (405, "POST", "invalid_request_error", "method_not_allowed")
    assert serve["bad_body"][0] == 400 and serve["wrong_model"][0] == 404
    assert serve["no_token"] == (401, "Bearer", "invalid_api_key")
    assert "edgeglm_agent_requests_total" in serve["metrics"][2]
