"""Tensor delta: encode a piece against the same piece of an older version, losslessly.

Fine-tuning changes weights a little; the bit patterns of old and new values share their sign,
exponent and top mantissa bits. So for a piece whose base (same tensor, same slice, same size)
the receiver already holds::

    floats  : d = new XOR old         (as unsigned ints of the element width)
    integers: d = new - old           (wrapping, as unsigned ints of the element width)
    int4 x2 : d = new - old per nibble (packed 4-bit weights)
    then    : byte planes — byte 0 of every element, then byte 1, ... (the near-zero high
              bytes end up together) — then zstd.

Without a base, a piece is sent as plain zstd or byte planes + zstd. Every candidate is tried and
the smallest wins; ``RAW`` (no compression) is the floor, so encoding never grows a piece by more
than nothing. Decoding checks sizes and never decompresses past the piece size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import zstandard

from edgeglm.errors import IntegrityError
from edgeglm.protocol import DELTA_ENCODINGS, PieceEncoding

__all__ = ["Encoded", "decode", "delta_kind", "encode", "encode_delta", "encode_raw"]

_FLOATS = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
_INTS = {"int8": 1, "uint8": 1, "bool": 1, "int16": 2, "uint16": 2, "int32": 4, "uint32": 4}
_INTS |= {"int64": 8, "uint64": 8}
_NIBBLES = {"int4", "uint4"}
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


@dataclass(frozen=True)
class Encoded:
    """A piece as it travels: how it was encoded and the bytes that go on the wire.

    ``width`` is the element width of the byte planes (1, 2, 4, 8); 0 for RAW and ZSTD.
    """

    encoding: PieceEncoding
    width: int
    payload: bytes

    @property
    def is_delta(self) -> bool:
        return self.encoding in DELTA_ENCODINGS


def delta_kind(dtype: str | None) -> tuple[PieceEncoding, int]:
    """The delta encoding and element width for a tensor dtype (XOR for floats, SUB otherwise)."""
    if dtype in _FLOATS:
        return PieceEncoding.XOR_ZSTD, _FLOATS[dtype]
    if dtype in _INTS:
        return PieceEncoding.SUB_ZSTD, _INTS[dtype]
    if dtype in _NIBBLES:
        return PieceEncoding.SUB4_ZSTD, 1
    return PieceEncoding.XOR_ZSTD, 1


def _planes(data: bytes | np.ndarray, width: int) -> bytes:
    raw = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data.view(np.uint8)
    if width == 1:
        return raw.tobytes()
    return raw.reshape(-1, width).T.tobytes()


def _unplanes(data: bytes, width: int) -> bytes:
    if width == 1:
        return data
    return np.frombuffer(data, np.uint8).reshape(width, -1).T.tobytes()


def _diff(encoding: PieceEncoding, width: int, new: bytes, old: bytes) -> np.ndarray:
    a = np.frombuffer(new, _UINT[width])
    b = np.frombuffer(old, _UINT[width])
    out: np.ndarray
    if encoding == PieceEncoding.XOR_ZSTD:
        out = a ^ b
    elif encoding == PieceEncoding.SUB_ZSTD:
        out = a - b  # unsigned arithmetic wraps
    else:
        out = ((a - b) & 0x0F) | ((((a >> 4) - (b >> 4)) & 0x0F) << 4)
    return out


def _undiff(encoding: PieceEncoding, width: int, delta: bytes, old: bytes) -> bytes:
    d = np.frombuffer(delta, _UINT[width])
    b = np.frombuffer(old, _UINT[width])
    out: np.ndarray
    if encoding == PieceEncoding.XOR_ZSTD:
        out = d ^ b
    elif encoding == PieceEncoding.SUB_ZSTD:
        out = d + b
    else:
        out = (((d + b) & 0x0F) | ((((d >> 4) + (b >> 4)) & 0x0F) << 4)).astype(np.uint8)
    return out.tobytes()


def _element(dtype: str | None, size: int) -> tuple[PieceEncoding, int]:
    encoding, width = delta_kind(dtype)
    if width > 1 and size % width:
        return encoding, 1  # a slice that does not hold whole elements: bytewise
    return encoding, width


def encode_raw(data: bytes, *, dtype: str | None = None, level: int = 3) -> Encoded:
    """The smallest stand-alone encoding of ``data``: RAW, ZSTD or (multi-byte elements) planes."""
    zc = zstandard.ZstdCompressor(level=level)
    best = Encoded(PieceEncoding.RAW, 0, bytes(data))
    _, width = _element(dtype, len(data))
    candidates = [(PieceEncoding.ZSTD, 0, data)]
    if width > 1:
        candidates.append((PieceEncoding.PLANES_ZSTD, width, _planes(data, width)))
    for encoding, w, body in candidates:
        payload = zc.compress(body)
        if len(payload) < len(best.payload):
            best = Encoded(encoding, w, payload)
    return best


def encode_delta(data: bytes, base: bytes, *, dtype: str | None = None, level: int = 3) -> Encoded:
    """``data`` as a tensor delta against ``base`` (same size): XOR / SUB / SUB4, planes, zstd."""
    if len(base) != len(data):
        raise ValueError("a delta needs a base of the same size")
    encoding, width = _element(dtype, len(data))
    body = _planes(_diff(encoding, width, data, base), width)
    return Encoded(encoding, width, zstandard.ZstdCompressor(level=level).compress(body))


def encode(data: bytes, *, dtype: str | None = None, base: bytes | None = None, level: int = 3) -> Encoded:
    """The smallest encoding of ``data``; a delta is tried when ``base`` has the same size."""
    best = encode_raw(data, dtype=dtype, level=level)
    if base is not None and len(base) == len(data):
        delta = encode_delta(data, base, dtype=dtype, level=level)
        if len(delta.payload) < len(best.payload):
            best = delta
    return best


def decode(
    encoding: PieceEncoding | int,
    width: int,
    payload: bytes,
    size: int,
    base: bytes | None = None,
) -> bytes:
    """Rebuild a piece of ``size`` bytes. Raises IntegrityError on any inconsistency."""
    try:
        encoding = PieceEncoding(encoding)
    except ValueError as exc:
        raise IntegrityError("piece", f"unknown encoding {encoding}") from exc
    unplaned = encoding in (PieceEncoding.RAW, PieceEncoding.ZSTD)
    if (width != 0) if unplaned else (width not in _UINT or size % width):
        raise IntegrityError("piece", f"element width {width} does not fit {encoding.name} of {size} bytes")
    if encoding == PieceEncoding.RAW:
        body = payload
    else:
        try:  # a bounded read: a frame header claiming a huge size cannot make us allocate it
            with zstandard.ZstdDecompressor().stream_reader(payload) as reader:
                body = reader.read(size + 1)
        except zstandard.ZstdError as exc:
            raise IntegrityError("piece", f"zstd payload does not decode: {exc}") from exc
    if len(body) != size:
        raise IntegrityError("piece", f"decoded to {len(body)} bytes, expected {size}")
    if unplaned:
        return bytes(body)
    body = _unplanes(body, width)
    if encoding == PieceEncoding.PLANES_ZSTD:
        return body
    if base is None or len(base) != size:
        raise IntegrityError("piece", "a delta needs its base piece of the same size")
    return _undiff(encoding, width, body, base)
