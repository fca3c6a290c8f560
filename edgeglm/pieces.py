"""Pieces: how a bundle file is cut into the units of transfer.

Two layouts (PRODUCT.md section 5):

* ``tensors`` — an ONNX external-data file. Each tensor is cut into slices of at most
  ``piece_bytes`` (1 MiB) measured from the *tensor's own start*; bytes between tensors (alignment
  padding) become ``gap`` segments cut the same way. A changed tensor never drags its neighbours
  along, and an inserted tensor does not shift the pieces of the tensors after it::

      file:    | tensor a (2.5 MiB)            |pad| tensor b (0.3 MiB) |
      pieces:  | a#0 1MiB | a#1 1MiB | a#2 .5 |gap| b#0               |

* ``cdc`` — any other file: FastCDC content-defined chunks (~16 KiB average).

A piece id is the BLAKE3-256 of the piece's raw bytes, as 64 lowercase hex characters. Cutting is
deterministic, so the segment list is derived from the (tensor table, file size, piece size)
recorded in the manifest and never has to be listed twice.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import blake3
from fastcdc import fastcdc

from edgeglm.errors import IntegrityError

__all__ = [
    "DEFAULT_CDC_AVG_BYTES",
    "DEFAULT_PIECE_BYTES",
    "Segment",
    "TensorSpan",
    "cdc_segments",
    "digest_bytes",
    "piece_id",
    "read_segments",
    "tensor_segments",
]

DEFAULT_PIECE_BYTES = 1 << 20
DEFAULT_CDC_AVG_BYTES = 16 << 10


def piece_id(data: bytes | bytearray | memoryview) -> str:
    """BLAKE3-256 of ``data`` as lowercase hex: the id of a piece."""
    return blake3.blake3(data).hexdigest()


def digest_bytes(data: bytes | bytearray | memoryview) -> str:
    """The ``blake3:<hex>`` digest string used for files and manifests."""
    return "blake3:" + piece_id(data)


@dataclass(frozen=True)
class TensorSpan:
    """Where one tensor lives in an external-data file."""

    name: str
    dtype: str
    offset: int
    length: int


@dataclass(frozen=True)
class Segment:
    """A byte range of a file that becomes one piece.

    ``tensor`` is the tensor name (None for gaps and CDC chunks) and ``index`` the slice number
    within that tensor; ``(tensor, index)`` is what a delta base is matched on.
    """

    offset: int
    size: int
    tensor: str | None = None
    dtype: str | None = None
    index: int = 0


def tensor_segments(
    spans: Sequence[TensorSpan], file_size: int, piece_bytes: int = DEFAULT_PIECE_BYTES
) -> list[Segment]:
    """Tensor-relative segments covering ``[0, file_size)`` exactly.

    Spans must lie inside the file and must not overlap (tensors that share bytes — ONNX allows
    it — are rejected, since a piece would then belong to two tensors).
    """
    if piece_bytes <= 0:
        raise ValueError("piece_bytes must be positive")
    segments: list[Segment] = []

    def cut(start: int, length: int, tensor: str | None, dtype: str | None) -> None:
        for i, off in enumerate(range(start, start + length, piece_bytes)):
            segments.append(Segment(off, min(piece_bytes, start + length - off), tensor, dtype, i))

    pos = 0
    for span in sorted(spans, key=lambda s: s.offset):
        if span.length == 0:
            continue
        if span.offset < pos or span.offset + span.length > file_size:
            raise IntegrityError(
                "tensor table",
                f"tensor {span.name!r} at [{span.offset}, {span.offset + span.length}) overlaps "
                f"another tensor or lies outside the {file_size}-byte file",
            )
        cut(pos, span.offset - pos, None, None)
        cut(span.offset, span.length, span.name, span.dtype)
        pos = span.offset + span.length
    cut(pos, file_size - pos, None, None)
    return segments


def cdc_segments(path: Path, avg_bytes: int = DEFAULT_CDC_AVG_BYTES) -> list[Segment]:
    """FastCDC segments of the file at ``path`` (memory-mapped, never read whole)."""
    size = Path(path).stat().st_size
    if size == 0:
        return []
    if size <= avg_bytes // 4:
        return [Segment(0, size)]
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        return [Segment(c.offset, c.length) for c in fastcdc(mm, avg_size=avg_bytes)]


def read_segments(path: Path, segments: Sequence[Segment]) -> Iterator[tuple[Segment, bytes]]:
    """Yield each segment with its bytes, reading the file sequentially one piece at a time."""
    with open(path, "rb") as fh:
        for seg in segments:
            fh.seek(seg.offset)
            data = fh.read(seg.size)
            if len(data) != seg.size:
                raise IntegrityError(str(path), f"file ended at {seg.offset + len(data)}, a piece needs more")
            yield seg, data
