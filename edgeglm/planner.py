"""What to send for an update: per piece *have*, *delta-from* a held piece, or *raw*.

Given the target manifest and the manifests of the versions a receiver holds::

    target piece ──held by receiver?──yes──> have   (0 bytes)
          │no
          └──same tensor + slice + size in a held version?──yes──> delta (tensor delta vs base)
                      │no                                              (or raw, if smaller)
                      └──> raw (zstd / byte planes + zstd)

With a piece ``source`` (the sender's pieces) every cost is the real encoded size; without one
the plan is an estimate (cost = piece size). If the delta plan would cost more than
``full_threshold`` (0.65) of the full download, the plan switches to ``full`` mode: no deltas,
every missing piece raw. Pieces the receiver holds are never sent in either mode (they are
content-addressed, so they are the same bytes). ``receive`` is the receiver's half: decode, verify,
store.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from edgeglm.bundle import Manifest
from edgeglm.errors import IntegrityError, NotFoundError
from edgeglm.piece_store import PieceStore
from edgeglm.pieces import piece_id
from edgeglm.protocol import DEFAULT_MAX_MESSAGE_BYTES, Frame, FrameKind, split_payload
from edgeglm.tensor_delta import Encoded, decode, encode_delta, encode_raw

__all__ = [
    "DEFAULT_FULL_THRESHOLD",
    "FilePlan",
    "PieceSource",
    "PieceStep",
    "Plan",
    "PlanMode",
    "SourceChain",
    "encode_step",
    "plan",
    "receive",
    "step_frames",
]

DEFAULT_FULL_THRESHOLD = 0.65
Action = Literal["have", "delta", "raw"]
PlanMode = Literal["delta", "full"]  # full: no deltas, every missing piece raw


class PieceSource(Protocol):
    def read(self, pid: str) -> bytes: ...

    def __contains__(self, pid: object) -> bool: ...


class SourceChain:
    """Serve a piece from the first source that holds it (e.g. the new bundle, then the old)."""

    def __init__(self, *sources: PieceSource) -> None:
        self.sources = sources

    def __contains__(self, pid: object) -> bool:
        return any(pid in s for s in self.sources)

    def read(self, pid: str) -> bytes:
        for source in self.sources:
            if pid in source:
                return source.read(pid)
        raise NotFoundError(f"piece {pid[:16]}", "in none of the sources")


@dataclass(frozen=True)
class PieceStep:
    piece_id: str
    size: int
    action: Action
    cost: int
    base_id: str | None = None
    dtype: str | None = None
    raw_cost: int = 0  # what this piece costs without a delta (for full mode)


@dataclass(frozen=True)
class FilePlan:
    path: str
    size: int
    steps: tuple[PieceStep, ...]

    def bytes_to_send(self, mode: str) -> int:
        if mode == "full":
            return sum(s.raw_cost for s in self.steps if s.action != "have")
        return sum(s.cost for s in self.steps)

    def count(self, action: Action) -> int:
        return sum(1 for s in self.steps if s.action == action)


@dataclass(frozen=True)
class Plan:
    files: tuple[FilePlan, ...]
    full_bytes: int
    estimated: bool
    full_threshold: float = DEFAULT_FULL_THRESHOLD
    mode: PlanMode = field(init=False)

    def __post_init__(self) -> None:
        delta = sum(f.bytes_to_send("delta") for f in self.files)
        full = self.full_bytes > 0 and delta > self.full_threshold * self.full_bytes
        object.__setattr__(self, "mode", "full" if full else "delta")

    @property
    def delta_bytes(self) -> int:
        return sum(f.bytes_to_send("delta") for f in self.files)

    @property
    def bytes_to_send(self) -> int:
        return sum(f.bytes_to_send(self.mode) for f in self.files)

    def steps(self) -> list[PieceStep]:
        """Steps of pieces that travel, in file order, as the mode decides (no deltas in full)."""
        out = []
        for f in self.files:
            for s in f.steps:
                if s.action == "have":
                    continue
                if self.mode == "full" and s.action == "delta":
                    s = PieceStep(s.piece_id, s.size, "raw", s.raw_cost, None, s.dtype, s.raw_cost)
                out.append(s)
        return out

    def to_dict(self) -> dict[str, Any]:
        files = [
            {
                "path": f.path,
                "size": f.size,
                "pieces": len(f.steps),
                "have": f.count("have"),
                "delta": f.count("delta") if self.mode == "delta" else 0,
                "raw": f.count("raw") + (f.count("delta") if self.mode == "full" else 0),
                "bytes_to_send": f.bytes_to_send(self.mode),
            }
            for f in self.files
        ]
        return {
            "mode": self.mode,
            "estimated": self.estimated,
            "bytes_to_send": self.bytes_to_send,
            "delta_bytes": self.delta_bytes,
            "full_bytes": self.full_bytes,
            "full_threshold": self.full_threshold,
            "ratio_to_full": round(self.bytes_to_send / self.full_bytes, 6) if self.full_bytes else 0.0,
            "files": files,
        }


def _base_index(held: Iterable[Manifest]) -> dict[tuple[str, str, int, int], tuple[str, str | None]]:
    """(file, tensor, slice, size) -> (piece id, dtype), also under file '' for any file."""
    index: dict[tuple[str, str, int, int], tuple[str, str | None]] = {}
    for manifest in held:
        for entry in manifest.files:
            for seg, (pid, _) in zip(entry.segments(), entry.pieces, strict=True):
                if seg.tensor is None:
                    continue
                for path in (entry.path, ""):
                    index.setdefault((path, seg.tensor, seg.index, seg.size), (pid, seg.dtype))
    return index


def plan(
    target: Manifest,
    held: Sequence[Manifest],
    *,
    have: Iterable[str] | None = None,
    source: PieceSource | None = None,
    full_bytes: int | None = None,
    full_threshold: float = DEFAULT_FULL_THRESHOLD,
    level: int = 3,
    on_encoded: Callable[[PieceStep, Encoded, Encoded], None] | None = None,
) -> Plan:
    """Plan sending ``target`` to a receiver that holds ``held`` versions (and pieces ``have``).

    ``have`` defaults to every piece of the held manifests. With ``source``, costs are real
    encoded sizes (the source must serve target pieces and delta bases), and ``on_encoded``
    receives each travelling step with its chosen and its stand-alone encoding, so a sender can
    keep them instead of encoding twice.
    """
    held_ids = set(have) if have is not None else {pid for m in held for pid in m.piece_ids()}
    bases = _base_index(held)
    seen: set[str] = set()
    full_total = 0
    files = []
    for entry in target.files:
        steps = []
        for seg, (pid, size) in zip(entry.segments(), entry.pieces, strict=True):
            if pid in held_ids or pid in seen:
                steps.append(PieceStep(pid, size, "have", 0, dtype=seg.dtype))
                if full_bytes is None and pid not in seen:  # a full download sends it too
                    full_total += (
                        size
                        if source is None
                        else len(encode_raw(source.read(pid), dtype=seg.dtype, level=level).payload)
                    )
                seen.add(pid)
                continue
            seen.add(pid)
            base = None
            if seg.tensor is not None:
                base = bases.get((entry.path, seg.tensor, seg.index, size)) or bases.get(
                    ("", seg.tensor, seg.index, size)
                )
                if base is not None and base[1] != seg.dtype:
                    base = None
            if source is None:
                action: Action = "delta" if base else "raw"
                steps.append(PieceStep(pid, size, action, size, base[0] if base else None, seg.dtype, size))
                full_total += size
                continue
            data = source.read(pid)
            raw = encode_raw(data, dtype=seg.dtype, level=level)
            full_total += len(raw.payload)
            step = PieceStep(pid, size, "raw", len(raw.payload), None, seg.dtype, len(raw.payload))
            chosen = raw
            if base is not None:
                delta = encode_delta(data, source.read(base[0]), dtype=seg.dtype, level=level)
                if len(delta.payload) < len(raw.payload):
                    step = PieceStep(
                        pid, size, "delta", len(delta.payload), base[0], seg.dtype, len(raw.payload)
                    )
                    chosen = delta
            steps.append(step)
            if on_encoded is not None:
                on_encoded(step, chosen, raw)
        files.append(FilePlan(entry.path, entry.size, tuple(steps)))
    return Plan(
        files=tuple(files),
        full_bytes=full_bytes if full_bytes is not None else full_total,
        estimated=source is None,
        full_threshold=full_threshold,
    )


def encode_step(step: PieceStep, source: PieceSource, *, level: int = 3) -> Encoded:
    """The sender's half: the bytes that travel for one step of a plan."""
    data = source.read(step.piece_id)
    if step.action == "delta" and step.base_id is not None:
        return encode_delta(data, source.read(step.base_id), dtype=step.dtype, level=level)
    return encode_raw(data, dtype=step.dtype, level=level)


def step_frames(
    step: PieceStep, encoded: Encoded, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> list[Frame]:
    """The wire frames (each at most ``max_message_bytes`` packed) that carry one step."""
    return split_payload(
        FrameKind.PIECE,
        encoded.encoding,
        piece_id=bytes.fromhex(step.piece_id),
        piece_size=step.size,
        payload=encoded.payload,
        element_width=encoded.width,
        base_id=bytes.fromhex(step.base_id) if step.base_id and encoded.is_delta else None,
        max_message_bytes=max_message_bytes,
    )


def receive(store: PieceStore, pid: str, size: int, encoded: Encoded, base_id: str | None = None) -> bytes:
    """The receiver's half: decode (against the stored base for a delta), verify the id, store."""
    base = store.get(base_id) if base_id is not None else None
    data = decode(encoded.encoding, encoded.width, encoded.payload, size, base)
    if piece_id(data) != pid:
        raise IntegrityError(f"piece {pid[:16]}", "decoded bytes do not match the piece id")
    store.put(pid, data)
    return data
