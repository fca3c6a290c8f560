"""Tensor delta codec: lossless round trips for every dtype, and hostile payloads rejected."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeglm.errors import IntegrityError
from edgeglm.protocol import PieceEncoding
from edgeglm.tensor_delta import decode, delta_kind, encode, encode_delta, encode_raw

DTYPES = [
    "float32",
    "float16",
    "bfloat16",
    "float64",
    "int8",
    "uint8",
    "int16",
    "int32",
    "int64",
    "int4",
    None,
]


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_with_and_without_base(dtype):
    rng = np.random.default_rng(0)
    base = rng.bytes(4096)
    new = bytearray(base)
    for i in rng.choice(4096, 300, replace=False):
        new[i] ^= 1
    new = bytes(new)
    for enc in (
        encode(new, dtype=dtype, base=base),
        encode(new, dtype=dtype),
        encode_delta(new, base, dtype=dtype),
    ):
        assert decode(enc.encoding, enc.width, enc.payload, len(new), base if enc.is_delta else None) == new


def test_float_finetune_delta_beats_plain_compression():
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.02, 1 << 18).astype(np.float32)
    w2 = (w + rng.normal(0, 2e-4, w.size)).astype(np.float32)
    delta = encode(w2.tobytes(), dtype="float32", base=w.tobytes())
    raw = encode_raw(w2.tobytes(), dtype="float32")
    assert delta.encoding == PieceEncoding.XOR_ZSTD and delta.width == 4
    assert len(delta.payload) < 0.8 * len(raw.payload)


def test_int8_requantized_delta_is_small():
    rng = np.random.default_rng(2)
    q = rng.integers(-127, 128, 1 << 18).astype(np.int8)
    q2 = np.clip(q.astype(np.int16) + rng.integers(-1, 2, q.size) * (rng.random(q.size) < 0.2), -127, 127)
    delta = encode(q2.astype(np.int8).tobytes(), dtype="int8", base=q.tobytes())
    assert delta.encoding == PieceEncoding.SUB_ZSTD
    assert len(delta.payload) < 0.25 * q.nbytes


def test_packed_int4_uses_nibble_subtraction():
    assert delta_kind("int4") == (PieceEncoding.SUB4_ZSTD, 1)
    base = bytes([0x0F, 0xF0, 0x88, 0x00])
    new = bytes([0x00, 0x01, 0x97, 0xFF])
    enc = encode_delta(new, base, dtype="int4")
    assert decode(enc.encoding, 1, enc.payload, 4, base) == new


def test_incompressible_piece_is_sent_raw_never_bigger():
    data = np.random.default_rng(3).bytes(1000)
    enc = encode(data, dtype="uint8")
    assert enc.encoding == PieceEncoding.RAW and enc.payload == data


def test_decompression_bomb_is_bounded():
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (64 << 20))
    with pytest.raises(IntegrityError, match="decoded to"):
        decode(PieceEncoding.ZSTD, 0, bomb, 1024)


@pytest.mark.parametrize(
    ("encoding", "width", "payload", "size", "base", "match"),
    [
        (99, 1, b"x", 1, None, "unknown encoding"),
        (PieceEncoding.RAW, 1, b"abc", 3, None, "element width"),
        (PieceEncoding.PLANES_ZSTD, 3, b"abc", 3, None, "element width"),
        (PieceEncoding.PLANES_ZSTD, 4, b"abcdef", 6, None, "element width"),
        (PieceEncoding.RAW, 0, b"abc", 4, None, "decoded to 3"),
        (PieceEncoding.ZSTD, 0, b"not zstd at all", 4, None, "does not decode"),
        (PieceEncoding.XOR_ZSTD, 1, zstandard.ZstdCompressor().compress(b"abcd"), 4, None, "base"),
        (PieceEncoding.SUB_ZSTD, 1, zstandard.ZstdCompressor().compress(b"abcd"), 4, b"ab", "base"),
    ],
)
def test_bad_payloads_raise_integrity_error(encoding, width, payload, size, base, match):
    with pytest.raises(IntegrityError, match=match):
        decode(encoding, width, payload, size, base)


@settings(max_examples=200, deadline=None)
@given(
    encoding=st.integers(0, 7),
    width=st.sampled_from([0, 1, 2, 3, 4, 8]),
    payload=st.binary(max_size=300),
    size=st.integers(0, 400),
    base=st.none() | st.binary(max_size=400),
)
def test_decode_never_raises_anything_but_integrity_error(encoding, width, payload, size, base):
    with contextlib.suppress(IntegrityError):
        decode(encoding, width, payload, size, base)


@settings(max_examples=100, deadline=None)
@given(
    data=st.binary(min_size=0, max_size=2000),
    flips=st.lists(st.integers(0, 1999), max_size=20),
    dtype=st.sampled_from(DTYPES),
)
def test_round_trip_property(data, flips, dtype):
    new = bytearray(data)
    for f in flips:
        if new:
            new[f % len(new)] ^= 0x5A
    enc = encode(bytes(new), dtype=dtype, base=data)
    assert decode(enc.encoding, enc.width, enc.payload, len(new), data) == bytes(new)
