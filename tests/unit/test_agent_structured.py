"""Structured output, logprobs and penalties through the official ``openai`` SDK against a real agent
(uvicorn + starlette over loopback, a real tiny trained bundle), and the OpenAI parameter audit:
every request parameter of the installed SDK is honoured or refused by name, never ignored."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import openai
import pytest
from openai.types import completion_create_params as text_params
from openai.types.chat import completion_create_params as chat_params

from edge_agent.http_api import HttpApi
from edge_agent.inference.engine import Engine
from edge_agent.inference.generation import GenerationResult
from edge_agent.inference.sampling import Sampler, SamplingParams
from edge_agent.inference.scheduler import Scheduler
from edge_agent.metrics import Metrics
from edgeglm.errors import RequestError
from edgeglm.protocol import InferRequest
from edgeglm.protocol.inference import ResponseFormat
from export.tiny_glm import read_corpus, split_corpus

DOC = Path(__file__).resolve().parents[2] / "docs" / "openai-api.md"

READING = {  # nested objects, an enum, an optional field
    "type": "object",
    "properties": {
        "sensor": {
            "type": "object",
            "properties": {
                "id": {"type": "string", "maxLength": 12},
                "line": {"type": "integer", "minimum": 1, "maximum": 9},
            },
            "required": ["id", "line"],
            "additionalProperties": False,
        },
        "status": {"enum": ["normal", "high", "low"]},
        "bar": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["sensor", "status"],
    "additionalProperties": False,
}
ACTION = {  # enums, a boolean, required fields
    "type": "object",
    "properties": {
        "action": {"enum": ["open_valve", "close_valve", "open_ticket", "none"]},
        "urgent": {"type": "boolean"},
        "reason": {"type": "string", "maxLength": 40},
    },
    "required": ["action", "urgent", "reason"],
    "additionalProperties": False,
}
CHECKS = {  # an array of objects, bounded
    "type": "object",
    "properties": {
        "checks": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"part": {"type": "string", "maxLength": 16}, "ok": {"type": "boolean"}},
                "required": ["part", "ok"],
                "additionalProperties": False,
            },
            "minItems": 1,
            "maxItems": 3,
        },
        "next_check_days": {"type": "integer", "minimum": 1, "maximum": 30},
    },
    "required": ["checks", "next_check_days"],
    "additionalProperties": False,
}
SCHEMAS = {"reading": READING, "action": ACTION, "checks": CHECKS}
PROMPTS = [
    "The pressure sensor on line three reported",
    "Check the valve in the south bay",
    "Maintenance log 12. Monday, early morning.",
    "The pump on line B is loud again. What should we do?",
    "Boiler 5 reads 9 bar.",
    "Write a short note about the mixer.",
    "Is the filter clean?",
]
N = 24


@pytest.fixture(scope="module")
def engine(tiny_bundle) -> Engine:
    folder, profile, _ = tiny_bundle("fused-int8")
    return Engine.load(folder, profile=profile)


@pytest.fixture(scope="module")
def api(engine: Engine) -> Iterator[HttpApi]:
    metrics = Metrics(model=engine.model, version=engine.version)
    with Scheduler(engine, metrics=metrics) as scheduler:
        api = HttpApi(engine, scheduler, metrics).start()
        yield api
        api.stop()


@pytest.fixture(scope="module")
def client(api: HttpApi) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api.url}/v1", api_key="unused", max_retries=0, timeout=60)


def _chat(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def _parses(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


# --------------------------------------------------------------------------- structured output
def test_the_free_model_answers_json_where_it_was_taught_to(client, engine):
    """The tiny models' training text has a JSON slice (``export.tiny_glm.structured_slice``):
    asked "in JSON" about readings it never saw, the unconstrained model writes JSON objects by
    itself, so the constraint below is tested where the model cooperates as well as where it
    writes prose."""
    _, held = split_corpus(read_corpus())
    readings = re.findall(r"^Sensor report \d+\. (Sensor .+? reads [^.]+\.)", held, re.MULTILINE)
    assert len(readings) >= 10
    answers = [
        client.chat.completions.create(
            model=engine.model, messages=_chat(f"{r} Answer in JSON."), max_tokens=48
        )
        .choices[0]
        .message.content
        for r in readings
    ]
    assert sum(_parses(a) for a in answers) >= 0.7 * len(readings), answers  # measured 14 of 14


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_answers_validate_where_the_free_model_writes_prose(client, engine, name):
    schema, free_prose = SCHEMAS[name], 0
    for prompt in PROMPTS:
        fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
        reply = client.chat.completions.create(
            model=engine.model, messages=_chat(prompt), max_tokens=256, response_format=fmt
        )
        (choice,) = reply.choices
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), schema)  # every one, not most
        free = client.chat.completions.create(model=engine.model, messages=_chat(prompt), max_tokens=64)
        free_prose += not _parses(free.choices[0].message.content)
    assert free_prose == len(PROMPTS)  # unconstrained, this model never answers JSON by itself


def test_a_schema_asked_for_again_is_not_checked_again(engine):
    """Checking a grammar compiles it, on the MQTT thread for MQTT requests: a fleet sends the
    same few schemas, so a checked one is kept (by its source) and a refused one is not."""
    fmt = ResponseFormat.model_validate(
        {"type": "json_schema", "json_schema": {"name": "checks", "schema": CHECKS}}
    )
    first = engine.constraints.compile(fmt)
    assert first is not None and engine.constraints.compile(fmt) is first
    bad = ResponseFormat.model_validate({"type": "lark", "lark": "start: missing_rule"})
    for _ in range(2):
        with pytest.raises(RequestError, match=r"response_format\.lark"):
            engine.constraints.compile(bad)


def test_json_object_and_the_regex_extension(client, engine):
    reply = client.completions.create(
        model=engine.model,
        prompt=PROMPTS[0],
        max_tokens=32,
        extra_body={"response_format": {"type": "regex", "regex": "(yes|no): [a-z ]{3,20}\\."}},
    )
    assert re.fullmatch(r"(yes|no): [a-z ]{3,20}\.", reply.choices[0].text), reply.choices[0].text
    capped = {"type": "json_schema", "json_schema": {"name": "r", "schema": READING}}
    reply = client.chat.completions.create(
        model=engine.model, messages=_chat(PROMPTS[1]), max_tokens=6, response_format=capped
    )
    assert reply.choices[0].finish_reason == "length"  # max_tokens reached inside the JSON
    assert not _parses(reply.choices[0].message.content)
    reply = client.chat.completions.create(
        model=engine.model, messages=_chat(PROMPTS[1]), max_tokens=8, response_format={"type": "json_object"}
    )
    assert reply.choices[0].message.content.startswith("{")


def _nested(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


@pytest.mark.parametrize(
    ("fmt", "field"),
    [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}, "schema"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema"),
        ({"type": "regex", "regex": "a(b"}, "response_format.regex"),
        ({"type": "lark", "lark": "start: nothing_here"}, "response_format.lark"),
        ({"type": "yaml"}, "response_format.type"),
        # deeper than the recursion limit of the threads that compile it: refused before any
        # recursive code sees it (it was a 500, and no reply at all over MQTT)
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": _nested(400)}}, "schema"),
    ],
)
def test_a_bad_format_is_a_400_naming_the_field(client, engine, fmt, field):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=engine.model, messages=_chat("hi"), max_tokens=4, extra_body={"response_format": fmt}
        )
    assert field in caught.value.message and caught.value.status_code == 400
    assert client.models.list().data  # and the agent serves on


def test_constrained_and_free_rows_share_a_batch(engine):
    """A constrained and an unconstrained request admitted into the same decode batch: the free one
    gives exactly its solo greedy tokens, the constrained one a valid answer."""
    free = InferRequest(messages=_chat(PROMPTS[0]), max_tokens=N)
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": ACTION}}
    bound = InferRequest(messages=_chat(PROMPTS[0]), max_tokens=128, response_format=fmt)
    solo = engine.generate(engine.prepare(free))

    class Batches:
        sizes: list[int] = []  # noqa: RUF012

        def observe_batch(self, size: int) -> None:
            self.sizes.append(size)

        def set_queue_depth(self, depth: int) -> None:
            pass

    metrics, finished, done = Batches(), [], threading.Event()

    def on_done(result: GenerationResult) -> None:
        finished.append(result)
        if len(finished) == 2:
            done.set()

    with Scheduler(engine, batch_wait_ms=300, metrics=metrics) as scheduler:
        a = scheduler.submit(engine.prepare(bound), on_done=on_done)
        b = scheduler.submit(engine.prepare(free), on_done=on_done)
        assert done.wait(60)
    assert a.result is not None and b.result is not None
    assert max(metrics.sizes) == 2  # they did run side by side
    assert b.result.tokens == solo.tokens and b.result.text == solo.text
    assert a.result.finish_reason == "stop"
    jsonschema.validate(json.loads(a.result.text), ACTION)


# ------------------------------------------------------------------------------------ logprobs
def test_chat_logprobs_are_the_chosen_tokens(client, engine):
    reply = client.chat.completions.create(
        model=engine.model, messages=_chat(PROMPTS[2]), max_tokens=N, logprobs=True, top_logprobs=3
    )
    choice = reply.choices[0]
    content = choice.logprobs.content
    assert "".join(t.token for t in content) == choice.message.content
    assert len(content) == reply.usage.completion_tokens - (choice.finish_reason == "stop")
    for t in content:
        assert bytes(t.bytes) == t.token.encode() and t.logprob <= 0
        assert len(t.top_logprobs) == 3
        ranked = [r.logprob for r in t.top_logprobs]
        assert ranked == sorted(ranked, reverse=True)
        # greedy: the chosen token is the model's most likely one, with the same number
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == t.logprob
    total = sum(np.exp(r.logprob) for r in content[0].top_logprobs)
    assert 0 < total <= 1 + 1e-9
    streamed = client.chat.completions.create(
        model=engine.model, messages=_chat(PROMPTS[2]), max_tokens=N, logprobs=True, top_logprobs=3,
        stream=True,
    )  # fmt: skip
    chunks = [c.choices[0].logprobs for c in streamed if c.choices and c.choices[0].logprobs]
    parts = [t for lp in chunks for t in lp.content]
    assert [(t.token, t.logprob) for t in parts] == [(t.token, t.logprob) for t in content]


def test_constrained_logprobs_report_the_model_not_the_mask(client, engine):
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": ACTION}}
    reply = client.chat.completions.create(
        model=engine.model, messages=_chat(PROMPTS[0]), max_tokens=128, response_format=fmt, logprobs=True
    )
    content = reply.choices[0].logprobs.content
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    # forced, though unlikely ("{" or, with the JSON slice in the tokenizer's training text, "{\"")
    assert content[0].token.startswith("{") and content[0].logprob < np.log(0.5)


def test_completion_logprobs_in_the_legacy_shape(client, engine):
    reply = client.completions.create(model=engine.model, prompt=PROMPTS[1], max_tokens=N, logprobs=2)
    choice = reply.choices[0]
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) <= 2 and max(top.values()) == logprob and top[token] == logprob


def test_streamed_completion_offsets_count_the_tokens_past_held_text(client, engine):
    """Text held back while it could still start a stop string goes out later than its token's
    logprob; ``text_offset`` keeps counting the tokens, as the unstreamed answer does."""
    stream = client.completions.create(
        model=engine.model, prompt=PROMPTS[1], max_tokens=N, logprobs=1, stream=True, stop=[". Zq"]
    )
    tokens, offsets, text = [], [], ""
    for chunk in stream:
        (choice,) = chunk.choices
        text += choice.text
        if choice.logprobs is not None:
            tokens += choice.logprobs.tokens
            offsets += choice.logprobs.text_offset
    assert "".join(tokens) == text and "." in text  # a "." was held at least once, then sent
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]


# ----------------------------------------------------------------------------------- penalties
def test_penalties_follow_openais_formula():
    logits = np.array([0.0, 3.0, 2.5, 1.5])
    plain = Sampler(SamplingParams()).pick(logits, sampled=[1, 1])
    assert plain == 1
    # token 1 seen twice: 3.0 - 2 * 0.5 = 2.0 < 2.5
    assert Sampler(SamplingParams(frequency_penalty=0.5)).pick(logits, sampled=[1, 1]) == 2
    # presence counts once: 3.0 - 0.4 = 2.6 > 2.5; with 0.6 it is 2.4 < 2.5
    assert Sampler(SamplingParams(presence_penalty=0.4)).pick(logits, sampled=[1, 1]) == 1
    assert Sampler(SamplingParams(presence_penalty=0.6)).pick(logits, sampled=[1, 1]) == 2
    # a negative penalty favours repeats; the prompt (history) never counts
    assert Sampler(SamplingParams(frequency_penalty=-1.0)).pick(logits, [2, 2, 2], sampled=[3, 3]) == 3
    allowed = np.array([True, False, False, True])
    assert Sampler(SamplingParams()).pick(logits, allowed=allowed) == 3


def test_penalties_reach_the_sampler_over_http(client, engine):
    changed, n = 0, 64
    for prompt in PROMPTS[:3]:
        knobs = {"frequency_penalty": 2.0, "presence_penalty": 1.0}
        messages = _chat(prompt)
        reply = client.chat.completions.create(model=engine.model, messages=messages, max_tokens=n, **knobs)
        direct = engine.generate(engine.prepare(InferRequest(messages=_chat(prompt), max_tokens=n, **knobs)))
        plain = engine.generate(engine.prepare(InferRequest(messages=_chat(prompt), max_tokens=n)))
        assert reply.choices[0].message.content == direct.text
        changed += direct.text != plain.text
    assert changed  # the tiny model repeats itself: the penalties change what it says


# --------------------------------------------------------------------------------------- tools
def _schema_of(name: str) -> dict[str, Any]:
    return next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == name)


def test_streamed_tool_call_round_trip(client, engine):
    """A forced call streamed as the SDK assembles it, its arguments valid; the tool's result sent
    back as a ``tool`` message; the model's final answer."""
    messages: list[dict[str, Any]] = _chat("Valve V-3 on line two leaks. Close it.")
    stream = client.chat.completions.create(
        model=engine.model,
        messages=messages,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=96,
        stream=True,
        logprobs=True,
    )
    calls: dict[int, dict[str, str]] = {}
    finish = None
    logprobs = 0
    for chunk in stream:
        for choice in chunk.choices:
            assert not choice.delta.content  # a forced call streams no text
            logprobs += len(choice.logprobs.content) if choice.logprobs and choice.logprobs.content else 0
            for d in choice.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += d.id or ""
                call["name"] += (d.function and d.function.name) or ""
                call["arguments"] += (d.function and d.function.arguments) or ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    assert logprobs > 0  # asked for with a streamed call: sent on its deltas, not dropped
    call = calls[0]
    assert call["id"].startswith("call_") and call["name"] in ("close_valve", "open_ticket")
    jsonschema.validate(json.loads(call["arguments"]), _schema_of(call["name"]))
    function = {"name": call["name"], "arguments": call["arguments"]}
    called = [{"id": call["id"], "type": "function", "function": function}]
    messages.append({"role": "assistant", "content": None, "tool_calls": called})
    messages.append({"role": "tool", "tool_call_id": call["id"], "content": '{"done": true}'})
    final = client.chat.completions.create(model=engine.model, messages=messages, tools=TOOLS, max_tokens=32)
    (choice,) = final.choices
    assert choice.finish_reason in ("stop", "length") and choice.message.content  # an answer, no call
    assert not choice.message.tool_calls


def test_named_tool_choice_and_auto(client, engine):
    named = {"type": "function", "function": {"name": "open_ticket"}}
    for prompt in PROMPTS[:3]:
        reply = client.chat.completions.create(
            model=engine.model, messages=_chat(prompt), tools=TOOLS, tool_choice=named, max_tokens=96
        )
        (choice,) = reply.choices
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.function.name == "open_ticket"
        jsonschema.validate(json.loads(call.function.arguments), _schema_of("open_ticket"))
        auto = client.chat.completions.create(
            model=engine.model, messages=_chat(prompt), tools=TOOLS, max_tokens=24
        )
        # GLM-4's real tool prompt is about 1,000 tokens with this tokenizer, far past the 256
        # positions the tiny model was trained on (its tool slice keeps only the prompt's last line):
        # it does not call by itself there, it answers in text
        (choice,) = auto.choices
        assert (
            choice.finish_reason in ("stop", "length")
            and choice.message.content
            and not choice.message.tool_calls
        )


def test_bad_tool_requests_are_refused_by_name(client, engine):
    cases = [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "fly"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [CLOSE_VALVE, CLOSE_VALVE]}, "tools"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "x", "parameters": {"type": "objekt"}}}],
                "tool_choice": "required",
            },
            "tools",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "deep", "parameters": _nested(400)}}]},
            "tools",
        ),
    ]
    for extra, field in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(
                model=engine.model, messages=_chat("hi"), max_tokens=4, extra_body=extra
            )
        assert field in caught.value.message, caught.value.message


# ----------------------------------------------------------------------- the parameter audit
# A value each honoured parameter is sent with (not its "not used" value); every other parameter of
# the installed SDK gets a value no neutral default has, and must be refused naming it.
HONOURED: dict[str, Any] = {
    "model": "tiny-edge",
    "max_tokens": 4,
    "max_completion_tokens": 4,
    "temperature": 0.5,
    "top_p": 0.9,
    "seed": 7,
    "stop": ["\n\n"],
    "n": 1,
    "user": "sensor-7",
    "stream": True,
    "stream_options": {"include_usage": True},
    "presence_penalty": 0.5,
    "frequency_penalty": 0.5,
    "response_format": {"type": "json_object"},
    "messages": None,  # the input itself
    "prompt": None,
}
CLOSE_VALVE = {
    "type": "function",
    "function": {
        "name": "close_valve",
        "description": "Close a valve on a line",
        "parameters": {
            "type": "object",
            "properties": {
                "valve": {"type": "string", "maxLength": 12},
                "reason": {"enum": ["pressure", "leak", "maintenance"]},
            },
            "required": ["valve", "reason"],
            "additionalProperties": False,
        },
    },
}
OPEN_TICKET = {
    "type": "function",
    "function": {
        "name": "open_ticket",
        "parameters": {
            "type": "object",
            "properties": {"summary": {"type": "string", "maxLength": 30}, "urgent": {"type": "boolean"}},
            "required": ["summary", "urgent"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [CLOSE_VALVE, OPEN_TICKET]
CHAT_ONLY = {"logprobs": True, "top_logprobs": 2, "tools": TOOLS, "tool_choice": "required"}
TEXT_ONLY = {"logprobs": 2}
ODD = "edgeglm-audit"  # no parameter's "not used" value
NEEDS = {"top_logprobs": {"logprobs": True}, "tool_choice": {"tools": TOOLS}}  # sent along with it


def _sdk_params(module: Any) -> set[str]:
    names: set[str] = set()
    for cls in (module.CompletionCreateParamsBase, module.CompletionCreateParamsStreaming):
        for klass in cls.__mro__:
            names |= set(getattr(klass, "__annotations__", {}))
    return names


@pytest.mark.parametrize(("path", "module"), [("chat", chat_params), ("text", text_params)])
def test_every_sdk_parameter_is_honoured_or_refused_by_name(api, path, module):
    import httpx

    params = _sdk_params(module)
    assert {"model", "temperature", "stop", "stream"} <= params  # the derivation found the fields
    chat = path == "chat"
    url = f"{api.url}/v1/{'chat/completions' if chat else 'completions'}"
    base: dict[str, Any] = {"max_tokens": 4}
    base |= {"messages": _chat("hi")} if chat else {"prompt": "hi"}
    honoured = HONOURED | (CHAT_ONLY if chat else TEXT_ONLY)
    with httpx.Client(timeout=60) as http:
        for name in sorted(params):
            if name in ("messages", "prompt"):
                continue
            value = honoured.get(name, ODD)
            reply = http.post(url, json=base | NEEDS.get(name, {}) | {name: value})
            if name in honoured:
                assert reply.status_code == 200, (name, reply.text)
            else:
                assert reply.status_code == 400, (name, reply.text)
                assert repr(name) in reply.json()["error"]["message"], (name, reply.text)


def test_the_docs_list_every_sdk_parameter():
    text = DOC.read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| (supported|refused)", text, re.M))
    for name in _sdk_params(chat_params) | _sdk_params(text_params):
        assert name in rows, f"{DOC.name} does not list {name!r}"
        expected = "supported" if name in HONOURED or name in CHAT_ONLY else "refused"
        assert rows[name] == expected, name
