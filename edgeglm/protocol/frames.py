"""Binary data frames: a part of an encoded piece, a manifest or an error, with its 140-byte header.

The header's layout is in the package docstring (:mod:`edgeglm.protocol`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum

from blake3 import blake3

from edgeglm.errors import ProtocolError
from edgeglm.protocol.error_body import ErrorBody
from edgeglm.protocol.message import DEFAULT_MAX_MESSAGE_BYTES, encode

__all__ = [
    "DELTA_ENCODINGS",
    "FRAME_HEADER_SIZE",
    "MAX_PIECE_SIZE",
    "Frame",
    "FrameAssembler",
    "FrameKind",
    "PieceEncoding",
    "error_frame",
    "max_encoded_size",
    "split_payload",
]


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


def max_encoded_size(encoding: PieceEncoding, piece_size: int) -> int:
    """The most bytes ``encoding`` may need for a piece of ``piece_size`` bytes.

    RAW is the piece itself. Every other encoding is one zstd frame of ``piece_size`` bytes
    (byte planes and deltas keep the size), and zstd never needs more than its
    ``ZSTD_COMPRESSBOUND(s) = s + s/256 + (128 KiB - s)/2048 (below 128 KiB)``, that is at most
    ``s + s/256 + 64``; we allow ``s + s/64 + 128``, a margin over it for any conforming encoder.
    A receiver refuses a frame that declares more, before buffering a byte of it.
    """
    if encoding is PieceEncoding.RAW:
        return piece_size
    return piece_size + piece_size // 64 + 128


_MAX_ENCODED_SIZE = max_encoded_size(PieceEncoding.ZSTD, MAX_PIECE_SIZE)
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
