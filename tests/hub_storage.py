"""Test helpers for the hub's piece stores (cloud_hub.piece_storage): rot a stored piece in place,
whichever backend holds it, the way a bad disk or a stray UPDATE would."""

from __future__ import annotations

from typing import Any


def rot(store: Any, pid: str) -> None:
    """Overwrite the first bytes of a stored piece, keeping its size (the store must hold it)."""
    from sqlalchemy import select, update

    from cloud_hub.database_storage import DatabaseStorage
    from cloud_hub.models import PieceBytes
    from cloud_hub.piece_storage import FolderStorage

    if isinstance(store, FolderStorage):
        path = store.pieces._path(pid)
        path.write_bytes(b"rotten" + path.read_bytes()[6:])
    elif isinstance(store, DatabaseStorage):
        with store.db.engine.begin() as conn:
            data = conn.scalar(select(PieceBytes.data).where(PieceBytes.piece_id == pid))
            assert data is not None, f"the store does not hold {pid}"
            conn.execute(
                update(PieceBytes).where(PieceBytes.piece_id == pid).values(data=b"rotten" + bytes(data)[6:])
            )
    else:
        raise TypeError(f"no way to rot a piece in {type(store).__name__}")


def rot_encoding(store: Any, key: Any, *, width: int | None = None) -> None:
    """Overwrite the last byte of a stored encoding's payload, or (``width``) its element width
    field, leaving the payload intact (the store must hold it)."""
    from sqlalchemy import select, update

    from cloud_hub.database_storage import DatabaseStorage
    from cloud_hub.models import PieceEncodingRow as Row
    from cloud_hub.piece_storage import FolderStorage

    if isinstance(store, FolderStorage):
        path = store._encoding_path(key)
        blob = path.read_bytes()
        if width is not None:  # magic (4), encoding (1), width (1), ...
            path.write_bytes(blob[:5] + bytes([width]) + blob[6:])
            return
        path.write_bytes(blob[:-1] + bytes([blob[-1] ^ 0xFF]))
    elif isinstance(store, DatabaseStorage):
        where = (Row.piece_id == key.piece_id) & (Row.base_id == (key.base_id or ""))
        with store.db.engine.begin() as conn:
            if width is not None:
                conn.execute(update(Row).where(where).values(width=width))
                return
            payload = bytes(conn.scalar(select(Row.payload).where(where)))
            conn.execute(update(Row).where(where).values(payload=payload[:-1] + bytes([payload[-1] ^ 0xFF])))
    else:
        raise TypeError(f"no way to rot an encoding in {type(store).__name__}")
