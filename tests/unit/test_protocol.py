"""The wire contract: topics, JSON messages and binary frames (the edgeglm.protocol package).

Whatever arrives, ``decode`` and ``Frame.unpack`` answer with a message or a ProtocolError.
"""

from __future__ import annotations

import json
import random
import struct
from typing import Any

import pytest
from blake3 import blake3
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeglm.errors import ProtocolError
from edgeglm.protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    FRAME_HEADER_SIZE,
    MAX_PIECE_SIZE,
    TOPIC_SPECS,
    ChatMessage,
    Desired,
    ErrorBody,
    FetchRequest,
    Frame,
    FrameAssembler,
    FrameKind,
    Health,
    Heartbeat,
    InferReply,
    InferRequest,
    Message,
    PieceEncoding,
    Progress,
    Report,
    Status,
    Timings,
    TokenLogprob,
    TopicKind,
    TopLogprob,
    Usage,
    check_device_id,
    check_reply_topic,
    check_site,
    check_topic,
    data_topic,
    decode,
    desired_topic,
    device_filter,
    encode,
    error_frame,
    fetch_topic,
    heartbeat_topic,
    hub_subscriptions,
    infer_topic,
    max_encoded_size,
    parse_device_topic,
    report_topic,
    shared,
    site_infer_topic,
    split_payload,
    status_topic,
)

HEX = "0123456789abcdef" * 4
DIGEST = "blake3:" + HEX
PID = blake3(b"piece").digest()
BASE = blake3(b"base").digest()
HEALTH = Health(
    latency_p50_ms=12.5,
    latency_p95_ms=40,
    tokens_per_s=33.3,
    error_rate=0.01,
    queue_depth=2,
    rss_mb=812.0,
    requests=120,
    errors=1,
    smoke_agreement=1.0,
)

# Every message class, each with a full and a minimal valid instance.
SAMPLES: dict[type[Message], list[Message]] = {
    Status: [
        Status(
            device_id="orin-01",
            state="online",
            profile="orin-nano-int4",
            model="glm-edge-1.5b-chat",
            version="1.4.0-rc.1+build.7",
            slot="a",
            agent_version="0.1.0",
            ts=1_700_000_000.25,
        ),
        Status(device_id="x", state="offline", profile="p", agent_version="", ts=0),
    ],
    Heartbeat: [
        Heartbeat(device_id="d1", ts=5.5, model="m", version="1.0.0", health=HEALTH, seq=7),
        Heartbeat(
            device_id="d1",
            ts=1,
            seq=0,
            health=Health(
                latency_p50_ms=0,
                latency_p95_ms=0,
                tokens_per_s=0,
                error_rate=0,
                queue_depth=0,
                rss_mb=0,
                requests=0,
                errors=0,
            ),
        ),
    ],
    Desired: [
        Desired(
            model="glm-edge-1.5b-chat",
            version="1.4.0",
            manifest_digest=DIGEST,
            rollout_id=42,
            profile="cpu-x86-int4",
            issued_at=1.5,
        ),
        Desired(model="m", version="0.0.1", manifest_digest=DIGEST, profile="p", issued_at=0),
    ],
    Report: [
        Report(
            device_id="d1",
            rollout_id=42,
            step="downloading",
            seq=3,
            ok=True,
            reason="ünïcode réason",
            progress=Progress(bytes_done=10, bytes_total=20, pieces_done=1, pieces_total=2),
            version="1.4.0",
            ts=2.0,
        ),
        Report(device_id="d1", step="rolled_back", seq=0, ok=False, version="1.0.0", ts=0),
    ],
    FetchRequest: [
        FetchRequest(
            device_id="d1",
            request_id="req-1",
            kind="pieces",
            model="m",
            version="1.4.0",
            profile="p",
            have=("1.3.0", "1.2.0"),
            pieces=(HEX, "f" * 64),
            window=4,
        ),
        FetchRequest(
            device_id="d1", request_id="q", kind="manifest", model="m", version="1.0.0", profile="p"
        ),
    ],
    InferRequest: [
        InferRequest(
            messages=(
                ChatMessage(role="system", content="Be brief."),
                ChatMessage(role="user", content="Hi"),
            ),
            model="glm-edge-1.5b-chat",
            max_tokens=64,
            temperature=0.7,
            top_k=40,
            top_p=0.9,
            repetition_penalty=1.1,
            stop=("\n\n",),
            seed=42,
            stream=True,
            id="corr-1",
            reply_to="sensors/42/reply",
        ),
        InferRequest(prompt="Hello"),
        InferRequest(
            prompt="Sensor P-12 reads 9 bar.",
            presence_penalty=0.5,
            frequency_penalty=-1.0,
            logprobs=True,
            top_logprobs=3,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "verdict", "schema": {"type": "object"}, "strict": True},
            },
        ),
        InferRequest(prompt="Yes?", response_format={"type": "regex", "regex": "(yes|no)"}),
    ],
    InferReply: [
        InferReply(
            id="corr-1",
            seq=3,
            text="Hello 世界",
            tokens=(1, 2, 3),
            done=True,
            finish_reason="stop",
            usage=Usage(prompt_tokens=5, completion_tokens=3),
            timings=Timings(queue_ms=0.1, prefill_ms=5, decode_ms=20.5, total_ms=25.6),
        ),
        InferReply(text="partial"),
        InferReply.failure("busy", "queue full", id="c"),
        InferReply(
            text="{",
            tokens=(7,),
            logprobs=(
                TokenLogprob(
                    token=7, text="{", logprob=-3.5, top=(TopLogprob(token=9, text=" a", logprob=-0.1),)
                ),
            ),
        ),
    ],
    ErrorBody: [ErrorBody(code="not_found", message="no such piece")],
}
CLASSES = sorted(SAMPLES, key=lambda cls: cls.__name__)
ALL_SAMPLES = [(type(m), m) for ms in SAMPLES.values() for m in ms]


def as_dict(msg: Message) -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(encode(msg))
    return obj


def accepts_or_rejects(cls: type[Message], payload: Any) -> Message | None:
    """The decode contract: a message that round-trips, or a ProtocolError; nothing else."""
    try:
        msg = decode(cls, payload)
    except ProtocolError as err:
        assert len(str(err)) < 400
        return None
    assert isinstance(msg, cls)
    assert decode(cls, encode(msg)) == msg
    return msg


# ------------------------------------------------------------------------------------ topics


def test_topic_builders() -> None:
    assert status_topic("orin-01") == "edgeglm/v1/dev/orin-01/status"
    assert heartbeat_topic("orin-01") == "edgeglm/v1/dev/orin-01/hb"
    assert desired_topic("a.b_c-d") == "edgeglm/v1/dev/a.b_c-d/desired"
    assert report_topic("d") == "edgeglm/v1/dev/d/report"
    assert data_topic("d") == "edgeglm/v1/dev/d/data"
    assert infer_topic("d") == "edgeglm/v1/dev/d/infer"
    assert fetch_topic("d") == "edgeglm/v1/dev/d/fetch"
    assert site_infer_topic("plant-7") == "edgeglm/v1/site/plant-7/infer"
    assert shared(device_filter(TopicKind.FETCH)) == "$share/hub/edgeglm/v1/dev/+/fetch"
    assert shared(site_infer_topic("plant-7"), "agents") == "$share/agents/edgeglm/v1/site/plant-7/infer"
    assert device_filter(TopicKind.STATUS) == "edgeglm/v1/dev/+/status"
    assert device_filter(TopicKind.HEARTBEAT) == "edgeglm/v1/dev/+/hb"


def test_hub_subscriptions_are_shared_with_the_table_qos() -> None:
    subs = dict(hub_subscriptions())
    assert subs == {
        "$share/hub/edgeglm/v1/dev/+/status": 1,
        "$share/hub/edgeglm/v1/dev/+/hb": 0,
        "$share/hub/edgeglm/v1/dev/+/report": 1,
        "$share/hub/edgeglm/v1/dev/+/fetch": 1,
    }
    assert not any("hub/fetch" in f for f in subs)  # the one shared fetch topic is gone


def test_topic_table() -> None:
    assert {k: (s.qos, s.retain) for k, s in TOPIC_SPECS.items()} == {
        TopicKind.STATUS: (1, True),
        TopicKind.HEARTBEAT: (0, False),
        TopicKind.DESIRED: (1, True),
        TopicKind.REPORT: (1, False),
        TopicKind.DATA: (1, False),
        TopicKind.INFER: (1, False),
        TopicKind.FETCH: (1, False),
    }
    assert TOPIC_SPECS[TopicKind.DATA].content_type != TOPIC_SPECS[TopicKind.STATUS].content_type


@pytest.mark.parametrize("kind", list(TopicKind))
def test_parse_device_topic_round_trips(kind: TopicKind) -> None:
    topic = f"edgeglm/v1/dev/dev-9/{kind}"
    assert parse_device_topic(topic) == ("dev-9", kind)
    assert device_filter(kind).replace("+", "dev-9") == topic


BAD_IDS = [
    "",
    "+",
    "#",
    "a/b",
    "a+b",
    "a#",
    "a\0",
    "-a",
    ".a",
    "_a",
    "a b",
    "a\n",
    "é",
    "١",
    "a" * 65,
    None,
    7,
]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_bad_ids_are_rejected(bad: Any) -> None:
    with pytest.raises(ProtocolError):
        check_device_id(bad)
    with pytest.raises(ProtocolError):
        check_site(bad)
    with pytest.raises(ProtocolError):
        status_topic(bad)
    with pytest.raises(ProtocolError):
        fetch_topic(bad)
    with pytest.raises(ProtocolError):
        site_infer_topic(bad)


def test_good_ids() -> None:
    for good in ["a", "A9", "0", "orin-nano_01.x", "a" * 64]:
        assert check_device_id(good) == good


@pytest.mark.parametrize(
    "topic",
    [
        "edgeglm/v1/dev/d",
        "edgeglm/v1/dev/d/status/x",
        "edgeglm/v2/dev/d/status",
        "other/v1/dev/d/status",
        "edgeglm/v1/hub/fetch",
        "edgeglm/v1/dev/d/fetch/x",
        "edgeglm/v1/dev/d/unknown",
        "edgeglm/v1/dev/+/status",
        "edgeglm/v1/dev/#",
        "edgeglm/v1/dev//status",
        "edgeglm/v1/dev/d/status/",
        "edgeglm/v1/site/s/infer",
        "a/b/c/d/e/f/g/h/i",
        "",
        None,
        b"edgeglm/v1/dev/d/status",
    ],
)
def test_parse_device_topic_rejects(topic: Any) -> None:
    with pytest.raises(ProtocolError):
        parse_device_topic(topic)


def test_seven_slash_limit() -> None:
    assert check_topic("a/b/c/d/e/f/g/h") == "a/b/c/d/e/f/g/h"
    with pytest.raises(ProtocolError, match="slashes"):
        check_topic("a/b/c/d/e/f/g/h/i")
    with pytest.raises(ProtocolError, match="slashes"):
        shared("a/b/c/d/e/f/g/h/+")
    assert check_topic("a/b/c/d/e/f/g/h/i", max_slashes=None)


@pytest.mark.parametrize("bad", ["", "a/+", "#", "a/#", "a\0b", "$SYS/x", "\ud800", "x" * 70000, 5])
def test_check_topic_rejects(bad: Any) -> None:
    with pytest.raises(ProtocolError):
        check_topic(bad)


def test_reply_topic_stays_out_of_our_namespace() -> None:
    assert check_reply_topic("sensors/a/b/c/d/e/f/g/h/i/reply")
    for bad in ["edgeglm/v1/dev/x/desired", "edgeglm", "a/+/b", "$share/g/t"]:
        with pytest.raises(ProtocolError):
            check_reply_topic(bad)


def test_shared_and_filter_reject_bad_input() -> None:
    for group in ["", "a/b", "+", "#"]:
        with pytest.raises(ProtocolError):
            shared("edgeglm/v1/dev/+/fetch", group)
    for bad in ["", "$share/x/y", None]:
        with pytest.raises(ProtocolError):
            shared(bad)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError):
        device_filter("nope")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ JSON messages


@pytest.mark.parametrize(("cls", "msg"), ALL_SAMPLES)
def test_round_trip(cls: type[Message], msg: Message) -> None:
    data = encode(msg)
    assert data == json.dumps(json.loads(data), separators=(",", ":"), ensure_ascii=False).encode()
    for payload in (data, bytearray(data), memoryview(data), data.decode("utf-8")):
        assert decode(cls, payload) == msg
    assert as_dict(msg)["v"] == 1


@pytest.mark.parametrize(("cls", "msg"), ALL_SAMPLES)
def test_unknown_fields_are_tolerated(cls: type[Message], msg: Message) -> None:
    obj = as_dict(msg)
    obj["future_field"] = {"nested": [1, 2, {"x": None}]}
    obj["zz"] = "yes"
    if "health" in obj:
        obj["health"]["gpu_temp_c"] = 61
    assert decode(cls, json.dumps(obj)) == msg


@pytest.mark.parametrize(("cls", "msg"), ALL_SAMPLES)
def test_every_prefix_is_rejected(cls: type[Message], msg: Message) -> None:
    data = encode(msg)
    for end in range(len(data)):
        with pytest.raises(ProtocolError):
            decode(cls, data[:end])


@pytest.mark.parametrize("cls", CLASSES)
def test_versions(cls: type[Message]) -> None:
    obj = as_dict(SAMPLES[cls][0])
    del obj["v"]
    assert decode(cls, json.dumps(obj)) == SAMPLES[cls][0]  # v defaults to 1
    for v in (2, 99, 10**40):
        with pytest.raises(ProtocolError, match="unsupported version"):
            decode(cls, json.dumps({**obj, "v": v}))
    for bad in (0, -1, "1", 1.0, True, None, [1]):
        with pytest.raises(ProtocolError, match="'v'"):
            decode(cls, json.dumps({**obj, "v": bad}))


@pytest.mark.parametrize("cls", CLASSES)
def test_hostile_payloads(cls: type[Message]) -> None:
    good = json.dumps(as_dict(SAMPLES[cls][0]))
    huge = 10 * 1024 * 1024
    hostile: list[Any] = [
        b"",
        b"   ",
        b"null",
        b"[]",
        b"42",
        b'"a string"',
        b"\xff\xfe{}",
        b'{"a": "\xc0\xaf"}',  # overlong encoding
        b'{"a": "\xed\xa0\x80"}',  # an encoded surrogate
        "\ud800",
        good.encode("utf-16"),
        b"\xef\xbb\xbf" + good.encode(),  # a BOM
        b"{" * 100_000,
        b"[" * 100_000 + b"]" * 100_000,
        '{"x":' + "[" * 100_000 + "]" * 100_000 + "}",
        b"x" * huge,
        '{"pad":"' + "a" * huge + '"}',
        memoryview(b" " * huge),
        good[:-1] + ', "ts": NaN}',
        good[:-1] + ', "ts": Infinity}',
        good[:-1] + ', "ts": -Infinity}',
        good[:-1] + ', "ts": 1e999}',
        good[:-1] + ', "n": ' + "9" * 5000 + "}",
        '{"v": 1, "v": 1}',  # a duplicate key
        good + good,
        None,
        12,
        [good],
    ]
    for payload in hostile:
        assert accepts_or_rejects(cls, payload) is None, repr(payload)[:80]


def test_size_limit_is_checked_before_parsing() -> None:
    with pytest.raises(ProtocolError, match="limit") as info:
        decode(Status, b"{" + b" " * Status.MAX_BYTES + b"}")
    assert info.value.what == "Status"


def test_released_memoryview() -> None:
    view = memoryview(encode(SAMPLES[Status][0]))
    view.release()
    with pytest.raises(ProtocolError):
        decode(Status, view)


def test_error_names_message_and_field_and_never_echoes_the_payload() -> None:
    obj = as_dict(SAMPLES[Heartbeat][0])
    obj["health"]["error_rate"] = 1.5
    with pytest.raises(ProtocolError) as info:
        decode(Heartbeat, json.dumps(obj))
    assert info.value.what == "Heartbeat"
    assert "health.error_rate" in str(info.value)
    assert info.value.data["field"] == "health.error_rate"
    with pytest.raises(ProtocolError, match=r"^FetchRequest: kind 'pieces' needs"):
        decode(FetchRequest, json.dumps({**as_dict(SAMPLES[FetchRequest][0]), "pieces": []}))
    obj = as_dict(SAMPLES[Status][0])
    obj["device_id"] = "/" * 1500
    with pytest.raises(ProtocolError) as info:
        decode(Status, json.dumps(obj))
    assert "////" not in str(info.value) and len(str(info.value)) < 300


def _set(obj: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    *parents, last = path.split(".")
    node: Any = obj
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    if value is _DELETE and isinstance(node, list):
        del node[int(last)]
    elif value is _DELETE:
        node.pop(last, None)
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return obj


_DELETE = object()
S, FR, IQ, IR = Status, FetchRequest, InferRequest, InferReply
BAD_FIELDS: list[tuple[type[Message], int, str, Any, str]] = [
    # class, sample, field path, bad value, expected text in the error
    (S, 0, "state", "sleeping", "state"),
    (S, 0, "device_id", "a/b", "device_id"),
    (S, 0, "device_id", 42, "device_id"),
    (S, 0, "device_id", _DELETE, "device_id"),
    (S, 0, "ts", "1700000000", "ts"),
    (S, 0, "ts", True, "ts"),
    (S, 0, "ts", -1, "ts"),
    (S, 0, "slot", "c", "slot"),
    (S, 0, "version", "1.4", "version"),
    (S, 0, "version", "01.4.0", "version"),
    (S, 0, "version", "1.4.0\n", "version"),
    (S, 0, "agent_version", "x" * 65, "agent_version"),
    (Heartbeat, 0, "seq", -1, "seq"),
    (Heartbeat, 0, "seq", 1.0, "seq"),
    (Heartbeat, 0, "seq", 2**63, "seq"),
    (Heartbeat, 0, "health", [], "health"),
    (Heartbeat, 0, "health.queue_depth", "3", "health.queue_depth"),
    (Heartbeat, 0, "health.smoke_agreement", -0.1, "health.smoke_agreement"),
    (Desired, 0, "manifest_digest", "sha256:" + HEX, "manifest_digest"),
    (Desired, 0, "manifest_digest", "blake3:" + HEX.upper(), "manifest_digest"),
    (Desired, 0, "rollout_id", "", "rollout_id"),
    (Desired, 0, "rollout_id", "r-42", "rollout_id"),
    (Desired, 0, "rollout_id", "0", "rollout_id"),
    (Desired, 0, "rollout_id", "2147483648", "rollout_id"),
    (Desired, 0, "rollout_id", 4.2, "rollout_id"),
    (Desired, 0, "rollout_id", True, "rollout_id"),
    (Report, 1, "rollout_id", "99999999999999999999999", "rollout_id"),
    (Report, 0, "ok", "true", "ok"),
    (Report, 0, "ok", 1, "ok"),
    (Report, 0, "step", "Downloading", "step"),
    (Report, 0, "progress.bytes_done", 21, "progress"),
    (Report, 0, "reason", "x" * 513, "reason"),
    (FR, 0, "kind", "everything", "kind"),
    (FR, 0, "pieces", [], "pieces"),
    (FR, 0, "pieces", [HEX, HEX], "twice"),
    (FR, 0, "pieces", [HEX.upper()], "pieces.0"),
    (FR, 0, "pieces", [HEX[:-1]], "pieces.0"),
    (FR, 0, "pieces", [f"{i:064x}" for i in range(1025)], "pieces"),
    (FR, 0, "pieces", HEX, "pieces"),
    (FR, 0, "have", ["1.0"], "have.0"),
    (FR, 0, "window", 0, "window"),
    (FR, 1, "pieces", [HEX], "manifest"),
    (IQ, 1, "prompt", "", "prompt"),
    (IQ, 1, "prompt", "x" * 65537, "prompt"),
    (IQ, 1, "prompt", ["Hello"], "prompt"),
    (IQ, 1, "messages", [{"role": "user", "content": "x"}], "exactly one"),
    (IQ, 1, "prompt", _DELETE, "exactly one"),
    (IQ, 0, "messages", [], "messages"),
    (IQ, 0, "messages.0.role", "robot", "messages.0.role"),
    (IQ, 0, "messages.0.content", None, "messages.0.content"),
    (IQ, 0, "messages", [{"role": "user", "content": "x" * 40000}] * 2, "characters"),
    (IQ, 0, "max_tokens", 0, "max_tokens"),
    (IQ, 0, "max_tokens", 8193, "max_tokens"),
    (IQ, 0, "max_tokens", "64", "max_tokens"),
    (IQ, 0, "temperature", -0.5, "temperature"),
    (IQ, 0, "temperature", 1e-320, "temperature"),  # issue 22: overflowed the sampler into NaN
    (IQ, 0, "temperature", 0.001, "0 (greedy) or between 0.01 and 2.0"),
    (IQ, 0, "temperature", 2.5, "temperature"),
    (IQ, 0, "repetition_penalty", 1e-320, "repetition_penalty"),
    (IQ, 0, "repetition_penalty", 0.05, "repetition_penalty"),
    (IQ, 0, "repetition_penalty", 1e300, "repetition_penalty"),
    (IQ, 0, "top_k", -1, "top_k"),
    (IQ, 0, "top_p", 0, "top_p"),
    (IQ, 0, "top_p", 1.5, "top_p"),
    (IQ, 0, "repetition_penalty", 0, "repetition_penalty"),
    (IQ, 0, "stop", ["x"] * 17, "stop"),
    (IQ, 0, "stop", "x", "stop"),
    (IQ, 0, "seed", -1, "seed"),
    (IQ, 0, "stream", "yes", "stream"),
    (IQ, 0, "reply_to", "a/+/b", "reply_to"),
    (IQ, 0, "reply_to", "#", "reply_to"),
    (IQ, 0, "reply_to", "", "reply_to"),
    (IQ, 0, "reply_to", "$SYS/x", "reply_to"),
    (IQ, 0, "reply_to", "edgeglm/v1/dev/x/desired", "reply_to"),
    (IR, 1, "done", True, "finish_reason"),
    (IR, 0, "done", False, "finish_reason"),
    (IR, 0, "finish_reason", "error", "error"),
    (IR, 2, "error.code", "weird", "error.code"),
    (IR, 2, "error", _DELETE, "error"),
    (IR, 0, "tokens", [-1], "tokens.0"),
    (IR, 0, "usage.prompt_tokens", 1.5, "usage.prompt_tokens"),
    (IR, 0, "timings.total_ms", "1", "timings.total_ms"),
    (ErrorBody, 0, "message", "x" * 513, "message"),
]


@pytest.mark.parametrize(("cls", "index", "path", "value", "text"), BAD_FIELDS)
def test_bad_fields(cls: type[Message], index: int, path: str, value: Any, text: str) -> None:
    obj = _set(as_dict(SAMPLES[cls][index]), path, value)
    with pytest.raises(ProtocolError, match="^" + cls.__name__) as info:
        decode(cls, json.dumps(obj))
    assert text in str(info.value)


def test_floats_accept_ints_but_ints_refuse_floats() -> None:
    obj = as_dict(SAMPLES[Status][0])
    obj["ts"] = 17
    assert decode(Status, json.dumps(obj)).ts == 17.0


def test_largest_valid_messages_fit_their_limits() -> None:
    ctl = "\x01"  # escaped as \u0001: the most bytes per character
    name, semver = "n" * 64, "1.2.3-" + "a" * 58
    largest: list[Message] = [
        Status(
            device_id=name,
            state="offline",
            profile=name,
            model=name,
            version=semver,
            slot="b",
            agent_version=ctl * 64,
            ts=1.7976931348623157e308,
        ),
        Report(
            device_id=name,
            rollout_id=2**31 - 1,
            step="s" * 32,
            seq=2**63 - 1,
            ok=False,
            reason=ctl * 512,
            progress=Progress(bytes_done=2**63 - 1, bytes_total=2**63 - 1, pieces_done=0, pieces_total=0),
            version=semver,
            ts=1e300,
        ),
        FetchRequest(
            device_id=name,
            request_id=name,
            kind="pieces",
            model=name,
            version=semver,
            profile=name,
            have=(semver,) * 64,
            pieces=tuple(f"{i:064x}" for i in range(FetchRequest.MAX_PIECES)),
            window=256,
        ),
        InferRequest(
            messages=(ChatMessage(role="assistant", content=ctl * 65536),)
            + (ChatMessage(role="assistant", content=""),) * 255,
            stop=(ctl * 256,) * 16,
            id=ctl * 128,
            reply_to="\x01" * 1024,
            seed=2**64 - 1,
        ),
        InferReply(
            id=ctl * 128,
            seq=2**63 - 1,
            text=ctl * 131072,
            tokens=(2**31 - 1,) * 8192,
            done=True,
            finish_reason="error",
            error=ErrorBody(code="unknown_model", message=ctl * 512),
            usage=Usage(prompt_tokens=2**63 - 1, completion_tokens=2**63 - 1),
            timings=Timings(queue_ms=1e300, prefill_ms=1e300, decode_ms=1e300, total_ms=1e300),
        ),
        ErrorBody(code="bad_request", message=ctl * 512),
    ]
    for msg in largest:
        assert decode(type(msg), encode(msg)) == msg
    assert FetchRequest.MAX_BYTES <= DEFAULT_MAX_MESSAGE_BYTES


def test_failure_reply_and_encode_limit() -> None:
    reply = InferReply.failure("too_long", "x" * 5000)
    assert reply.error is not None and len(reply.error.message) == 512
    assert reply.done and reply.finish_reason == "error"
    unchecked = Status.model_construct(**{**dict(SAMPLES[Status][0]), "agent_version": "x" * 5000})
    with pytest.raises(ProtocolError, match="limit"):
        encode(unchecked)


# ---- property-based: whatever arrives, the answer is a message or a ProtocolError

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _paths(node: Any, prefix: str = "") -> list[str]:
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    out: list[str] = []
    for key, child in items:
        path = f"{prefix}{key}"
        out += [path, *_paths(child, path + ".")]
    return out


@FAST
@given(cls=st.sampled_from(CLASSES), data=st.binary(max_size=300))
def test_random_bytes(cls: type[Message], data: bytes) -> None:
    accepts_or_rejects(cls, data)


@FAST
@given(cls=st.sampled_from(CLASSES), text=st.text(max_size=300))
def test_random_text(cls: type[Message], text: str) -> None:
    accepts_or_rejects(cls, text)


@FAST
@given(cls=st.sampled_from(CLASSES), obj=st.dictionaries(st.text(max_size=12), JSON_VALUES, max_size=8))
def test_random_objects(cls: type[Message], obj: dict[str, Any]) -> None:
    accepts_or_rejects(cls, json.dumps(obj))


@settings(max_examples=300, deadline=None)
@given(sample=st.sampled_from(ALL_SAMPLES), data=st.data())
def test_wrong_types_in_any_field(sample: tuple[type[Message], Message], data: st.DataObject) -> None:
    cls, msg = sample
    obj = as_dict(msg)
    path = data.draw(st.sampled_from(_paths(obj)))
    value = data.draw(JSON_VALUES | st.just(_DELETE))
    accepts_or_rejects(cls, json.dumps(_set(obj, path, value)))


@FAST
@given(sample=st.sampled_from(ALL_SAMPLES), data=st.data())
def test_corrupted_valid_payloads(sample: tuple[type[Message], Message], data: st.DataObject) -> None:
    cls, msg = sample
    payload = bytearray(encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        payload[data.draw(st.integers(0, len(payload) - 1))] = data.draw(st.integers(0, 255))
    accepts_or_rejects(cls, bytes(payload))


# ------------------------------------------------------------------------------------- frames


def _frame(**overrides: Any) -> Frame:
    fields: dict[str, Any] = {
        "kind": FrameKind.PIECE,
        "encoding": PieceEncoding.XOR_ZSTD,
        "element_width": 2,
        "piece_id": PID,
        "base_id": BASE,
        "piece_size": 100,
        "encoded_size": 16,
        "payload": bytes(range(16)),
    }
    fields.update(overrides)
    return Frame(**fields)


def _raw(**overrides: Any) -> bytes:
    """A packed frame written from the documented layout, digest recomputed after any change."""
    f: dict[str, Any] = {
        "magic": b"EGF",
        "version": 1,
        "kind": 0,
        "encoding": 3,
        "width": 2,
        "flags": 1,
        "part": 0,
        "parts": 1,
        "piece_size": 100,
        "encoded_size": 16,
        "offset": 0,
        "payload": bytes(range(16)),
        "piece_id": PID,
        "base_id": BASE,
    }
    f.update(overrides)
    head = struct.pack(
        "<3sBBBBBIIQQQI32s32s",
        f["magic"],
        f["version"],
        f["kind"],
        f["encoding"],
        f["width"],
        f["flags"],
        f["part"],
        f["parts"],
        f["piece_size"],
        f["encoded_size"],
        f["offset"],
        f.get("payload_len", len(f["payload"])),
        f["piece_id"],
        f["base_id"],
    )
    payload: bytes = f["payload"]
    return head + blake3(head + payload).digest() + payload


def test_frame_layout_matches_the_docstring() -> None:
    assert FRAME_HEADER_SIZE == 140
    assert _frame().pack() == _raw()
    assert Frame.unpack(_raw()) == _frame()


FRAMES = [
    _frame(),
    _frame(encoding=PieceEncoding.RAW, element_width=0, base_id=None, piece_size=16),
    _frame(encoding=PieceEncoding.ZSTD, element_width=0, base_id=None),
    _frame(encoding=PieceEncoding.PLANES_ZSTD, element_width=8, base_id=None),
    _frame(encoding=PieceEncoding.SUB_ZSTD, element_width=4),
    _frame(encoding=PieceEncoding.SUB4_ZSTD, element_width=1),
    _frame(kind=FrameKind.MANIFEST, encoding=PieceEncoding.ZSTD, element_width=0, base_id=None),
    _frame(
        encoding=PieceEncoding.RAW, element_width=0, base_id=None, piece_size=0, encoded_size=0, payload=b""
    ),
    _frame(part=1, parts=2, offset=6, payload=bytes(10)),
    error_frame(ErrorBody(code="not_found", message="no piece"), PID),
]


@pytest.mark.parametrize("frame", FRAMES)
def test_frame_round_trip(frame: Frame) -> None:
    packed = frame.pack()
    assert len(packed) == FRAME_HEADER_SIZE + len(frame.payload)
    for data in (packed, bytearray(packed), memoryview(packed)):
        assert Frame.unpack(data) == frame
    assert "payload" not in repr(frame)


def test_error_frame_carries_an_error_body() -> None:
    frame = Frame.unpack(FRAMES[-1].pack())
    assert decode(ErrorBody, frame.payload) == ErrorBody(code="not_found", message="no piece")


@pytest.mark.parametrize("code", ["forbidden", "rate_limited"])
def test_fetch_refusals_are_error_codes(code: str) -> None:
    frame = Frame.unpack(error_frame(ErrorBody(code=code, message="wait 2.0 s")).pack())  # type: ignore[arg-type]
    assert decode(ErrorBody, frame.payload).code == code


@pytest.mark.parametrize("size", [0, 1, 100, 128 << 10, 1 << 20, MAX_PIECE_SIZE])
def test_max_encoded_size_covers_zstds_bound_and_raw_is_exact(size: int) -> None:
    bound = size + (size >> 8) + (((128 << 10) - size) >> 11 if size < 128 << 10 else 0)
    assert max_encoded_size(PieceEncoding.RAW, size) == size
    for encoding in PieceEncoding:
        if encoding is not PieceEncoding.RAW:
            assert bound <= max_encoded_size(encoding, size) <= size + size // 64 + 128


def test_incompressible_zstd_stays_within_max_encoded_size() -> None:
    import os

    import zstandard

    for size in (1, 1000, 200_000):
        payload = zstandard.ZstdCompressor(level=3).compress(os.urandom(size))
        assert len(payload) <= max_encoded_size(PieceEncoding.ZSTD, size)


@pytest.mark.parametrize("frame", FRAMES)
def test_every_frame_prefix_is_rejected(frame: Frame) -> None:
    packed = frame.pack()
    for end in range(len(packed)):
        with pytest.raises(ProtocolError):
            Frame.unpack(packed[:end])
    with pytest.raises(ProtocolError):
        Frame.unpack(packed + b"\0")


@pytest.mark.parametrize("frame", [FRAMES[0], FRAMES[7], FRAMES[-1]])
def test_every_bit_flip_is_caught(frame: Frame) -> None:
    packed = frame.pack()
    for bit in range(len(packed) * 8):
        flipped = bytearray(packed)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(ProtocolError):
            Frame.unpack(bytes(flipped))


BAD_RAW = [
    ({"magic": b"EGG"}, "magic"),
    ({"version": 2}, "version"),
    ({"kind": 3}, "kind"),
    ({"encoding": 6}, "encoding"),
    ({"flags": 3}, "flags"),
    ({"flags": 0}, "flags"),  # base id bytes without the flag
    ({"flags": 0, "base_id": bytes(32)}, "base_id"),  # delta encoding without a base
    ({"encoding": 1, "width": 0}, "base_id"),  # a base on a non-delta encoding
    ({"width": 3}, "element_width"),
    ({"width": 0}, "element_width"),
    ({"part": 1}, "part"),
    ({"parts": 0}, "parts"),
    ({"parts": 17}, "parts"),  # more parts than bytes
    ({"piece_size": MAX_PIECE_SIZE + 1}, "piece_size"),
    ({"encoded_size": 15}, "fit"),
    ({"encoded_size": 2**64 - 1}, "encoded_size"),
    ({"offset": 1}, "fit"),
    ({"payload_len": 15}, "payload bytes"),
    ({"payload_len": 2**32 - 1}, "payload bytes"),
    ({"kind": 1}, "manifest"),
    ({"kind": 2, "encoding": 1, "width": 0, "flags": 0, "base_id": bytes(32)}, "error"),
    ({"encoding": 0, "width": 0, "flags": 0, "base_id": bytes(32)}, "RAW"),
]


@pytest.mark.parametrize(("overrides", "text"), BAD_RAW)
def test_bad_headers_are_rejected(overrides: dict[str, Any], text: str) -> None:
    with pytest.raises(ProtocolError, match=text):
        Frame.unpack(_raw(**overrides))


def test_unpack_limits_and_types() -> None:
    with pytest.raises(ProtocolError, match="limit"):
        Frame.unpack(_raw(), max_bytes=100)
    with pytest.raises(ProtocolError, match="limit"):
        Frame.unpack(memoryview(_raw()), max_bytes=100)
    with pytest.raises(ProtocolError, match="limit"):
        Frame.unpack(b"\0" * (MAX_PIECE_SIZE * 2))
    for bad in (None, "EGF", 5):
        with pytest.raises(ProtocolError):
            Frame.unpack(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "overrides",
    [
        {"piece_id": PID[:31]},
        {"piece_id": PID.hex()},
        {"base_id": BASE + b"\0"},
        {"base_id": None},
        {"kind": 7},
        {"encoding": "zstd"},
        {"part": 1, "parts": 1},
        {"part": -1},
        {"part": True},
        {"payload": "text"},
        {"encoded_size": 20},
        {"offset": 1, "encoded_size": 17},
        {"part": 2, "parts": 3, "offset": 3, "encoded_size": 40},
        {"piece_size": -1},
        {"piece_size": 1.5},
    ],
)
def test_frame_constructor_rejects(overrides: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        _frame(**overrides)


def _assemble(frames: list[Frame]) -> bytes:
    assembler = FrameAssembler()
    results = [assembler.add(f) for f in frames]
    done = [r for r in results if r is not None]
    assert len(done) == 1 and assembler.complete and assembler.missing() == []
    return done[0]


def test_split_and_assemble() -> None:
    payload = random.Random(7).randbytes(300_000)
    frames = split_payload(
        FrameKind.PIECE,
        PieceEncoding.ZSTD,
        piece_id=PID,
        piece_size=1 << 20,
        payload=payload,
    )
    assert len(frames) == 3
    assert all(len(f.pack()) <= DEFAULT_MAX_MESSAGE_BYTES for f in frames)
    assert len(frames[0].pack()) == DEFAULT_MAX_MESSAGE_BYTES
    unpacked = [Frame.unpack(f.pack()) for f in frames]
    assert _assemble([unpacked[2], unpacked[0], unpacked[2], unpacked[1], unpacked[0]]) == payload


def test_split_empty_payload_and_tiny_limit() -> None:
    (frame,) = split_payload(FrameKind.PIECE, PieceEncoding.RAW, piece_id=PID, piece_size=0, payload=b"")
    assert _assemble([frame]) == b""
    with pytest.raises(ProtocolError):
        split_payload(
            FrameKind.PIECE,
            PieceEncoding.RAW,
            piece_id=PID,
            piece_size=1,
            payload=b"x",
            max_message_bytes=FRAME_HEADER_SIZE,
        )


@settings(max_examples=50, deadline=None)
@given(
    payload=st.binary(max_size=3000),
    room=st.integers(1, 700),
    seed=st.integers(0, 2**32),
)
def test_split_assemble_any_order(payload: bytes, room: int, seed: int) -> None:
    frames = split_payload(
        FrameKind.PIECE,
        PieceEncoding.SUB_ZSTD,
        element_width=4,
        piece_id=PID,
        base_id=BASE,
        piece_size=12345,
        payload=payload,
        max_message_bytes=FRAME_HEADER_SIZE + room,
    )
    assert all(len(f.pack()) <= FRAME_HEADER_SIZE + room for f in frames)
    rng = random.Random(seed)
    arrivals = frames + rng.sample(frames, k=min(3, len(frames)))
    rng.shuffle(arrivals)
    assert _assemble(arrivals) == payload


def test_assembler_rejects_conflicts() -> None:
    frames = split_payload(
        FrameKind.PIECE,
        PieceEncoding.ZSTD,
        piece_id=PID,
        piece_size=9,
        payload=bytes(20),
        max_message_bytes=150,
    )
    assembler = FrameAssembler()
    assert assembler.missing() == [] and not assembler.complete
    assert assembler.add(frames[0]) is None
    assert assembler.missing() == [1]
    with pytest.raises(ProtocolError, match="twice"):
        assembler.add(Frame(**{**_fields(frames[0]), "payload": b"\1" * 10}))
    with pytest.raises(ProtocolError, match="belong"):
        assembler.add(Frame(**{**_fields(frames[1]), "piece_id": BASE}))
    assert assembler.add(frames[1]) == bytes(20)


def _fields(frame: Frame) -> dict[str, Any]:
    return {name: getattr(frame, name) for name in Frame.__dataclass_fields__}


def test_assembler_rejects_gaps_and_overlaps() -> None:
    common: dict[str, Any] = {
        "kind": FrameKind.PIECE,
        "encoding": PieceEncoding.ZSTD,
        "piece_id": PID,
        "piece_size": 5,
        "encoded_size": 10,
        "parts": 3,
    }
    gap = [
        Frame(**common, part=0, offset=0, payload=bytes(4)),
        Frame(**common, part=1, offset=2, payload=bytes(2)),
        Frame(**common, part=2, offset=6, payload=bytes(4)),
    ]
    assembler = FrameAssembler()
    assembler.add(gap[0])
    assembler.add(gap[1])
    with pytest.raises(ProtocolError, match="starts at"):
        assembler.add(gap[2])
    assembler = FrameAssembler()
    assembler.add(Frame(**common, part=0, offset=0, payload=bytes(6)))
    with pytest.raises(ProtocolError, match="overlap"):
        assembler.add(Frame(**common, part=1, offset=2, payload=bytes(6)))


@FAST
@given(data=st.binary(max_size=400))
def test_random_bytes_as_frames(data: bytes) -> None:
    for candidate in (data, b"EGF\x01" + data, _raw()[:108] + data):
        with pytest.raises(ProtocolError):
            Frame.unpack(candidate)


@FAST
@given(flips=st.lists(st.integers(0, (FRAME_HEADER_SIZE + 16) * 8 - 1), min_size=1, max_size=8, unique=True))
def test_random_bit_flips(flips: list[int]) -> None:
    packed = bytearray(_raw())
    for bit in flips:
        packed[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(ProtocolError):
        Frame.unpack(bytes(packed))


def test_a_rollout_id_is_a_number_in_python_and_its_decimal_string_on_the_wire() -> None:
    """Agents of every release sent and accepted ``"rollout_id": "42"``: the JSON keeps that form,
    a number decodes too, and anything the hub's 32-bit key cannot hold is refused by name."""
    msg = Desired(
        model="m", version="1.0.0", manifest_digest=DIGEST, rollout_id="42", profile="p", issued_at=0
    )
    assert msg.rollout_id == 42 and json.loads(encode(msg))["rollout_id"] == "42"
    obj = as_dict(msg)
    obj["rollout_id"] = 2**31 - 1
    assert decode(Desired, json.dumps(obj)).rollout_id == 2**31 - 1
    for bad in ("2147483648", 2**31, "42abc", " 42"):
        obj["rollout_id"] = bad
        with pytest.raises(ProtocolError, match="rollout_id"):
            decode(Desired, json.dumps(obj))
