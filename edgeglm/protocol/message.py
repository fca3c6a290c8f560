"""The base of every JSON message: protocol version, size limit, bounded field types, decode and encode.

Unknown fields are ignored, every string and list is bounded and each class has a ``MAX_BYTES``.
:func:`decode` turns *any* input into a message or a :class:`~edgeglm.errors.ProtocolError`;
:func:`encode` writes compact UTF-8 JSON.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field, Strict, StringConstraints, ValidationError

from edgeglm import strict_json
from edgeglm.errors import ProtocolError
from edgeglm.protocol.topics import _clip

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "PROTOCOL_VERSION",
    "Message",
    "decode",
    "encode",
]

PROTOCOL_VERSION = 1
DEFAULT_MAX_MESSAGE_BYTES = 131072  # cloud IoT brokers' limit on one message
_MAX_REASON = 512

_Reason = Annotated[str, StringConstraints(strict=True, max_length=_MAX_REASON)]
_NonNeg = Annotated[float, Strict(), Field(ge=0, allow_inf_nan=False)]  # Strict still takes ints
_Count = Annotated[int, Strict(), Field(ge=0, le=2**63 - 1)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Message(_Body):
    """Base of every JSON message: a protocol version and a size limit."""

    MAX_BYTES: ClassVar[int] = 4096
    v: Annotated[int, Strict(), Field(ge=1, le=PROTOCOL_VERSION)] = PROTOCOL_VERSION


M = TypeVar("M", bound=Message)


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
        obj = strict_json.loads(text)
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
