"""Finding 1 of issue 22: absurd sampling values must not fail anyone else's request.

``temperature`` 1e-320 (or ``repetition_penalty`` 1e-320) used to overflow the sampler into NaN
probabilities; the scheduler then failed every request in that batch with ``internal``. Against a
real ``edgectl agent serve`` process on the shared mosquitto and its HTTP API: a burst of
innocent requests mixed with absurd ones over MQTT, all answered together. Every innocent request
finishes normally; every absurd one is refused ``bad_request`` naming its field, over MQTT and
over HTTP (400), and the agent serves on.
"""

from __future__ import annotations

import http.client
import json
import queue
import uuid

import pytest

from edgectl.demo.procs import Proc, free_port, tool, wait_for
from edgeglm.mqtt import BrokerSettings, MqttLink
from edgeglm.protocol import InferReply, decode, infer_topic

pytestmark = [pytest.mark.integration, pytest.mark.security]

ABSURD = [
    {"temperature": 1e-320},
    {"repetition_penalty": 1e-320},
    {"temperature": 1e-320, "repetition_penalty": 1e-320, "top_p": 0.5},
    {"temperature": 1e308},
    {"repetition_penalty": 1e300, "temperature": 0.7},
]


def _post(port: int, body: dict) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_absurd_sampling_values_are_refused_and_fail_no_one_else(tiny_bundle, tmp_path):
    folder, _profile, public = tiny_bundle("fused-int8")
    device, port = f"nan-{uuid.uuid4().hex[:6]}", free_port()
    cmd = [tool("edgectl"), "-v", "agent", "serve", str(folder), "--device-id", device]
    cmd += ["--trust", str(public), "--http", f"127.0.0.1:{port}", "--queue-size", "64"]
    proc = Proc("edgectl agent serve", cmd, tmp_path / "serve.log").start()
    replies: queue.Queue[tuple[bytes | None, bytes]] = queue.Queue()
    reply_topic = f"sensors/{device}/reply"
    link = MqttLink(BrokerSettings(), f"sensor-{device}")
    try:
        wait_for(lambda: "taking inference requests" in proc.log(), 120, "the agent to subscribe")
        link.subscribe(reply_topic, 1, lambda m: replies.put((m.correlation, m.payload)))
        link.start().wait_connected(10)
        sent: dict[bytes, dict | None] = {}  # key -> the absurd knobs it carries, None if innocent
        for i in range(30):  # every sixth is absurd; they arrive together and batch together
            absurd = ABSURD[i // 6] if i % 6 == 5 else None
            knobs = absurd or {"temperature": 0.8, "top_p": 0.9, "seed": i}
            body = {"prompt": f"The pump on line {i} reads", "max_tokens": 12, **knobs}
            key = f"r{i}".encode()
            sent[key] = absurd
            link.publish(
                infer_topic(device), json.dumps(body).encode(), qos=1, correlation=key,
                response_topic=reply_topic,
            )  # fmt: skip
        final: dict[bytes, InferReply] = {}
        while len(final) < len(sent):
            corr, payload = replies.get(timeout=120)
            reply = decode(InferReply, payload)
            if corr in sent and reply.done:
                final[corr] = reply
        for key, absurd in sent.items():
            reply = final[key]
            if absurd is not None:
                assert reply.finish_reason == "error" and reply.error is not None, (key, reply)
                assert reply.error.code == "bad_request", (key, reply.error)
                assert any(k in reply.error.message for k in absurd), reply.error.message
            else:
                assert reply.finish_reason in ("stop", "length"), (key, reply.error)
                assert reply.usage is not None and reply.usage.completion_tokens > 0
        # The HTTP edge refuses the same values by name, and the agent still answers after them.
        for knobs in ABSURD:
            status, doc = _post(port, {"messages": [{"role": "user", "content": "hi"}], **knobs})
            assert status == 400, doc
            assert any(k in doc["error"]["message"] for k in knobs if k != "top_p"), doc
        status, doc = _post(port, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert status == 200 and doc["choices"][0]["finish_reason"] in ("stop", "length"), doc
        assert "Traceback" not in proc.log()
    finally:
        link.close()
        assert proc.stop(grace=30) == 0
