"""systemd's notify protocol without a dependency: readiness, status and the watchdog pet.

``notify`` sends one state string (``READY=1``, ``STATUS=...``, ``WATCHDOG=1``, ``STOPPING=1``) as a
datagram to ``$NOTIFY_SOCKET``; outside systemd (no socket) it does nothing and says so. It never
raises: a lost notification must not take the agent down. ``Watchdog`` pets systemd only while a
health check passes, so a wedged engine stops the pets and systemd restarts the service
(``WatchdogSec=`` in the unit); a healthy agent with a live event loop but a dead engine is not
healthy.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable

__all__ = ["Watchdog", "notify", "watchdog_interval"]

log = logging.getLogger(__name__)


def _address(raw: str) -> str | bytes:
    # a leading '@' names a socket in Linux's abstract namespace: the kernel wants a NUL there
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    return raw


def notify(state: str) -> bool:
    """Send ``state`` to systemd; True when sent, False when no socket is set or the send failed."""
    raw = os.environ.get("NOTIFY_SOCKET", "")
    if not raw:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), _address(raw))
    except OSError as exc:
        log.debug("sd_notify %r to %s failed: %s", state, raw, exc)
        return False
    return True


def watchdog_interval() -> float | None:
    """The watchdog timeout systemd set for this process, in seconds; None when there is none.

    From ``$WATCHDOG_USEC``; when ``$WATCHDOG_PID`` is set it must be this process (otherwise the
    variable was inherited from a parent and is not meant for us).
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID", "")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    return value / 1_000_000


class Watchdog:
    """Pets systemd's watchdog every ``interval_s`` while ``healthy()`` returns True.

    ``interval_s`` defaults to half the watchdog timeout systemd set (``watchdog_interval()``);
    without either there is nothing to pet and ``start()`` starts no thread. An exception in
    ``healthy()`` counts as unhealthy. While unhealthy nothing is sent, so systemd's timeout runs
    out and it restarts the service; each change of health is logged once.
    """

    def __init__(self, healthy: Callable[[], bool], interval_s: float | None = None) -> None:
        if interval_s is None:
            timeout = watchdog_interval()
            interval_s = timeout / 2 if timeout is not None else None
        if interval_s is not None and interval_s <= 0:
            raise ValueError(f"watchdog interval must be positive, got {interval_s}")
        self.healthy = healthy
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._was_healthy = True

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start petting in a daemon thread; a no-op without an interval or when already running."""
        if self.interval_s is None or self.running:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop petting and wait for the thread to end."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _check(self) -> bool:
        try:
            ok = bool(self.healthy())
        except Exception as exc:
            if self._was_healthy:
                log.warning("watchdog health check raised, not petting systemd: %r", exc)
            else:
                log.debug("watchdog health check raised again: %r", exc)
            return False
        if not ok and self._was_healthy:
            log.warning("agent unhealthy, not petting systemd's watchdog")
        return ok

    def _tick(self) -> None:
        ok = self._check()
        if ok:
            if not self._was_healthy:
                log.info("agent healthy again, petting systemd's watchdog")
            notify("WATCHDOG=1")
        self._was_healthy = ok

    def _run(self) -> None:
        interval = self.interval_s
        if interval is None:
            return
        while True:
            self._tick()
            if self._stop.wait(interval):
                return
