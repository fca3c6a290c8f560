"""What goes over the wire: every MQTT topic, message and data frame of EdgeGLM (PRODUCT.md §6).

Topics (``{id}`` a device id, ``{site}`` a site name, both ``[A-Za-z0-9][A-Za-z0-9._-]{0,63}``;
at most 7 slashes per topic, the limit of cloud IoT brokers):

    topic                          direction        QoS retain payload
    edgeglm/v1/dev/{id}/status     agent -> hub     1   yes    Status (also the LWT, state=offline)
    edgeglm/v1/dev/{id}/hb         agent -> hub     0   no     Heartbeat
    edgeglm/v1/dev/{id}/desired    hub -> agent     1   yes    Desired
    edgeglm/v1/dev/{id}/report     agent -> hub     1   no     Report
    edgeglm/v1/hub/fetch           agent -> hub     1   no     FetchRequest (replicas: $share/hub/...)
    edgeglm/v1/dev/{id}/data       hub -> agent     1   no     Frame (binary); correlation = request_id
    edgeglm/v1/dev/{id}/infer      sensor -> agent  1   no     InferRequest
    edgeglm/v1/site/{site}/infer   sensor -> agents 1   no     InferRequest (agents: $share/agents/...)

An InferReply goes to the request's MQTT 5 response topic with its correlation data (MQTT 3.1.1
clients put ``reply_to`` and ``id`` in the request instead). ``TOPIC_SPECS`` holds QoS and retain.

JSON messages are pydantic models with a protocol version ``v``; unknown fields are ignored, every
string and list is bounded and each class has a ``MAX_BYTES``. :func:`decode` turns *any* input into
a message or a :class:`~edgeglm.errors.ProtocolError`; :func:`encode` writes compact UTF-8 JSON.

Data messages are binary :class:`Frame` s: a 140-byte little-endian header, then the payload:

    offset size field
    0      3    magic b"EGF"
    3      1    format version (1)
    4      1    kind           FrameKind
    5      1    encoding       PieceEncoding
    6      1    element_width  0, or 1/2/4/8 for byte-plane encodings
    7      1    flags          bit 0: base_id present; other bits 0
    8      4    part           u32, < parts
    12     4    parts          u32, >= 1
    16     8    piece_size     u64, decoded size of the whole piece
    24     8    encoded_size   u64, size of the whole encoded payload stream
    32     8    offset         u64, where this part's payload starts in that stream
    40     4    payload_len    u32, == len(payload)
    44     32   piece_id       BLAKE3-256 of the decoded piece (or manifest)
    76     32   base_id        BLAKE3-256 of the delta base; zeros when absent
    108    32   digest         BLAKE3-256 of header bytes 0..108 + payload: any flipped bit is caught
    140    ...  payload
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from types import MappingProxyType
from typing import Annotated, Any, ClassVar, Literal, Self, TypeVar

from blake3 import blake3
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StringConstraints,
    ValidationError,
    model_validator,
)

from edgeglm.contracts import NAME_PATTERN, Digest, Name, RolloutId, SemVer
from edgeglm.errors import ProtocolError

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DELTA_ENCODINGS",
    "FRAME_HEADER_SIZE",
    "MAX_PIECE_SIZE",
    "MAX_TOPIC_SLASHES",
    "PREFIX",
    "PROTOCOL_VERSION",
    "TOPIC_SPECS",
    "UPDATE_FAILED",
    "UPDATE_SUCCEEDED",
    "ChatMessage",
    "Desired",
    "ErrorBody",
    "ErrorCode",
    "FetchRequest",
    "Frame",
    "FrameAssembler",
    "FrameKind",
    "Health",
    "Heartbeat",
    "InferReply",
    "InferRequest",
    "Message",
    "PieceEncoding",
    "Progress",
    "Report",
    "Status",
    "Timings",
    "TopicKind",
    "TopicSpec",
    "Usage",
    "check_device_id",
    "check_reply_topic",
    "check_site",
    "check_topic",
    "data_topic",
    "decode",
    "desired_topic",
    "device_filter",
    "encode",
    "error_frame",
    "fetch_topic",
    "heartbeat_topic",
    "hub_subscriptions",
    "infer_topic",
    "parse_device_topic",
    "report_topic",
    "shared",
    "site_infer_topic",
    "split_payload",
    "status_topic",
]

# ---------------------------------------------------------------------------------------- topics

PREFIX = "edgeglm/v1"
MAX_TOPIC_SLASHES = 7
_MAX_TOPIC_BYTES = 65535  # MQTT's own limit on a topic name
_NAME = NAME_PATTERN
_NAME_RE = re.compile(_NAME)


class TopicKind(StrEnum):
    """The last level of a device topic (and ``fetch`` for the hub's own topic)."""

    STATUS = "status"
    HEARTBEAT = "hb"
    DESIRED = "desired"
    REPORT = "report"
    DATA = "data"
    INFER = "infer"
    FETCH = "fetch"


@dataclass(frozen=True)
class TopicSpec:
    """How a kind of message is published, so that no caller hard-codes it."""

    qos: int
    retain: bool
    content_type: str = "application/json"


TOPIC_SPECS: Mapping[TopicKind, TopicSpec] = MappingProxyType(
    {
        TopicKind.STATUS: TopicSpec(qos=1, retain=True),
        TopicKind.HEARTBEAT: TopicSpec(qos=0, retain=False),
        TopicKind.DESIRED: TopicSpec(qos=1, retain=True),
        TopicKind.REPORT: TopicSpec(qos=1, retain=False),
        TopicKind.DATA: TopicSpec(qos=1, retain=False, content_type="application/vnd.edgeglm.frame"),
        TopicKind.INFER: TopicSpec(qos=1, retain=False),
        TopicKind.FETCH: TopicSpec(qos=1, retain=False),
    }
)
_DEVICE_KINDS = frozenset(TopicKind) - {TopicKind.FETCH}


def _clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_device_id(value: object, what: str = "device id") -> str:
    """Return ``value`` if it is a valid device id (also used for site and group names)."""
    if not isinstance(value, str) or _NAME_RE.fullmatch(value) is None:
        raise ProtocolError(what, f"{_clip(repr(value), 80)} must match {_NAME}")
    return value


def check_site(value: object) -> str:
    """Return ``value`` if it is a valid site name."""
    return check_device_id(value, "site name")


def check_topic(topic: object, *, max_slashes: int | None = MAX_TOPIC_SLASHES) -> str:
    """Return ``topic`` if a client may publish to it: no wildcards, no NUL, not ``$...``."""
    if not isinstance(topic, str) or not topic:
        raise ProtocolError("topic", "must be a non-empty string")
    if any(c in topic for c in "+#\0"):
        raise ProtocolError("topic", f"{_clip(repr(topic))} contains a wildcard or NUL")
    if topic.startswith("$"):
        raise ProtocolError("topic", f"{_clip(repr(topic))} is reserved for the broker")
    try:
        size = len(topic.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise ProtocolError("topic", "is not valid UTF-8") from exc
    if size > _MAX_TOPIC_BYTES:
        raise ProtocolError("topic", f"is {size} bytes, the limit is {_MAX_TOPIC_BYTES}")
    if max_slashes is not None and topic.count("/") > max_slashes:
        raise ProtocolError("topic", f"{_clip(repr(topic))} has more than {max_slashes} slashes")
    return topic


def check_reply_topic(topic: object) -> str:
    """Return ``topic`` if the agent may publish an inference reply to it.

    Applies to the MQTT 5 response topic and to ``InferRequest.reply_to``. Our own namespace is
    refused so that a sensor cannot make an agent publish into the hub's topics.
    """
    topic = check_topic(topic, max_slashes=None)
    if topic == "edgeglm" or topic.startswith("edgeglm/"):
        raise ProtocolError("reply topic", f"{_clip(repr(topic))} is inside the edgeglm/ namespace")
    return topic


def _device_topic(device_id: str, kind: TopicKind) -> str:
    return check_topic(f"{PREFIX}/dev/{check_device_id(device_id)}/{kind}")


def status_topic(device_id: str) -> str:
    return _device_topic(device_id, TopicKind.STATUS)


def heartbeat_topic(device_id: str) -> str:
    return _device_topic(device_id, TopicKind.HEARTBEAT)


def desired_topic(device_id: str) -> str:
    return _device_topic(device_id, TopicKind.DESIRED)


def report_topic(device_id: str) -> str:
    return _device_topic(device_id, TopicKind.REPORT)


def data_topic(device_id: str) -> str:
    return _device_topic(device_id, TopicKind.DATA)


def infer_topic(device_id: str) -> str:
    return _device_topic(device_id, TopicKind.INFER)


def fetch_topic() -> str:
    return f"{PREFIX}/hub/fetch"


def site_infer_topic(site: str) -> str:
    """Inference topic shared by a site's agents: subscribe ``shared(..., group="agents")``."""
    return check_topic(f"{PREFIX}/site/{check_site(site)}/infer")


def device_filter(kind: TopicKind) -> str:
    """Wildcard filter matching ``kind`` for every device, e.g. ``edgeglm/v1/dev/+/status``."""
    if not isinstance(kind, str) or kind not in _DEVICE_KINDS:
        raise ProtocolError("topic kind", f"{_clip(repr(kind), 40)} is not a per-device kind")
    return f"{PREFIX}/dev/+/{kind}"


def shared(topic_filter: str, group: str = "hub") -> str:
    """MQTT 5 shared subscription: ``$share/{group}/{topic_filter}``; replicas split the traffic."""
    check_device_id(group, "share group")
    if (
        not isinstance(topic_filter, str)
        or not topic_filter
        or "\0" in topic_filter
        or topic_filter.startswith("$")
    ):
        raise ProtocolError("topic filter", f"{_clip(repr(topic_filter))} cannot be shared")
    if topic_filter.count("/") > MAX_TOPIC_SLASHES:
        raise ProtocolError("topic filter", f"has more than {MAX_TOPIC_SLASHES} slashes")
    return f"$share/{group}/{topic_filter}"


def hub_subscriptions(group: str = "hub") -> tuple[tuple[str, int], ...]:
    """``(filter, qos)`` for every topic a hub replica consumes, shared between replicas.

    Brokers send no retained messages to shared subscriptions: the hub learns state from the
    database, heartbeats and reports, never from a retained status alone.
    """
    kinds = (TopicKind.STATUS, TopicKind.HEARTBEAT, TopicKind.REPORT)
    subs = [(shared(device_filter(k), group), TOPIC_SPECS[k].qos) for k in kinds]
    return (*subs, (shared(fetch_topic(), group), TOPIC_SPECS[TopicKind.FETCH].qos))


def parse_device_topic(topic: object) -> tuple[str, TopicKind]:
    """``edgeglm/v1/dev/{id}/{kind}`` -> ``(id, kind)``; anything else is a ProtocolError."""
    if not isinstance(topic, str) or topic.count("/") > MAX_TOPIC_SLASHES:
        raise ProtocolError("topic", f"{_clip(repr(topic))} is not a device topic")
    levels = topic.split("/")
    if len(levels) != 5 or "/".join(levels[:3]) != f"{PREFIX}/dev":
        raise ProtocolError("topic", f"{_clip(repr(topic))} is not a device topic")
    device_id = check_device_id(levels[3])
    if levels[4] not in {k.value for k in _DEVICE_KINDS}:
        raise ProtocolError("topic", f"unknown device topic kind {_clip(repr(levels[4]), 40)}")
    return device_id, TopicKind(levels[4])


# ------------------------------------------------------------------------------ JSON messages

PROTOCOL_VERSION = 1
DEFAULT_MAX_MESSAGE_BYTES = 131072  # cloud IoT brokers' limit on one message
_MAX_REASON = 512
_MAX_PROMPT_CHARS = 65536

_Name = Name
_SemVer = SemVer
_Digest = Digest
_PieceHex = Annotated[str, StringConstraints(strict=True, pattern=r"^[0-9a-f]{64}$")]
_Step = Annotated[str, StringConstraints(strict=True, pattern=r"^[a-z][a-z0-9_]{0,31}$")]
_Short = Annotated[str, StringConstraints(strict=True, max_length=64)]
_Reason = Annotated[str, StringConstraints(strict=True, max_length=_MAX_REASON)]
_NonNeg = Annotated[float, Strict(), Field(ge=0, allow_inf_nan=False)]  # Strict still takes ints
_Ratio = Annotated[float, Strict(), Field(ge=0, le=1, allow_inf_nan=False)]
_Count = Annotated[int, Strict(), Field(ge=0, le=2**63 - 1)]
_TokenId = Annotated[int, Strict(), Field(ge=0, le=2**31 - 1)]


def _reply_topic_ok(topic: str) -> str:
    try:
        return check_reply_topic(topic)
    except ProtocolError as exc:
        raise ValueError(exc.why) from exc


_ReplyTopic = Annotated[str, StringConstraints(strict=True, max_length=1024), AfterValidator(_reply_topic_ok)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Message(_Body):
    """Base of every JSON message: a protocol version and a size limit."""

    MAX_BYTES: ClassVar[int] = 4096
    v: Annotated[int, Strict(), Field(ge=1, le=PROTOCOL_VERSION)] = PROTOCOL_VERSION


class Status(Message):
    """Who a device is and what it runs; retained, and the last will (``state="offline"``)."""

    MAX_BYTES = 2048
    device_id: _Name
    state: Literal["online", "offline"]
    profile: _Name
    model: _Name | None = None
    version: _SemVer | None = None
    slot: Literal["a", "b"] | None = None
    agent_version: _Short
    ts: _NonNeg


class Health(_Body):
    """Serving health over the last heartbeat window."""

    latency_p50_ms: _NonNeg
    latency_p95_ms: _NonNeg
    tokens_per_s: _NonNeg
    error_rate: _Ratio
    queue_depth: _Count
    rss_mb: _NonNeg
    requests: _Count
    errors: _Count
    smoke_agreement: _Ratio | None = None


class Heartbeat(Message):
    device_id: _Name
    ts: _NonNeg
    model: _Name | None = None
    version: _SemVer | None = None
    health: Health
    seq: _Count


class Desired(Message):
    """What the hub wants a device to run (retained on the device's desired topic)."""

    MAX_BYTES = 2048
    model: _Name
    version: _SemVer
    manifest_digest: _Digest
    rollout_id: RolloutId | None = None
    profile: _Name
    issued_at: _NonNeg


class Progress(_Body):
    bytes_done: _Count
    bytes_total: _Count
    pieces_done: _Count
    pieces_total: _Count

    @model_validator(mode="after")
    def _done_within_total(self) -> Self:
        if self.bytes_done > self.bytes_total or self.pieces_done > self.pieces_total:
            raise ValueError("done exceeds total")
        return self


UPDATE_SUCCEEDED = "committed"  # the step a device reports (ok) when the new version serves
UPDATE_FAILED = frozenset({"failed", "rolled_back"})  # terminal steps of an update that did not take


class Report(Message):
    """One update event. ``step`` is the update state machine's stable step name.

    ``step == UPDATE_SUCCEEDED`` with ``ok`` ends an update well; a step in ``UPDATE_FAILED``, or
    any report with ``ok`` false, ends it as a failure (``reason`` says why).

    Delivery is at least once: the hub makes reports idempotent by ``(rollout_id, step)``;
    ``seq`` orders the events of one device.
    """

    MAX_BYTES = 8192
    device_id: _Name
    rollout_id: RolloutId | None = None
    step: _Step
    seq: _Count
    ok: StrictBool
    reason: _Reason | None = None
    progress: Progress | None = None
    version: _SemVer
    ts: _NonNeg


class FetchRequest(Message):
    """Ask the hub for a manifest, or for pieces by a *recipe* of piece ids (hex BLAKE3-256).

    The hub answers with :class:`Frame` s on the device's data topic, correlated by
    ``request_id``; a device with more pieces to fetch sends several requests, ``window`` at a time.
    """

    MAX_BYTES = DEFAULT_MAX_MESSAGE_BYTES
    MAX_PIECES: ClassVar[int] = 1024  # 1024 ids keep a request well inside one 128 KiB message
    device_id: _Name
    request_id: _Name
    kind: Literal["manifest", "pieces"]
    model: _Name
    version: _SemVer
    profile: _Name
    have: Annotated[tuple[_SemVer, ...], Field(max_length=64)] = ()
    pieces: Annotated[tuple[_PieceHex, ...], Field(max_length=MAX_PIECES)] = ()
    window: Annotated[int, Strict(), Field(ge=1, le=256)] = 8

    @model_validator(mode="after")
    def _recipe_matches_kind(self) -> Self:
        if self.kind == "pieces" and not self.pieces:
            raise ValueError("kind 'pieces' needs a non-empty 'pieces' recipe")
        if self.kind == "manifest" and self.pieces:
            raise ValueError("kind 'manifest' takes no 'pieces'")
        if len(set(self.pieces)) != len(self.pieces):
            raise ValueError("'pieces' lists a piece twice")
        return self


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: Annotated[str, StringConstraints(strict=True, max_length=_MAX_PROMPT_CHARS)]


class InferRequest(Message):
    """A generation request: ``prompt`` or chat ``messages``, exactly one.

    MQTT 5 clients set the response topic and correlation data; MQTT 3.1.1 clients set
    ``reply_to`` and ``id`` instead. The agent checks the prompt against the context in tokens.
    """

    MAX_BYTES = 512 * 1024
    prompt: (
        Annotated[str, StringConstraints(strict=True, min_length=1, max_length=_MAX_PROMPT_CHARS)] | None
    ) = None
    messages: Annotated[tuple[ChatMessage, ...], Field(min_length=1, max_length=256)] | None = None
    model: _Name | None = None
    max_tokens: Annotated[int, Strict(), Field(ge=1, le=8192)] = 128
    temperature: _NonNeg = 0.0  # 0 = greedy
    top_k: Annotated[int, Strict(), Field(ge=0, le=1_000_000)] = 0  # 0 = off
    top_p: Annotated[float, Strict(), Field(gt=0, le=1, allow_inf_nan=False)] = 1.0
    repetition_penalty: Annotated[float, Strict(), Field(gt=0, allow_inf_nan=False)] = 1.0
    stop: Annotated[
        tuple[Annotated[str, StringConstraints(strict=True, min_length=1, max_length=256)], ...],
        Field(max_length=16),
    ] = ()
    seed: Annotated[int, Strict(), Field(ge=0, le=2**64 - 1)] | None = None
    stream: StrictBool = False
    id: Annotated[str, StringConstraints(strict=True, max_length=128)] | None = None
    reply_to: _ReplyTopic | None = None

    @model_validator(mode="after")
    def _one_input(self) -> Self:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("exactly one of 'prompt' and 'messages' is required")
        if self.messages and sum(len(m.content) for m in self.messages) > _MAX_PROMPT_CHARS:
            raise ValueError(f"messages hold more than {_MAX_PROMPT_CHARS} characters")
        return self


ErrorCode = Literal[
    "bad_request", "busy", "too_long", "unknown_model", "not_found", "unavailable", "internal", "timeout"
]


class ErrorBody(Message):
    """Why a request failed; in :class:`InferReply` and as the payload of an ERROR frame."""

    code: ErrorCode
    message: _Reason


class Usage(_Body):
    prompt_tokens: _Count
    completion_tokens: _Count
    cached_tokens: _Count = 0  # of prompt_tokens: KV reused from an earlier prompt, not prefilled


class Timings(_Body):
    queue_ms: _NonNeg
    prefill_ms: _NonNeg
    decode_ms: _NonNeg
    total_ms: _NonNeg


class InferReply(Message):
    """A reply, or one part of a streamed reply (``seq`` counts from 0; the last has ``done``)."""

    MAX_BYTES = 1024 * 1024
    id: Annotated[str, StringConstraints(strict=True, max_length=128)] | None = None
    seq: _Count = 0
    text: Annotated[str, StringConstraints(strict=True, max_length=131072)] = ""
    tokens: Annotated[tuple[_TokenId, ...], Field(max_length=8192)] = ()
    done: StrictBool = False
    finish_reason: Literal["stop", "length", "cancelled", "error"] | None = None
    usage: Usage | None = None
    timings: Timings | None = None
    error: ErrorBody | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.done != (self.finish_reason is not None):
            raise ValueError("'finish_reason' is set exactly when 'done' is true")
        if (self.error is not None) != (self.finish_reason == "error"):
            raise ValueError("'error' is set exactly when 'finish_reason' is 'error'")
        return self

    @classmethod
    def failure(cls, code: ErrorCode, message: str, *, id: str | None = None) -> InferReply:
        """The final reply for a request that failed."""
        body = ErrorBody(code=code, message=message[:_MAX_REASON])
        return cls(id=id, done=True, finish_reason="error", error=body)


M = TypeVar("M", bound=Message)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError("number out of range")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key in object")
    return obj


def _as_bytes(name: str, payload: object, limit: int) -> bytes:
    if isinstance(payload, str):
        if len(payload) > limit:
            raise ProtocolError(name, f"over the {limit}-byte limit", limit=limit)
        try:
            payload = payload.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ProtocolError(name, "not valid UTF-8") from exc
    elif isinstance(payload, memoryview):
        try:
            if payload.nbytes > limit:
                raise ProtocolError(name, f"{payload.nbytes} bytes is over the {limit}-byte limit")
            payload = payload.tobytes()
        except ValueError as exc:  # a released view
            raise ProtocolError(name, "payload is not readable") from exc
    elif not isinstance(payload, bytes | bytearray):
        raise ProtocolError(name, f"payload must be bytes or str, not {type(payload).__name__}")
    data = bytes(payload)
    if len(data) > limit:
        raise ProtocolError(name, f"{len(data)} bytes is over the {limit}-byte limit", limit=limit)
    return data


def decode(model_cls: type[M], payload: bytes | bytearray | memoryview | str) -> M:
    """Parse one message; raises :class:`ProtocolError` and nothing else, whatever the input."""
    name = model_cls.__name__
    data = _as_bytes(name, payload, model_cls.MAX_BYTES)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(name, f"not valid UTF-8 at byte {exc.start}") from exc
    try:
        obj = json.loads(
            text, parse_constant=_reject_constant, parse_float=_finite_float, object_pairs_hook=_unique_keys
        )
    except RecursionError as exc:
        raise ProtocolError(name, "JSON nested too deeply") from exc
    except ValueError as exc:
        raise ProtocolError(name, _clip(f"not valid JSON: {exc}")) from exc
    if not isinstance(obj, dict):
        raise ProtocolError(name, f"expected a JSON object, got {type(obj).__name__}")
    version = obj.get("v", PROTOCOL_VERSION)
    if type(version) is not int or version < 1:
        raise ProtocolError(name, "field 'v': must be a positive integer", field="v")
    if version > PROTOCOL_VERSION:
        raise ProtocolError(
            name,
            _clip(f"unsupported version {version}; this build speaks {PROTOCOL_VERSION}"),
            field="v",
        )
    try:
        return model_cls.model_validate(obj)
    except ValidationError as exc:
        err = exc.errors(include_url=False, include_context=False, include_input=False)[0]
        loc = ".".join(str(p) for p in err["loc"])
        why = err["msg"].removeprefix("Value error, ")
        why = f"field {loc!r}: {why}" if loc else why
        raise ProtocolError(name, _clip(why, 200), field=loc or None) from exc


def encode(msg: Message) -> bytes:
    """Compact UTF-8 JSON; ``None`` fields are left out (they are the defaults)."""
    data = msg.model_dump_json(exclude_none=True).encode("utf-8")
    if len(data) > msg.MAX_BYTES:
        raise ProtocolError(type(msg).__name__, f"{len(data)} bytes is over the {msg.MAX_BYTES}-byte limit")
    return data


# ------------------------------------------------------------------------------------- frames


class PieceEncoding(IntEnum):
    """How a piece's bytes are encoded in a frame (the codec lives elsewhere)."""

    RAW = 0  # the bytes themselves
    ZSTD = 1
    PLANES_ZSTD = 2  # byte planes of element_width, then zstd
    XOR_ZSTD = 3  # XOR against the base piece, byte planes, zstd (float deltas)
    SUB_ZSTD = 4  # wrapping subtraction against the base, byte planes, zstd (integer deltas)
    SUB4_ZSTD = 5  # nibble-wise wrapping subtraction (packed 4-bit ints), byte planes, zstd


class FrameKind(IntEnum):
    PIECE = 0
    MANIFEST = 1
    ERROR = 2  # payload: an ErrorBody as UTF-8 JSON


DELTA_ENCODINGS = frozenset({PieceEncoding.XOR_ZSTD, PieceEncoding.SUB_ZSTD, PieceEncoding.SUB4_ZSTD})
_UNPLANED = frozenset({PieceEncoding.RAW, PieceEncoding.ZSTD})
MAX_PIECE_SIZE = 64 * 1024 * 1024
_MAX_ENCODED_SIZE = MAX_PIECE_SIZE + MAX_PIECE_SIZE // 64  # room for zstd's worst-case growth
_MAX_PARTS = 65536
_HEAD = struct.Struct("<3sBBBBBIIQQQI32s32s")  # the header up to the digest
FRAME_HEADER_SIZE = _HEAD.size + 32
_MAGIC = b"EGF"
_FRAME_VERSION = 1
_FLAG_BASE = 1
_NO_ID = bytes(32)


def _is_id(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == 32


def _int(value: object, what: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise ProtocolError("frame", f"{what} must be an integer in [{low}, {high}], not {value!r}")
    return value


@dataclass(frozen=True, kw_only=True, slots=True)
class Frame:
    """One data message: a part of an encoded piece, a manifest, or an error.

    ``payload`` is bytes ``offset .. offset+len`` of the encoded stream of ``encoded_size`` bytes,
    which decodes to ``piece_size`` bytes whose BLAKE3-256 is ``piece_id``.
    """

    kind: FrameKind
    encoding: PieceEncoding
    piece_id: bytes
    piece_size: int
    encoded_size: int
    payload: bytes = field(repr=False)
    element_width: int = 0
    base_id: bytes | None = None
    part: int = 0
    parts: int = 1
    offset: int = 0

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "kind", FrameKind(self.kind))
            object.__setattr__(self, "encoding", PieceEncoding(self.encoding))
        except (ValueError, TypeError) as exc:
            raise ProtocolError("frame", f"unknown kind or encoding: {exc}") from exc
        if not isinstance(self.payload, bytes | bytearray):
            raise ProtocolError("frame", "payload must be bytes")
        object.__setattr__(self, "payload", bytes(self.payload))
        if not _is_id(self.piece_id) or not (self.base_id is None or _is_id(self.base_id)):
            raise ProtocolError("frame", "piece_id and base_id must be 32 bytes")
        if (self.base_id is not None) != (self.encoding in DELTA_ENCODINGS):
            raise ProtocolError("frame", "base_id is required for delta encodings, and only for them")
        if _int(self.element_width, "element_width", 0, 8) not in (0, 1, 2, 4, 8):
            raise ProtocolError("frame", f"element_width must be 0, 1, 2, 4 or 8, not {self.element_width}")
        if (self.element_width == 0) != (self.encoding in _UNPLANED):
            raise ProtocolError(
                "frame", f"element_width {self.element_width} does not fit {self.encoding.name}"
            )
        if self.kind is FrameKind.MANIFEST and self.encoding not in _UNPLANED:
            raise ProtocolError("frame", "a manifest is sent RAW or ZSTD")
        size = len(self.payload)
        if self.kind is FrameKind.ERROR and (
            self.encoding is not PieceEncoding.RAW or self.parts != 1 or size > ErrorBody.MAX_BYTES
        ):
            raise ProtocolError("frame", "an error is one small RAW part")
        _int(self.piece_size, "piece_size", 0, MAX_PIECE_SIZE)
        encoded = _int(self.encoded_size, "encoded_size", 0, _MAX_ENCODED_SIZE)
        if self.encoding is PieceEncoding.RAW and encoded != self.piece_size:
            raise ProtocolError("frame", "a RAW piece's encoded_size must equal its piece_size")
        parts = _int(self.parts, "parts", 1, min(_MAX_PARTS, max(1, encoded)))
        part = _int(self.part, "part", 0, parts - 1)
        end = _int(self.offset, "offset", 0, encoded) + size
        if (
            end > encoded
            or (size == 0 and encoded > 0)
            or (part == 0 and self.offset != 0)
            or ((part == parts - 1) != (end == encoded))
        ):
            raise ProtocolError(
                "frame", f"part {part}/{parts} at {self.offset}+{size} does not fit {encoded}"
            )

    def pack(self) -> bytes:
        """The frame as bytes: header, digest, payload."""
        head = _HEAD.pack(
            _MAGIC,
            _FRAME_VERSION,
            self.kind,
            self.encoding,
            self.element_width,
            _FLAG_BASE if self.base_id is not None else 0,
            self.part,
            self.parts,
            self.piece_size,
            self.encoded_size,
            self.offset,
            len(self.payload),
            self.piece_id,
            self.base_id or _NO_ID,
        )
        digest = blake3(head)
        digest.update(self.payload)
        return b"".join((head, digest.digest(), self.payload))

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview, *, max_bytes: int | None = None) -> Frame:
        """Parse and check a packed frame; raises :class:`ProtocolError` and nothing else."""
        limit = FRAME_HEADER_SIZE + _MAX_ENCODED_SIZE if max_bytes is None else max_bytes
        if isinstance(data, memoryview):
            try:
                if data.nbytes > limit:
                    raise ProtocolError("frame", f"{data.nbytes} bytes is over the {limit}-byte limit")
                data = data.tobytes()
            except ValueError as exc:
                raise ProtocolError("frame", "payload is not readable") from exc
        if not isinstance(data, bytes | bytearray):
            raise ProtocolError("frame", f"must be bytes, not {type(data).__name__}")
        if len(data) > limit:
            raise ProtocolError("frame", f"{len(data)} bytes is over the {limit}-byte limit")
        if len(data) < FRAME_HEADER_SIZE:
            raise ProtocolError(
                "frame", f"truncated: {len(data)} bytes, the header alone is {FRAME_HEADER_SIZE}"
            )
        magic, version, kind, enc, width, flags, part, parts, piece_size, encoded, offset, size, pid, bid = (
            _HEAD.unpack_from(data)
        )
        if magic != _MAGIC:
            raise ProtocolError("frame", "bad magic; not an EdgeGLM frame")
        if version != _FRAME_VERSION:
            raise ProtocolError("frame", f"unsupported frame version {version}")
        if size != len(data) - FRAME_HEADER_SIZE:
            raise ProtocolError(
                "frame", f"header says {size} payload bytes, {len(data) - FRAME_HEADER_SIZE} came"
            )
        digest = blake3(data[: _HEAD.size])
        digest.update(data[FRAME_HEADER_SIZE:])
        if digest.digest() != data[_HEAD.size : FRAME_HEADER_SIZE]:
            raise ProtocolError("frame", "digest mismatch: the frame is corrupt")
        if flags & ~_FLAG_BASE or (not flags and bid != _NO_ID):
            raise ProtocolError("frame", f"bad flags {flags:#x}")
        try:
            kind, enc = FrameKind(kind), PieceEncoding(enc)
        except ValueError as exc:
            raise ProtocolError("frame", f"unknown kind {kind} or encoding {enc}") from exc
        return cls(
            kind=kind,
            encoding=enc,
            element_width=width,
            piece_id=pid,
            base_id=bid if flags else None,
            part=part,
            parts=parts,
            piece_size=piece_size,
            encoded_size=encoded,
            offset=offset,
            payload=bytes(data[FRAME_HEADER_SIZE:]),
        )


def split_payload(
    kind: FrameKind,
    encoding: PieceEncoding,
    *,
    piece_id: bytes,
    piece_size: int,
    payload: bytes,
    element_width: int = 0,
    base_id: bytes | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> list[Frame]:
    """Split an encoded payload into frames whose packed size is at most ``max_message_bytes``.

    That is the MQTT payload; leave headroom for topic and properties where a broker limits packets.
    """
    room = max_message_bytes - FRAME_HEADER_SIZE
    if room < 1:
        raise ProtocolError("frame", f"max_message_bytes must exceed the {FRAME_HEADER_SIZE}-byte header")
    starts = range(0, len(payload), room) if payload else range(1)
    return [
        Frame(
            kind=kind,
            encoding=encoding,
            element_width=element_width,
            piece_id=piece_id,
            base_id=base_id,
            part=i,
            parts=len(starts),
            piece_size=piece_size,
            encoded_size=len(payload),
            offset=start,
            payload=payload[start : start + room],
        )
        for i, start in enumerate(starts)
    ]


def error_frame(body: ErrorBody, piece_id: bytes = _NO_ID) -> Frame:
    """An ERROR frame answering a fetch (``piece_id``: the piece that failed, zeros for none)."""
    payload = encode(body)
    return Frame(
        kind=FrameKind.ERROR,
        encoding=PieceEncoding.RAW,
        piece_id=piece_id,
        piece_size=len(payload),
        encoded_size=len(payload),
        payload=payload,
    )


class FrameAssembler:
    """Collects the parts of one piece or manifest in any order; duplicates are ignored."""

    def __init__(self) -> None:
        self._first: Frame | None = None
        self._parts: dict[int, Frame] = {}
        self._received = 0

    @property
    def complete(self) -> bool:
        return self._first is not None and len(self._parts) == self._first.parts

    def missing(self) -> list[int]:
        """Indexes of the parts not yet received (empty before the first part)."""
        total = self._first.parts if self._first is not None else 0
        return [i for i in range(total) if i not in self._parts]

    def add(self, frame: Frame) -> bytes | None:
        """Add a part; returns the whole encoded payload once, when the last part arrives."""
        first = self._first or frame
        if _identity(frame) != _identity(first):
            raise ProtocolError("frame", "part does not belong to the piece being assembled")
        seen = self._parts.get(frame.part)
        if seen is not None:
            if (seen.offset, seen.payload) != (frame.offset, frame.payload):
                raise ProtocolError("frame", f"part {frame.part} arrived twice with different bytes")
            return None
        if self._received + len(frame.payload) > frame.encoded_size:
            raise ProtocolError("frame", "parts overlap: more bytes than the encoded size")
        self._first = first
        self._parts[frame.part] = frame
        self._received += len(frame.payload)
        if not self.complete:
            return None
        position = 0
        for i in range(frame.parts):
            if self._parts[i].offset != position:
                raise ProtocolError(
                    "frame", f"part {i} starts at {self._parts[i].offset}, expected {position}"
                )
            position += len(self._parts[i].payload)
        return b"".join(self._parts[i].payload for i in range(frame.parts))


def _identity(frame: Frame) -> tuple[object, ...]:
    return (
        frame.kind,
        frame.encoding,
        frame.element_width,
        frame.piece_id,
        frame.base_id,
        frame.parts,
        frame.piece_size,
        frame.encoded_size,
    )
