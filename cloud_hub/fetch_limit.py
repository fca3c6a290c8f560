"""How much one device may ask of the gateway: a token bucket per device, checked on paho's thread
before a fetch request is queued, so that one flooding device cannot fill the shared backlog.

    request ──> admit(device) ──ok──> queued for a worker ──> finished(device, bytes sent)
                    │
                    └─ over ──> Refusal(wait_s, notify): the gateway answers the first refusal
                                of a burst with one ERROR frame ``rate_limited`` ("retry after
                                N s") and drops the rest silently until the device is admitted again

Per device, three limits (:class:`FetchLimits`, from the hub's settings):

    requests_per_s, burst   a request costs one token; the bucket holds ``burst`` and refills at
                            ``requests_per_s``. The default burst (200) exceeds every request of a
                            whole 1.5B update (about 2,000 pieces in requests of 32), so a normal
                            update never waits; a flood gets ``requests_per_s`` after the burst
    pending                 requests of the device queued or in work at once (the agent keeps
                            ``window`` = 8 in flight): the share of the backlog one device can hold
    bytes_per_s             frame bytes sent to the device; a request is refused while the device
                            is in debt (0: no cap, the default — the request limits bound the work)

A bucket that has refilled completely (and holds no pending request) is the same as a new one, so
it is dropped: the table holds only devices active within the last ``burst / requests_per_s``
seconds, and at most ``max_devices`` of them (least recently seen out first).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from edgeglm.errors import ConfigError

__all__ = ["FetchLimiter", "FetchLimits", "Refusal"]


@dataclass(frozen=True)
class FetchLimits:
    requests_per_s: float = 20.0
    burst: int = 200
    pending: int = 64
    bytes_per_s: int = 0  # 0: no cap on bytes
    max_devices: int = 100_000

    def __post_init__(self) -> None:
        if not self.requests_per_s > 0:
            raise ConfigError("fetch rate", f"{self.requests_per_s} requests/s: must be above 0")
        for name in ("burst", "pending", "max_devices"):
            if getattr(self, name) < 1:
                raise ConfigError(f"fetch {name}", f"{getattr(self, name)}: must be at least 1")
        if self.bytes_per_s < 0:
            raise ConfigError("fetch bytes rate", f"{self.bytes_per_s}: must be 0 (no cap) or more")


@dataclass(frozen=True)
class Refusal:
    """A request over the device's limits: wait ``wait_s``; ``notify`` for the first of a burst."""

    wait_s: float
    notify: bool
    why: str


@dataclass
class _Bucket:
    tokens: float
    bytes: float
    at: float
    pending: int = 0
    refused: bool = False  # refused since the last admission: the device has been told


class FetchLimiter:
    def __init__(
        self, limits: FetchLimits | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limits = limits or FetchLimits()
        self.clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._buckets)

    def admit(self, device_id: str) -> Refusal | None:
        """None: the request may be queued (call :meth:`finished` when it is done); else why not."""
        lim = self.limits
        now = self.clock()
        with self._lock:
            b = self._bucket(device_id, now)
            wait, why = 0.0, ""
            if b.tokens < 1:
                wait, why = (1 - b.tokens) / lim.requests_per_s, f"over {lim.requests_per_s:g} requests/s"
            elif b.pending >= lim.pending:
                wait, why = 1.0, f"{b.pending} requests already queued"
            elif lim.bytes_per_s and b.bytes < 0:
                wait, why = -b.bytes / lim.bytes_per_s, f"over {lim.bytes_per_s} bytes/s"
            if why:
                notify, b.refused = not b.refused, True
                return Refusal(round(max(wait, 0.1), 1), notify, why)
            b.tokens -= 1
            b.pending += 1
            b.refused = False
            return None

    def finished(self, device_id: str, sent_bytes: int = 0) -> None:
        """An admitted request is done; ``sent_bytes`` count against the device's byte rate."""
        with self._lock:
            b = self._buckets.get(device_id)
            if b is None:
                return  # evicted by the table's size bound meanwhile
            b.pending = max(0, b.pending - 1)
            b.bytes -= sent_bytes

    def _bucket(self, device_id: str, now: float) -> _Bucket:
        lim = self.limits
        b = self._buckets.get(device_id)
        if b is None:
            b = _Bucket(float(lim.burst), float(lim.bytes_per_s), now)
            self._buckets[device_id] = b
        else:
            elapsed = max(0.0, now - b.at)
            b.tokens = min(float(lim.burst), b.tokens + elapsed * lim.requests_per_s)
            b.bytes = min(float(lim.bytes_per_s), b.bytes + elapsed * lim.bytes_per_s)
            b.at = now
            self._buckets.move_to_end(device_id)
        self._evict(now)
        return b

    def _evict(self, now: float) -> None:
        """Drop buckets from the least recently seen end while they have refilled completely."""
        lim = self.limits
        full_after = lim.burst / lim.requests_per_s
        if lim.bytes_per_s:
            full_after = max(full_after, 1.0)  # a byte bucket holds one second's worth
        while self._buckets:
            device_id, b = next(iter(self._buckets.items()))
            idle = now - b.at
            debt_paid = not lim.bytes_per_s or b.bytes + idle * lim.bytes_per_s >= lim.bytes_per_s
            if b.pending == 0 and idle >= full_after and debt_paid:
                del self._buckets[device_id]
            elif len(self._buckets) > lim.max_devices:
                del self._buckets[device_id]  # the table's bound: the oldest goes, even if not idle
            else:
                break
