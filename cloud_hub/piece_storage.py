"""Where the hub keeps bundle pieces and the encodings it sends devices: one interface, two backends.

    PieceStorage (the interface)        publishing (cloud_hub.registry), the encoder
        │                               (cloud_hub.encoder), garbage collection (cloud_hub.piece_gc)
        │                               and ``edgectl hub store import`` use only this
        ├── FolderStorage               DATA/pieces on this machine: one hub (the embedded default)
        └── DatabaseStorage             rows on the hub's database (cloud_hub.database_storage):
                                        every replica on one PostgreSQL sees every piece

Both hold two kinds of content:

    pieces      by BLAKE3-256 id; written once (writing what is held is a no-op, also when two
                replicas write it at once); every read verifies the bytes against the id: a
                rotten piece is deleted and IntegrityError raised, so publishing the bundle again
                (its ``begin`` lists the piece as missing) repairs it
    encodings   by (piece, base): a piece as a device is sent it (:class:`Encoded`), raw when the
                base is None; made once by whichever replica is asked first, read by all. Each
                carries a digest (:func:`encoding_digest`) over its encoding, element width and
                payload; a rotten one (a flipped header field too) is deleted and read as absent
                (the encoder makes it again). Encodings stored before the digest covered the
                header read as rotten once, and are made again

Everything is one piece at a time (a piece is at most ``max_piece_bytes``), never a whole
bundle. What a backend needs is get / put-if-absent / list / delete by key plus a little
metadata per encoding: an S3-compatible backend (objects under ``pieces/`` and ``encodings/``,
the encoding's fields as object metadata, ``If-None-Match: *`` for put-if-absent) fits the same
interface; none ships until there is a real server to test it against.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from edgeglm.contracts import PIECE_ID_PATTERN
from edgeglm.errors import IntegrityError
from edgeglm.piece_store import PieceStore
from edgeglm.pieces import piece_id
from edgeglm.protocol import PieceEncoding
from edgeglm.tensor_delta import Encoded

__all__ = ["EncodingKey", "FolderStorage", "PieceStorage", "StoreKind", "check_piece", "encoding_digest"]

_ID = re.compile(f"^{PIECE_ID_PATTERN}$")


class StoreKind(StrEnum):
    """``--store``: which backend holds the pieces; ``auto`` is the database on PostgreSQL."""

    AUTO = "auto"
    FOLDER = "folder"
    DATABASE = "database"


@dataclass(frozen=True)
class EncodingKey:
    """An encoding's name: the piece, and the piece it is a delta against (None: raw)."""

    piece_id: str
    base_id: str | None = None

    @property
    def name(self) -> str:
        return f"{self.piece_id}.{self.base_id or 'raw'}"


class PieceStorage(Protocol):
    """The hub's piece store, whichever backend holds the bytes."""

    @property
    def description(self) -> str:
        """What and where, for logs (``folder /var/lib/hub/pieces``); never a password."""
        ...

    def has(self, pid: str) -> bool: ...

    def missing(self, pids: Iterable[str]) -> set[str]:
        """The ids of ``pids`` the store does not hold (one round trip per batch, not per id)."""
        ...

    def put(self, pid: str, data: bytes) -> bool:
        """Store ``data`` after checking it hashes to ``pid``; False when it was held already."""
        ...

    def get(self, pid: str) -> bytes:
        """The verified bytes; NotFoundError if absent; IntegrityError (and deleted) if rotten."""
        ...

    def ids(self) -> Iterator[str]:
        """Every piece held, in no particular order."""
        ...

    def remove(self, pids: Iterable[str]) -> int:
        """Delete these pieces (absent ones are skipped); answers the bytes freed."""
        ...

    def encoding(self, key: EncodingKey) -> Encoded | None:
        """The stored encoding, verified; None when absent or rotten (a rotten one is deleted)."""
        ...

    def put_encoding(self, key: EncodingKey, encoded: Encoded) -> bool:
        """Store an encoding unless one is held already (then False: the first writer's stays)."""
        ...

    def encoding_keys(self) -> Iterator[EncodingKey]: ...

    def remove_encodings(self, keys: Iterable[EncodingKey]) -> int:
        """Delete these encodings (absent ones are skipped); answers the payload bytes freed."""
        ...


# An encoding file: magic, encoding, element width, its encoding_digest, then the payload.
_HEADER = struct.Struct(">4sBB32s")
_MAGIC = b"EGE1"
_FIELDS = struct.Struct(">BB")


def encoding_digest(encoded: Encoded) -> str:
    """BLAKE3-256 (hex) over an encoding's kind, element width and payload, as both backends store
    it: BLAKE3(kind, width, BLAKE3(payload)), so the payload is hashed in place, never copied."""
    return piece_id(
        _FIELDS.pack(int(encoded.encoding), encoded.width) + bytes.fromhex(piece_id(encoded.payload))
    )


class FolderStorage:
    """Pieces in a :class:`edgeglm.piece_store.PieceStore` folder (the layout the agent uses too),
    encodings next to them under ``encodings/ab/<piece>.<base|raw>``.

    The folder's ``refs/`` are not used: the hub's database says which pieces are live
    (:mod:`cloud_hub.piece_gc`)."""

    def __init__(self, root: Path | str, *, durable: bool = True) -> None:
        self.root = Path(root)
        self.pieces = PieceStore(self.root, durable=durable)
        self._encodings = self.root / "encodings"
        self._tmp = self.root / "tmp"

    @property
    def description(self) -> str:
        return f"folder {self.root}"

    # -- pieces ------------------------------------------------------------------------------
    def has(self, pid: str) -> bool:
        return self.pieces.has(pid)

    def missing(self, pids: Iterable[str]) -> set[str]:
        return {pid for pid in set(pids) if not self.pieces.has(pid)}

    def put(self, pid: str, data: bytes) -> bool:
        return self.pieces.put(pid, data)

    def get(self, pid: str) -> bytes:
        return self.pieces.get(pid)

    def ids(self) -> Iterator[str]:
        return self.pieces.ids()

    def remove(self, pids: Iterable[str]) -> int:
        return sum(self.pieces.remove(pid) for pid in pids)

    # -- encodings ---------------------------------------------------------------------------
    def _encoding_path(self, key: EncodingKey) -> Path:
        for pid in (key.piece_id, key.base_id or key.piece_id):
            if not _ID.match(pid):
                raise IntegrityError("piece id", f"{pid[:80]!r} is not 64 lowercase hex characters")
        return self._encodings / key.piece_id[:2] / key.name

    def encoding(self, key: EncodingKey) -> Encoded | None:
        path = self._encoding_path(key)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            magic, encoding, width, digest = _HEADER.unpack_from(blob)
            found = Encoded(PieceEncoding(encoding), width, blob[_HEADER.size :])
            if magic != _MAGIC or encoding_digest(found) != digest.hex():
                raise ValueError("digest")
            return found
        except (struct.error, ValueError):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return None

    def put_encoding(self, key: EncodingKey, encoded: Encoded) -> bool:
        path = self._encoding_path(key)
        if path.is_file():
            return False
        header = _HEADER.pack(
            _MAGIC, int(encoded.encoding), encoded.width, bytes.fromhex(encoding_digest(encoded))
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        # an encoding can be made again: no fsync; a torn file fails its digest and is made anew
        fd, tmp = tempfile.mkstemp(prefix=key.piece_id[:16], dir=self._tmp)
        with os.fdopen(fd, "wb") as fh:
            fh.write(header)
            fh.write(encoded.payload)
        os.replace(tmp, path)
        return True

    def encoding_keys(self) -> Iterator[EncodingKey]:
        if not self._encodings.is_dir():
            return
        for sub in self._encodings.iterdir():
            if not sub.is_dir():
                continue
            for path in sub.iterdir():
                pid, _, base = path.name.partition(".")
                if _ID.match(pid) and (base == "raw" or _ID.match(base)):
                    yield EncodingKey(pid, None if base == "raw" else base)

    def remove_encodings(self, keys: Iterable[EncodingKey]) -> int:
        freed = 0
        for key in keys:
            path = self._encoding_path(key)
            with contextlib.suppress(FileNotFoundError):
                size = path.stat().st_size - _HEADER.size
                path.unlink()
                freed += size
        return freed


def check_piece(pid: str, data: bytes | bytearray | memoryview) -> None:
    """IntegrityError unless ``data`` hashes to ``pid`` (what every backend checks before a write)."""
    actual = piece_id(data)
    if actual != pid:
        raise IntegrityError(f"piece {pid[:16]}", f"bytes hash to {actual[:16]}")
