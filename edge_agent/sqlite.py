"""The agent's SQLite files (update state, outbox): durable, and small on a small disk.

Every connection runs in WAL mode with ``synchronous=FULL``: a row committed is a row that
survives a power cut. Edge boxes have little disk, so the WAL is checkpointed every 64 pages and
truncated back to 256 KiB after each checkpoint (by default it may grow to megabytes and stay).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine

__all__ = ["durable_engine"]


def _pragmas(conn: Any, _record: Any) -> None:
    cur = conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA wal_autocheckpoint=64")
    cur.execute("PRAGMA journal_size_limit=262144")
    cur.close()


def durable_engine(path: Path) -> Engine:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(f"sqlite:///{path}")
    event.listen(engine, "connect", _pragmas)
    return engine
