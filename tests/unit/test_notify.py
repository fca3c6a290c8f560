"""The systemd notify protocol against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.notify import Watchdog, notify, watchdog_interval

TICK = 0.05


def _recv(sock: socket.socket, timeout: float) -> bytes | None:
    sock.settimeout(timeout)
    try:
        return sock.recv(4096)
    except TimeoutError:
        return None


def _drain(sock: socket.socket) -> list[bytes]:
    out = []
    while (msg := _recv(sock, 0.01)) is not None:
        out.append(msg)
    return out


def _collect(sock: socket.socket, window: float) -> list[bytes]:
    out = []
    end = time.monotonic() + window
    while (left := end - time.monotonic()) > 0:
        msg = _recv(sock, left)
        if msg is not None:
            out.append(msg)
    return out


@pytest.fixture
def systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A bound datagram socket that NOTIFY_SOCKET points at, as systemd's would be."""
    path = tmp_path / "n.sock"
    if len(str(path)) > 100:  # sun_path holds 108 bytes; a deep tmp_path would not fit
        path = Path(tempfile.mkdtemp(prefix="sdn")) / "n.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    try:
        yield sock
    finally:
        sock.close()
        path.unlink(missing_ok=True)


def test_notify_sends_one_datagram(systemd: socket.socket) -> None:
    assert notify("READY=1") is True
    assert _recv(systemd, 2.0) == b"READY=1"
    assert notify("STATUS=loading model") is True
    assert _recv(systemd, 2.0) == b"STATUS=loading model"


def test_notify_abstract_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"edgeglm-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify("STOPPING=1") is True
        assert _recv(sock, 2.0) == b"STOPPING=1"


def test_notify_without_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert notify("READY=1") is False


def test_notify_never_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert notify("READY=1") is False


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("", None, None),
        ("30000000", None, 30.0),
        ("500000", "self", 0.5),
        ("30000000", "other", None),
        ("30000000", "not-a-pid", None),
        ("0", None, None),
        ("-5", None, None),
        ("thirty", None, None),
    ],
)
def test_watchdog_interval(
    usec: str | None, pid: str | None, expected: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(var, raising=False)
        else:
            value = {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(value, value)
            monkeypatch.setenv(var, value)
    assert watchdog_interval() == expected


def test_watchdog_defaults_to_half_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert Watchdog(lambda: True).interval_s == 15.0
    assert Watchdog(lambda: True, interval_s=2.0).interval_s == 2.0


def test_watchdog_without_interval_starts_no_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    calls: list[int] = []

    def healthy() -> bool:
        calls.append(1)
        return True

    dog = Watchdog(healthy)
    assert dog.interval_s is None
    dog.start()
    assert not dog.running
    dog.stop()
    assert calls == []


def test_watchdog_pets_while_healthy(systemd: socket.socket) -> None:
    dog = Watchdog(lambda: True, interval_s=TICK)
    dog.start()
    try:
        got = _collect(systemd, 0.6)
    finally:
        dog.stop()
    assert not dog.running
    assert len(got) >= 3, got
    assert set(got) == {b"WATCHDOG=1"}
    _drain(systemd)
    assert _recv(systemd, 0.3) is None  # stopped: no more pets


def test_watchdog_stops_petting_while_unhealthy(
    systemd: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    ok = threading.Event()
    ok.set()
    dog = Watchdog(ok.is_set, interval_s=TICK)
    caplog.set_level(logging.INFO, logger="edge_agent.notify")
    dog.start()
    try:
        assert _recv(systemd, 2.0) == b"WATCHDOG=1"
        ok.clear()
        time.sleep(3 * TICK)  # a tick that read "healthy" just before the flip may still send
        _drain(systemd)
        assert _recv(systemd, 0.3) is None
        ok.set()
        assert _recv(systemd, 2.0) == b"WATCHDOG=1"  # recovers without a restart of the thread
    finally:
        dog.stop()
    unhealthy = [r for r in caplog.records if r.levelno == logging.WARNING and "unhealthy" in r.message]
    assert len(unhealthy) == 1, [r.message for r in caplog.records]


def test_watchdog_counts_a_raising_check_as_unhealthy(
    systemd: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    broken = threading.Event()

    def healthy() -> bool:
        if broken.is_set():
            raise RuntimeError("engine gone")
        return True

    dog = Watchdog(healthy, interval_s=TICK)
    caplog.set_level(logging.DEBUG, logger="edge_agent.notify")
    dog.start()
    try:
        assert _recv(systemd, 2.0) == b"WATCHDOG=1"
        broken.set()
        time.sleep(3 * TICK)
        _drain(systemd)
        assert _recv(systemd, 0.3) is None
        assert dog.running  # the exception did not kill the thread
    finally:
        dog.stop()
    raised = [r for r in caplog.records if r.levelno == logging.WARNING and "engine gone" in r.message]
    assert len(raised) == 1, [r.message for r in caplog.records]
