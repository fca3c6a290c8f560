"""The outbox keeps order across restarts, drops only heartbeats, and sends strictly in order."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.outbox import Outbox, OutboxItem

OpenOutbox = Callable[..., Outbox]


@pytest.fixture
def open_outbox(tmp_path: Path) -> Iterator[OpenOutbox]:
    """``open_outbox(**kwargs)`` opens ``tmp_path/outbox.db``; every one opened is closed at the end."""
    opened: list[Outbox] = []

    def _open(**kwargs: Any) -> Outbox:
        kwargs.setdefault("retry_s", 0.01)
        box = Outbox(tmp_path / "agent" / "outbox.db", **kwargs)
        opened.append(box)
        return box

    yield _open
    for box in opened:
        box.close()


class FakeLink:
    """The broker side: a ``connected`` flag and a ``publish`` that records every attempt.

    ``script`` gives the outcome of successive publishes (True, False, or an exception to raise);
    once it runs out every publish succeeds. ``down_after`` drops the link once, after that many
    successes.
    """

    def __init__(self, *, up: bool = True, script: tuple[Any, ...] = (), down_after: int | None = None):
        self.up = up
        self.script = list(script)
        self.down_after = down_after
        self.attempts: list[int] = []
        self.delivered: list[OutboxItem] = []
        self.seen_down = 0
        self._cond = threading.Condition()

    def connected(self) -> bool:
        with self._cond:
            if not self.up:
                self.seen_down += 1
                self._cond.notify_all()
            return self.up

    def publish(self, item: OutboxItem) -> bool:
        with self._cond:
            self.attempts.append(item.id)
            outcome = self.script.pop(0) if self.script else True
        if isinstance(outcome, BaseException):
            raise outcome
        if outcome:
            with self._cond:
                self.delivered.append(item)
                if len(self.delivered) == self.down_after:
                    self.up = False
        return bool(outcome)

    def wait_seen_down(self, times: int = 1, timeout: float = 2.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.seen_down >= times, timeout)


def test_order_and_ids_survive_a_restart(open_outbox: OpenOutbox) -> None:
    box = open_outbox()
    ids = [
        box.put("report", "edge/d1/report", b"r0"),
        box.put("heartbeat", "edge/d1/hb", b"h0", qos=0),
        box.put("report", "edge/d1/report", b"r1", retain=True),
    ]
    before = box.peek(10)
    box.close()

    box = open_outbox()
    after = box.peek(10)
    assert after == before
    assert [i.id for i in after] == ids == sorted(ids)
    assert [(i.kind, i.payload, i.qos, i.retain) for i in after] == [
        ("report", b"r0", 1, False),
        ("heartbeat", b"h0", 0, False),
        ("report", b"r1", 1, True),
    ]
    assert box.peek(2) == after[:2]

    box.ack(ids)
    assert box.pending() == 0
    box.close()
    box = open_outbox()
    assert box.put("report", "edge/d1/report", b"r2") == ids[-1] + 1  # ids are never reused


def test_bound_drops_oldest_heartbeats_first_and_never_a_report(
    open_outbox: OpenOutbox, caplog: pytest.LogCaptureFixture
) -> None:
    box = open_outbox(max_rows=5)
    caplog.set_level(logging.WARNING, logger="edge_agent.outbox")
    box.put("report", "t/r", b"r0")
    for n in range(5):
        box.put("heartbeat", "t/hb", f"h{n}".encode())
    box.put("report", "t/r", b"r1")
    for n in range(5, 10):
        box.put("heartbeat", "t/hb", f"h{n}".encode())
    box.put("report", "t/r", b"r2")

    assert [i.payload for i in box.peek(100)] == [b"r0", b"r1", b"h8", b"h9", b"r2"]
    assert box.pending() == 5
    assert box.dropped == 8
    warnings = [r for r in caplog.records if "heartbeats dropped" in r.getMessage()]
    assert len(warnings) == 1  # rate-limited: once per 60 s, not once per drop


def test_reports_over_the_bound_are_all_kept(open_outbox: OpenOutbox) -> None:
    box = open_outbox(max_rows=2)
    box.put("report", "t/r", b"r0")
    box.put("heartbeat", "t/hb", b"h0")
    box.put("report", "t/r", b"r1")
    box.put("report", "t/r", b"r2")
    box.put("report", "t/r", b"r3")

    assert [i.payload for i in box.peek(100)] == [b"r0", b"r1", b"r2", b"r3"]
    assert box.dropped == 1


def test_next_seq_counts_from_zero_per_name_and_persists(open_outbox: OpenOutbox) -> None:
    box = open_outbox()
    assert [box.next_seq("report") for _ in range(3)] == [0, 1, 2]
    assert box.next_seq("event") == 0
    box.close()

    box = open_outbox()
    assert box.next_seq("report") == 3
    assert box.next_seq("event") == 1


def test_a_numbered_message_and_its_number_are_kept_together_or_not_at_all(open_outbox: OpenOutbox) -> None:
    """A crash between taking a heartbeat's number and queueing it left a gap the hub saw."""
    box = open_outbox()

    def crash(n: int) -> bytes:
        raise RuntimeError(f"died holding number {n}")

    assert box.put("heartbeat", "t/h", lambda n: b"hb%d" % n, qos=0, seq="heartbeat")
    with pytest.raises(RuntimeError, match="number 1"):
        box.put("heartbeat", "t/h", crash, qos=0, seq="heartbeat")
    box.put("heartbeat", "t/h", lambda n: b"hb%d" % n, qos=0, seq="heartbeat")
    box.close()
    box = open_outbox()
    assert [i.payload for i in box.peek(10)] == [b"hb0", b"hb1"]  # 1 was never lost
    assert box.next_seq("heartbeat") == 2


def test_ack_removes_exactly_the_given_rows(open_outbox: OpenOutbox) -> None:
    box = open_outbox()
    ids = [box.put("report", "t/r", f"r{n}".encode()) for n in range(3)]
    box.ack([ids[0], ids[2], 999])
    box.ack([])
    assert [i.id for i in box.peek(10)] == [ids[1]]
    assert box.pending() == 1


def test_sender_waits_for_the_broker_then_sends_in_order(open_outbox: OpenOutbox) -> None:
    link = FakeLink(up=False)
    box = open_outbox().start(link.publish, link.connected)
    ids = [box.put("report", "t/r", f"r{n}".encode()) for n in range(3)]

    assert link.wait_seen_down()
    assert link.attempts == []
    assert box.pending() == 3

    link.up = True
    assert box.flush(timeout=2.0)
    assert link.attempts == ids
    assert [i.payload for i in link.delivered] == [b"r0", b"r1", b"r2"]
    assert box.pending() == 0


def test_sender_stops_when_the_link_drops_mid_round(open_outbox: OpenOutbox) -> None:
    link = FakeLink(down_after=2)
    box = open_outbox()
    ids = [box.put("report", "t/r", f"r{n}".encode()) for n in range(4)]
    box.start(link.publish, link.connected)

    assert link.wait_seen_down()
    assert link.attempts == ids[:2]
    assert [i.id for i in box.peek(10)] == ids[2:]

    link.up = True
    assert box.flush(timeout=2.0)
    assert link.attempts == ids


def test_sender_retries_the_same_item_after_false_and_raise(
    open_outbox: OpenOutbox, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="edge_agent.outbox")
    link = FakeLink(script=(True, False, RuntimeError("broker said no"), True))
    box = open_outbox()
    a, b, c, d = (box.put("report", "t/r", f"secret-{n}".encode()) for n in range(4))
    box.start(link.publish, link.connected)

    assert box.flush(timeout=2.0)
    assert link.attempts == [a, b, b, b, c, d]
    assert [i.id for i in link.delivered] == [a, b, c, d]

    e = box.put("heartbeat", "t/hb", b"secret-e")  # the sender survived the raise
    assert box.flush(timeout=2.0)
    assert link.attempts[-1] == e
    assert "broker said no" in caplog.text
    assert "secret" not in caplog.text


def test_old_heartbeats_age_out_unsent_old_reports_do_not(open_outbox: OpenOutbox) -> None:
    now = [1000.0]
    box = open_outbox(max_age_s=3600, clock=lambda: now[0])
    box.put("heartbeat", "t/hb", b"h-old")
    box.put("report", "t/r", b"r-old")
    now[0] = 4000.0
    box.put("heartbeat", "t/hb", b"h-new")
    now[0] = 4700.0  # h-old is 3700 s old, h-new 700 s
    assert box.pending() == 3  # ageing happens in the send round, not in put()

    link = FakeLink()
    box.start(link.publish, link.connected)
    assert box.flush(timeout=2.0)
    assert [i.payload for i in link.delivered] == [b"r-old", b"h-new"]
    assert [i.created_at for i in link.delivered] == [1000.0, 4000.0]
    assert box.expired == 1
    assert box.dropped == 0


def test_item_repr_leaves_the_payload_out() -> None:
    item = OutboxItem(1, "report", "t/r", b"secret", 1, False, 0.0)
    assert "secret" not in repr(item)
    assert "topic='t/r'" in repr(item)
