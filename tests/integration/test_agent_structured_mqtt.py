"""Structured output and logprobs over MQTT 5 against the real mosquitto: with paho, and with the
``mosquitto_pub`` / ``mosquitto_sub`` command lines a sensor's shell script would use."""

from __future__ import annotations

import json
import subprocess
import uuid

import jsonschema
import pytest

from edge_agent.server import Server, ServeSettings
from edgeglm.keys import load_public_keys
from edgeglm.mqtt import BrokerSettings
from edgeglm.protocol import InferRequest, encode, infer_topic
from tests.integration.test_agent_mqtt import BROKER, Sensor

pytestmark = pytest.mark.integration

VERDICT = {  # nested object, enum, array, required fields
    "type": "object",
    "properties": {
        "normal": {"type": "boolean"},
        "unit": {"enum": ["bar", "amps", "celsius"]},
        "reading": {
            "type": "object",
            "properties": {"value": {"type": "integer", "minimum": 0, "maximum": 999}},
            "required": ["value"],
            "additionalProperties": False,
        },
        "actions": {"type": "array", "items": {"enum": ["none", "check", "stop"]}, "maxItems": 2},
    },
    "required": ["normal", "unit", "reading", "actions"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": VERDICT}}
PROMPT = "Sensor P-12 reads 9 bar."
VALVE_ARGS = {
    "type": "object",
    "properties": {"valve": {"type": "string", "maxLength": 12}, "reason": {"enum": ["pressure", "leak"]}},
    "required": ["valve", "reason"],
    "additionalProperties": False,
}
TOOLS = [{"type": "function", "function": {"name": "close_valve", "parameters": VALVE_ARGS}}]
SCHEMA_BODY = {"prompt": PROMPT, "max_tokens": 96, "response_format": FORMAT}
TOOL_BODY = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 96}
TOOL_BODY |= {"tools": TOOLS, "tool_choice": "required"}


def _check(reply: dict) -> None:
    """A final reply of one of the two bodies: valid JSON, or a valid call."""
    if reply.get("tool_calls"):
        assert reply["finish_reason"] == "tool_calls", reply
        (call,) = reply["tool_calls"]
        assert call["function"]["name"] == "close_valve" and call["id"].startswith("call_")
        jsonschema.validate(json.loads(call["function"]["arguments"]), VALVE_ARGS)
    else:
        assert reply["finish_reason"] == "stop", reply
        jsonschema.validate(json.loads(reply["text"]), VERDICT)


@pytest.fixture(scope="module")
def agent(tiny_bundle):
    folder, profile, public = tiny_bundle("fused-int8")
    server = Server(
        ServeSettings(
            bundle=folder,
            device_id=f"st-{uuid.uuid4().hex[:8]}",
            broker=BrokerSettings(*BROKER),
            profile=profile,
            trusted=dict(load_public_keys([public])),
        )
    ).start()
    yield server
    server.stop()


@pytest.fixture()
def sensor():
    s = Sensor()
    yield s
    s.close()


def _topic(agent: Server) -> str:
    return infer_topic(agent.settings.device_id)


def test_paho_schema_request_gets_a_valid_answer(agent, sensor):
    whole = InferRequest(prompt=PROMPT, max_tokens=96, response_format=FORMAT)
    streamed = whole.model_copy(update={"stream": True, "logprobs": True, "top_logprobs": 2})
    sensor.send(_topic(agent), encode(whole), b"whole")
    sensor.send(_topic(agent), encode(streamed), b"streamed")
    replies = sensor.wait({b"whole", b"streamed"})
    (answer,) = replies[b"whole"]
    assert answer.finish_reason == "stop", answer
    jsonschema.validate(json.loads(answer.text), VERDICT)
    parts = replies[b"streamed"]
    assert "".join(p.text for p in parts) == answer.text
    entries = [e for p in parts if p.logprobs for e in p.logprobs]
    assert [e.token for e in entries] == list(answer.tokens)  # one entry per chosen token
    assert all(len(e.top) == 2 and e.top[0].logprob >= e.top[1].logprob for e in entries)


def test_paho_tool_call_and_its_result(agent, sensor):
    sensor.send(_topic(agent), json.dumps(TOOL_BODY).encode(), b"call")
    (reply,) = sensor.wait({b"call"})[b"call"]
    _check(json.loads(encode(reply)))
    (call,) = reply.tool_calls or ()
    messages = [
        *TOOL_BODY["messages"],
        {"role": "assistant", "content": "", "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"closed": true}'},
    ]
    body = {"messages": messages, "tools": TOOLS, "max_tokens": 16}
    sensor.send(_topic(agent), json.dumps(body).encode(), b"answer")
    (answer,) = sensor.wait({b"answer"})[b"answer"]
    assert answer.finish_reason in ("stop", "length") and answer.text and not answer.tool_calls


def test_paho_bad_schema_is_an_error_reply_naming_the_field(agent, sensor):
    bad = {"type": "json_schema", "json_schema": {"name": "v", "schema": {"type": "objekt"}}}
    for key, fmt in ((b"bad", bad), (b"x", {"type": "xml"})):
        sensor.send(_topic(agent), json.dumps({"prompt": "hi", "response_format": fmt}).encode(), key)
    replies = sensor.wait({b"bad", b"x"})
    for key, field in ((b"bad", "response_format.json_schema.schema"), (b"x", "response_format.type")):
        (reply,) = replies[key]
        assert reply.error is not None and reply.error.code == "bad_request"
        assert field in reply.error.message
    sensor.send(_topic(agent), encode(InferRequest(prompt="hi", max_tokens=2)), b"after")
    assert sensor.wait({b"after"})[b"after"][-1].finish_reason in ("stop", "length")  # serving goes on


@pytest.mark.parametrize("request_body", [SCHEMA_BODY, TOOL_BODY], ids=["schema", "tool"])
def test_mosquitto_pub_and_sub(agent, request_body):
    reply_topic = f"sensors/{uuid.uuid4().hex[:10]}/reply"
    host, port = BROKER
    broker = ["-V", "mqttv5", "-h", host, "-p", str(port)]
    sub = subprocess.Popen(
        ["mosquitto_sub", *broker, "-t", reply_topic, "-C", "1", "-W", "60"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        body = json.dumps(request_body)
        pub = ["mosquitto_pub", *broker, "-q", "1", "-t", _topic(agent), "-m", body]
        pub += ["-D", "publish", "response-topic", reply_topic, "-D", "publish", "correlation-data", "q1"]
        for _ in range(50):  # the subscription may not be in place yet: publish until answered
            subprocess.run(pub, check=True, timeout=30)
            try:
                out, _ = sub.communicate(timeout=5)
                break
            except subprocess.TimeoutExpired:
                continue
        else:
            pytest.fail("no reply on the mosquitto_sub side")
    finally:
        if sub.poll() is None:
            sub.kill()
    reply = json.loads(out.strip().splitlines()[0])
    assert reply["done"], reply
    _check(reply)
