"""The agent's outbox: every report and telemetry message is written here first, sent in order later.

::

    put(kind, topic, payload) ──► outbox table (SQLite, WAL) ──► sender thread ──► publish(item)
      │ same transaction: over max_rows?        ▲ each round: expire old       │ True: ack(id)
      │ drop the oldest heartbeats, never a     │ heartbeats, then take rows   │ False / raises:
      │ report                                  │ in id order while connected  │ back off, retry
      └─ notify ────────────────────────────────┘                              └─ the SAME item

Order is strict: item n+1 is published only once n is acked, so a report the broker never confirmed
is retried before anything newer goes out. Delivery is at least once (a lost PUBACK means a resend);
:meth:`Outbox.next_seq` hands out persisted numbers so a receiver can tell a repeat.
``sqlite_autoincrement`` keeps ids from ever being reused, also after the table emptied and the
agent restarted. The DB lock is never held while ``publish`` runs; a publish that raises is logged
(without its payload) and retried; the sender thread never dies of it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    Float,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    delete,
    func,
    select,
)
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from edge_agent.sqlite import durable_engine

__all__ = ["Outbox", "OutboxItem"]

log = logging.getLogger(__name__)

_HEARTBEAT = "heartbeat"
_POLL_S = 0.5  # idle wait: how soon a broker that came back is noticed without a put()
_BATCH = 100  # rows read per peek in a send round
_DROP_WARN_EVERY_S = 60.0


class _Base(DeclarativeBase):
    pass


class _Row(_Base):
    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_kind", "kind"), {"sqlite_autoincrement": True})
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(32))
    topic: Mapped[str] = mapped_column(Text)
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    qos: Mapped[int] = mapped_column(Integer)
    retain: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[float] = mapped_column(Float)


class _Counter(_Base):
    __tablename__ = "counters"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(Integer)


@dataclass(frozen=True)
class OutboxItem:
    """One queued message; ``payload`` stays out of ``repr`` (and so out of logs)."""

    id: int
    kind: str
    topic: str
    payload: bytes = field(repr=False)
    qos: int
    retain: bool
    created_at: float


class Outbox:
    """A bounded, persistent FIFO of MQTT messages and the one thread that drains it."""

    def __init__(
        self,
        path: Path,
        *,
        max_rows: int = 10000,
        max_age_s: float = 3600.0,
        retry_s: float = 0.5,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        self.engine: Engine = durable_engine(path)  # a row committed survives a power cut
        _Base.metadata.create_all(self.engine)
        self.max_rows = max_rows
        self.max_age_s = max_age_s
        self.retry_s = retry_s
        self.dropped = 0  # heartbeats dropped by the max_rows bound, this process
        self.expired = 0  # heartbeats deleted as older than max_age_s, this process
        self._clock = clock
        self._db = threading.Lock()  # one writer at a time in this process; never held over publish
        self._wake = threading.Condition()
        self._dirty = False
        self._drained = threading.Condition()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._failures = 0  # consecutive failed publishes (these two are the sender thread's own)
        self._last_failure: str | None = None
        self._last_drop_warning: float | None = None

    # -- the table -------------------------------------------------------------------------------

    def put(
        self,
        kind: str,
        topic: str,
        payload: bytes | Callable[[int], bytes],
        *,
        qos: int = 1,
        retain: bool = False,
        seq: str | None = None,
    ) -> int:
        """Queue one message and return its id; over ``max_rows``, drop the oldest heartbeats.

        With ``seq``, ``payload(n)`` builds the message around the next value of counter ``seq``
        (see :meth:`next_seq`) in the same transaction as its row: a crash keeps both or neither,
        so a receiver never sees a number that was handed out and then lost.
        """
        with self._db, Session(self.engine, expire_on_commit=False) as s, s.begin():
            if seq is not None:
                assert callable(payload)
                data = payload(int(s.execute(self._count(seq)).scalar_one()))
            else:
                assert not callable(payload)
                data = bytes(payload)
            row = _Row(kind=kind, topic=topic, payload=data, qos=qos, retain=retain, created_at=self._clock())
            s.add(row)
            s.flush()
            excess = (s.scalar(select(func.count()).select_from(_Row)) or 0) - self.max_rows
            dropped = 0
            if excess > 0:
                oldest = select(_Row.id).where(_Row.kind == _HEARTBEAT).order_by(_Row.id).limit(excess)
                result = s.execute(delete(_Row).where(_Row.id.in_(oldest.scalar_subquery())))
                dropped = int(getattr(result, "rowcount", 0) or 0)
        if dropped:
            self._note_dropped(dropped)
        with self._wake:
            self._dirty = True
            self._wake.notify_all()
        return row.id

    def pending(self) -> int:
        with self._db, Session(self.engine) as s:
            return int(s.scalar(select(func.count()).select_from(_Row)) or 0)

    def peek(self, limit: int) -> list[OutboxItem]:
        """The oldest ``limit`` rows, in id (= send) order; nothing is removed."""
        with self._db, Session(self.engine) as s:
            rows = s.scalars(select(_Row).order_by(_Row.id).limit(limit)).all()
            return [
                OutboxItem(r.id, r.kind, r.topic, bytes(r.payload), r.qos, bool(r.retain), r.created_at)
                for r in rows
            ]

    def ack(self, ids: Iterable[int]) -> None:
        """Delete the rows the broker has; unknown ids are ignored."""
        wanted = list(ids)
        if not wanted:
            return
        with self._db, Session(self.engine) as s, s.begin():
            s.execute(delete(_Row).where(_Row.id.in_(wanted)))
        with self._drained:
            self._drained.notify_all()

    def next_seq(self, name: str) -> int:
        """The next value of counter ``name`` (0 first), persisted before it is returned."""
        with self._db, Session(self.engine) as s, s.begin():
            return int(s.execute(self._count(name)).scalar_one())

    @staticmethod
    def _count(name: str) -> Any:
        """Counter ``name`` one up (created at 0), returning its new value."""
        return (
            sqlite_insert(_Counter)
            .values(name=name, value=0)
            .on_conflict_do_update(index_elements=[_Counter.name], set_={"value": _Counter.value + 1})
            .returning(_Counter.value)
        )

    def _expire(self) -> int:
        """Delete heartbeats older than ``max_age_s``; reports never age out."""
        cutoff = self._clock() - self.max_age_s
        with self._db, Session(self.engine) as s, s.begin():
            result = s.execute(delete(_Row).where(_Row.kind == _HEARTBEAT, _Row.created_at < cutoff))
            n = int(getattr(result, "rowcount", 0) or 0)
        if n:
            self.expired += n
            log.info("outbox: %d heartbeats older than %.0f s deleted unsent", n, self.max_age_s)
        return n

    def _note_dropped(self, n: int) -> None:
        self.dropped += n
        now = time.monotonic()
        if self._last_drop_warning is None or now - self._last_drop_warning >= _DROP_WARN_EVERY_S:
            self._last_drop_warning = now
            log.warning(
                "outbox: over %d rows, %d heartbeats dropped so far (reports are kept)",
                self.max_rows,
                self.dropped,
            )

    # -- the sender ------------------------------------------------------------------------------

    def start(self, publish: Callable[[OutboxItem], bool], connected: Callable[[], bool]) -> Outbox:
        """Start the sender: ``publish(item)`` returns True once the broker has the item."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("outbox sender already running")
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._run, args=(publish, connected), name="outbox-sender", daemon=True
        )
        self._thread.start()
        return self

    def stop(self, timeout: float = 5) -> None:
        thread = self._thread
        if thread is None:
            return
        self._stopping.set()
        with self._wake:
            self._wake.notify_all()
        thread.join(timeout)
        if thread.is_alive():
            log.warning("outbox: sender did not stop within %.1f s (publish blocked?)", timeout)
        else:
            self._thread = None

    def close(self) -> None:
        self.stop()
        self.engine.dispose()

    def flush(self, timeout: float) -> bool:
        """Wait until every row is acked; False when ``timeout`` seconds passed first."""
        deadline = time.monotonic() + timeout
        while self.pending():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with self._drained:
                self._drained.wait(min(left, 0.05))
        return True

    def _run(self, publish: Callable[[OutboxItem], bool], connected: Callable[[], bool]) -> None:
        backoff = False
        while not self._stopping.is_set():
            if backoff:
                self._stopping.wait(self.retry_s)
            else:
                with self._wake:
                    if not self._dirty:
                        self._wake.wait(_POLL_S)
                    self._dirty = False
            backoff = False
            if self._stopping.is_set():
                break
            try:
                if not self.pending() or not connected():
                    continue
                self._expire()
                backoff = not self._send_round(publish, connected)
            except Exception:  # a DB or connected() failure must not end the sender
                log.exception("outbox: send round failed")
                backoff = True

    def _send_round(self, publish: Callable[[OutboxItem], bool], connected: Callable[[], bool]) -> bool:
        """Publish rows in id order; False when one failed (it is retried first next round)."""
        while not self._stopping.is_set():
            items = self.peek(_BATCH)
            if not items:
                return True
            for item in items:
                if self._stopping.is_set() or not connected():
                    return True
                try:
                    ok = publish(item)
                    error: Exception | None = None
                except Exception as exc:
                    ok, error = False, exc
                if not ok:
                    self._failures += 1
                    why = "not confirmed" if error is None else f"{type(error).__name__}: {error}"
                    if why != self._last_failure:  # a new kind of failure warns; repeats are debug
                        self._last_failure = why
                        log.warning(
                            "outbox: publish of %s #%d to %s failed (%s); retrying every %g s",
                            item.kind,
                            item.id,
                            item.topic,
                            why,
                            self.retry_s,
                            exc_info=error,
                        )
                    else:
                        log.debug(
                            "outbox: publish of %s #%d failed again (%d)", item.kind, item.id, self._failures
                        )
                    return False
                if self._failures:
                    log.info("outbox: publishing again after %d failed attempts", self._failures)
                    self._failures, self._last_failure = 0, None
                self.ack([item.id])
        return True
