"""Test helpers for the hub's piece stores (cloud_hub.piece_storage): rot a stored piece in place,
whichever backend holds it, the way a bad disk or a stray UPDATE would."""

from __future__ import annotations

from typing import Any


def rot(store: Any, pid: str) -> None:
    """Overwrite the first bytes of a stored piece, keeping its size (the store must hold it)."""
    from sqlalchemy import update

    from cloud_hub.database_storage import DatabaseStorage
    from cloud_hub.models import PieceBytes
    from cloud_hub.piece_storage import FolderStorage

    if isinstance(store, FolderStorage):
        path = store.pieces._path(pid)
        path.write_bytes(b"rotten" + path.read_bytes()[6:])
    elif isinstance(store, DatabaseStorage):
        with store.db.engine.begin() as conn:
            data = conn.scalar(
                PieceBytes.__table__.select()
                .with_only_columns(PieceBytes.data)
                .where(PieceBytes.piece_id == pid)
            )
            assert data is not None, f"the store does not hold {pid}"
            conn.execute(
                update(PieceBytes).where(PieceBytes.piece_id == pid).values(data=b"rotten" + bytes(data)[6:])
            )
    else:
        raise TypeError(f"no way to rot a piece in {type(store).__name__}")
