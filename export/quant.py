"""Blockwise weight-only quantization in the layout of ONNX Runtime's ``MatMulNBits``.

A linear weight ``W`` of shape ``[N, K]`` (out, in — as Hugging Face stores it) is cut along K
into blocks of ``block_size``; each block gets a float scale and an unsigned zero point
(asymmetric, so skewed blocks lose less), and ``w ≈ (q - zero_point) * scale``::

    B            uint8 [N, k_blocks, block_size * bits / 8]   4 bits: element 2j low nibble, 2j+1 high
    scales       float [N * k_blocks]
    zero_points  uint8 [N * ceil(k_blocks * bits / 8)]        4 bits: two per byte, low nibble first

K is zero-padded to a whole number of blocks. Rows are processed in slabs so memory stays near
the size of the weight itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["QuantizedWeight", "dequantize", "quantize_blockwise"]

_SLAB_ROWS = 4096


@dataclass(frozen=True)
class QuantizedWeight:
    packed: np.ndarray  # uint8 [N, k_blocks, blob]
    scales: np.ndarray  # float32 [N * k_blocks]
    zero_points: np.ndarray  # uint8, packed as MatMulNBits expects
    n: int
    k: int
    bits: int
    block_size: int


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """Pack the last axis (even length) two 4-bit values per byte, low nibble first."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def quantize_blockwise(weight: np.ndarray, bits: int, block_size: int) -> QuantizedWeight:
    if bits not in (4, 8):
        raise ValueError("bits must be 4 or 8")
    n, k = weight.shape
    k_blocks = -(-k // block_size)
    qmax = (1 << bits) - 1
    packed_parts, scale_parts, zp_parts = [], [], []
    for start in range(0, n, _SLAB_ROWS):
        w = weight[start : start + _SLAB_ROWS].astype(np.float32, copy=False)
        if k_blocks * block_size != k:
            w = np.pad(w, ((0, 0), (0, k_blocks * block_size - k)))
        blocks = w.reshape(w.shape[0], k_blocks, block_size)
        lo = np.minimum(blocks.min(axis=2), 0.0)
        hi = np.maximum(blocks.max(axis=2), 0.0)
        scale = (hi - lo) / qmax
        scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
        zp = np.clip(np.rint(-lo / scale), 0, qmax).astype(np.uint8)
        q = np.clip(np.rint(blocks / scale[..., None]) + zp[..., None], 0, qmax).astype(np.uint8)
        if bits == 4:
            packed_parts.append(_pack_nibbles(q))
            zp_rows = zp if k_blocks % 2 == 0 else np.pad(zp, ((0, 0), (0, 1)))
            zp_parts.append(_pack_nibbles(zp_rows).reshape(-1))
        else:
            packed_parts.append(q)
            zp_parts.append(zp.reshape(-1))
        scale_parts.append(scale.reshape(-1))
    return QuantizedWeight(
        packed=np.concatenate(packed_parts),
        scales=np.concatenate(scale_parts),
        zero_points=np.concatenate(zp_parts),
        n=n,
        k=k,
        bits=bits,
        block_size=block_size,
    )


def dequantize(qw: QuantizedWeight) -> np.ndarray:
    """Back to float32 ``[N, K]`` (the reference the tests compare MatMulNBits against)."""
    k_blocks = qw.packed.shape[1]
    if qw.bits == 4:
        q = np.empty((qw.n, k_blocks, qw.block_size), np.uint8)
        q[..., 0::2] = qw.packed & 0x0F
        q[..., 1::2] = qw.packed >> 4
        zp_bytes = qw.zero_points.reshape(qw.n, -1)
        zp = np.empty((qw.n, zp_bytes.shape[1] * 2), np.uint8)
        zp[:, 0::2] = zp_bytes & 0x0F
        zp[:, 1::2] = zp_bytes >> 4
        zp = zp[:, :k_blocks]
    else:
        q = qw.packed
        zp = qw.zero_points.reshape(qw.n, k_blocks)
    scales = qw.scales.reshape(qw.n, k_blocks)
    w = (q.astype(np.float32) - zp[..., None]) * scales[..., None]
    return w.reshape(qw.n, -1)[:, : qw.k]
