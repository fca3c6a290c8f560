"""The piece store on the hub's own database: what lets N replicas on one PostgreSQL serve every
bundle whichever replica it was published through.

    piece_bytes      (piece_id PK, size, data, created_at)        one row per piece
    piece_encodings  (piece_id, base_id PK, encoding, width,      one row per (piece, base);
                      digest, size, payload, created_at)          base_id '' for raw

Rows are content-addressed and written once: ``INSERT ... ON CONFLICT DO NOTHING`` (PostgreSQL and
SQLite), so two replicas putting the same piece at once both succeed and one row remains (the
first writer is told True, the other False). Each call is its own short transaction on the hub's
engine, outside any caller's session: a piece stored during a publish whose transaction rolls
back stays, exactly as a file would (garbage collection removes what nothing names).

Every read checks BLAKE3 against the key. A rotten piece row is deleted and IntegrityError
raised (publishing the bundle again repairs it); a rotten encoding is deleted and read as
absent. One piece is at most ``max_piece_bytes`` (64 MiB), read and written whole; nothing
here ever holds more than one piece (listing ids is streamed).

SQLite has one writer at a time: a caller that holds a write transaction on the same SQLite file
while it stores a piece waits for itself (``database is locked`` after the busy timeout), which
is what :meth:`cloud_hub.registry.Registry.publish_folder` does. The database store on SQLite is
for tests and single-process tools; a SQLite hub keeps its pieces in the folder (``--store auto``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

from sqlalchemy import Column, ColumnElement, Connection, Table, delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url

from cloud_hub.db import Database
from cloud_hub.models import PieceBytes, PieceEncodingRow, utcnow
from cloud_hub.piece_storage import EncodingKey, check_piece, encoding_digest
from edgeglm.errors import IntegrityError, NotFoundError
from edgeglm.pieces import piece_id
from edgeglm.protocol import PieceEncoding
from edgeglm.tensor_delta import Encoded

__all__ = ["DatabaseStorage"]

log = logging.getLogger(__name__)

_PIECES: Table = PieceBytes.__table__  # type: ignore[assignment]
_ENCODINGS: Table = PieceEncodingRow.__table__  # type: ignore[assignment]
_BATCH = 500  # ids per IN (...) list
# Bytes read per query: the driver holds a result twice over (PostgreSQL's text protocol sends
# bytea as hex), so a 64 MiB piece is read in segments, not in one 128 MiB hex string.
_SEGMENT = 4 << 20


def _read(conn: Connection, table: Table, column: Column[bytes], where: ColumnElement[bool]) -> bytes | None:
    """The bytes of ``column`` in the row ``where`` picks, ``_SEGMENT`` bytes per query (one query
    for the pieces of at most that size, which are nearly all); None if there is no such row."""
    length = func.length(column)
    first = conn.execute(select(length, func.substr(column, 1, _SEGMENT)).where(where)).one_or_none()
    if first is None:
        return None
    size, head = first
    parts = [bytes(head)]
    for start in range(_SEGMENT, size, _SEGMENT):
        part = conn.scalar(select(func.substr(column, start + 1, _SEGMENT)).where(where))
        if part is None:
            return None  # deleted meanwhile
        parts.append(bytes(part))
    return b"".join(parts)


def _batches(items: Iterable[Any]) -> Iterator[list[Any]]:
    it = iter(items)
    while batch := list(islice(it, _BATCH)):
        yield batch


class DatabaseStorage:
    """Pieces and encodings as rows of the hub's database (PostgreSQL in production; SQLite works)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._insert = postgresql.insert if db.dialect == "postgresql" else sqlite.insert

    @property
    def description(self) -> str:
        url = make_url(self.db.url).render_as_string(hide_password=True)
        return f"database {url} (tables piece_bytes, piece_encodings)"

    # -- pieces ------------------------------------------------------------------------------
    def has(self, pid: str) -> bool:
        with self.db.engine.connect() as conn:
            return conn.scalar(select(_PIECES.c.piece_id).where(_PIECES.c.piece_id == pid)) is not None

    def missing(self, pids: Iterable[str]) -> set[str]:
        wanted = set(pids)
        held: set[str] = set()
        with self.db.engine.connect() as conn:
            for batch in _batches(sorted(wanted)):
                held.update(conn.scalars(select(_PIECES.c.piece_id).where(_PIECES.c.piece_id.in_(batch))))
        return wanted - held

    def put(self, pid: str, data: bytes) -> bool:
        check_piece(pid, data)
        if self.has(pid):  # the common case when a replica repeats a write: no bytes sent
            return False
        stmt = (
            self._insert(_PIECES)
            .values(piece_id=pid, size=len(data), data=bytes(data), created_at=utcnow())
            .on_conflict_do_nothing(index_elements=["piece_id"])
            .returning(_PIECES.c.piece_id)  # a row back only when this call inserted it
        )
        with self.db.engine.begin() as conn:
            return conn.scalar(stmt) is not None

    def get(self, pid: str) -> bytes:
        with self.db.engine.connect() as conn:
            data = _read(conn, _PIECES, _PIECES.c.data, _PIECES.c.piece_id == pid)
        if data is None:
            raise NotFoundError(f"piece {pid[:16]}", "not in the store")
        if piece_id(data) != pid:
            self.remove([pid])
            log.error("piece %s in the database store was corrupt: removed", pid)
            raise IntegrityError(f"piece {pid[:16]}", "stored bytes are corrupt; removed, fetch it again")
        return data

    def ids(self) -> Iterator[str]:
        with self.db.engine.connect() as conn:
            rows = conn.execution_options(yield_per=1000).execute(select(_PIECES.c.piece_id))
            for (pid,) in rows:
                yield pid

    def remove(self, pids: Iterable[str]) -> int:
        freed = 0
        with self.db.engine.begin() as conn:
            for batch in _batches(pids):
                freed += sum(
                    conn.scalars(
                        delete(_PIECES).where(_PIECES.c.piece_id.in_(batch)).returning(_PIECES.c.size)
                    )
                )
        return freed

    # -- encodings ---------------------------------------------------------------------------
    def encoding(self, key: EncodingKey) -> Encoded | None:
        where = (_ENCODINGS.c.piece_id == key.piece_id) & (_ENCODINGS.c.base_id == (key.base_id or ""))
        with self.db.engine.connect() as conn:
            row = conn.execute(
                select(_ENCODINGS.c.encoding, _ENCODINGS.c.width, _ENCODINGS.c.digest).where(where)
            ).one_or_none()
            payload = None if row is None else _read(conn, _ENCODINGS, _ENCODINGS.c.payload, where)
        if row is None or payload is None:
            return None
        try:
            found = Encoded(PieceEncoding(row.encoding), row.width, payload)
        except ValueError:
            found = None
        if found is None or encoding_digest(found) != row.digest:
            self.remove_encodings([key])
            if piece_id(payload) == row.digest:  # its digest covers the payload only: made before
                log.info("encoding %s predates header digests: removed, made again", key.name)
            else:
                log.error("encoding %s in the database store was corrupt: removed, made again", key.name)
            return None
        return found

    def put_encoding(self, key: EncodingKey, encoded: Encoded) -> bool:
        stmt = (
            self._insert(_ENCODINGS)
            .values(
                piece_id=key.piece_id,
                base_id=key.base_id or "",
                encoding=int(encoded.encoding),
                width=encoded.width,
                digest=encoding_digest(encoded),
                size=len(encoded.payload),
                payload=encoded.payload,
                created_at=utcnow(),
            )
            .on_conflict_do_nothing(index_elements=["piece_id", "base_id"])
            .returning(_ENCODINGS.c.piece_id)
        )
        with self.db.engine.begin() as conn:
            return conn.scalar(stmt) is not None

    def encoding_keys(self) -> Iterator[EncodingKey]:
        with self.db.engine.connect() as conn:
            rows = conn.execution_options(yield_per=1000).execute(
                select(_ENCODINGS.c.piece_id, _ENCODINGS.c.base_id)
            )
            for pid, base in rows:
                yield EncodingKey(pid, base or None)

    def remove_encodings(self, keys: Iterable[EncodingKey]) -> int:
        freed = 0
        with self.db.engine.begin() as conn:
            for key in keys:
                freed += sum(
                    conn.scalars(
                        delete(_ENCODINGS)
                        .where(_ENCODINGS.c.piece_id == key.piece_id)
                        .where(_ENCODINGS.c.base_id == (key.base_id or ""))
                        .returning(_ENCODINGS.c.size)
                    )
                )
        return freed
