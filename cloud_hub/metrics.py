"""The hub's Prometheus metrics (text format 0.0.4): counters and a latency histogram kept
in-process, thread-safe, and fleet gauges read from the database at each scrape.

    counters     declared in ``_COUNTERS`` with their HELP text and label names; every series a
                 known label value can take starts at 0 (an alert on ``rate()`` sees it before
                 the first event); ``inc`` refuses an undeclared name or label (a typo would
                 otherwise make a new, undocumented metric)
    histogram    ``edgeglm_hub_http_request_duration_seconds{route, method}``: the route is the
                 matched template (``/api/v1/devices/{device_id}``), ``unmatched`` for any other
                 path, and a method outside the HTTP verbs is ``other``, so that no client can grow
                 the label set (:class:`RequestTimer` observes it around the whole app)
    fleet        ``read_fleet``: two grouped COUNT queries (devices, rollouts) at scrape time, so
                 the gauges are what the inventory says now, with nothing to keep in step; a
                 database that does not answer leaves them out and sets
                 ``edgeglm_hub_database_up`` to 0 while the counters are still served

The ingest, the gateway and the routes add to the counters through :meth:`HubMetrics.inc`.
"""

from __future__ import annotations

import bisect
import logging
import math
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

from cloud_hub.db import Database
from cloud_hub.models import Device, Rollout
from edgeglm.lifecycle import RolloutState

__all__ = ["Fleet", "HubMetrics", "RequestTimer", "read_fleet"]

log = logging.getLogger(__name__)

_DROP_REASONS = ("backlog", "forbidden", "malformed", "rate_limited", "unknown_rollout", "wrong_device")

# name -> (HELP, label names, the label values each series starts with at 0)
_COUNTERS: dict[str, tuple[str, tuple[str, ...], tuple[tuple[str, ...], ...]]] = {
    "edgeglm_hub_http_requests_total": (
        "HTTP requests the hub answered, by method and status code.",
        ("method", "status"),
        (),
    ),
    "edgeglm_hub_pieces_received_total": (
        "Bundle pieces uploaded by publish, by whether the hub lacked them (new=true) or held them.",
        ("new",),
        (("false",), ("true",)),
    ),
    "edgeglm_hub_piece_bytes_received_total": ("Bytes of bundle pieces uploaded by publish.", (), ((),)),
    "edgeglm_hub_data_bytes_sent_total": (
        "Bytes of manifest and piece frames the hub sent to devices on their data topics.",
        (),
        ((),),
    ),
    "edgeglm_hub_device_messages_dropped_total": (
        "Device messages the hub dropped or refused, by reason.",
        ("reason",),
        tuple((r,) for r in _DROP_REASONS),
    ),
    "edgeglm_hub_pieces_served_total": (
        "Pieces sent to devices, by transport: mqtt (all frames of a piece), http (a 200 or 206 answer).",
        ("transport",),
        (("http",), ("mqtt",)),
    ),
    "edgeglm_hub_piece_bytes_served_total": (
        "Bytes of encoded pieces sent to devices (frame payloads, HTTP bodies), by transport.",
        ("transport",),
        (("http",), ("mqtt",)),
    ),
    "edgeglm_hub_have_dropped_total": (
        "Versions a device named as held (have) that it was never given nor reported, or past the"
        " first 8: dropped before planning (no delta base), by transport.",
        ("transport",),
        (("http",), ("mqtt",)),
    ),
    "edgeglm_hub_encode_cache_total": (
        "Piece encodings (raw or delta) asked for: hit in this process's cache, read from the piece"
        " store (another replica made it), or miss (encoded here).",
        ("result",),
        (("hit",), ("store",), ("miss",)),
    ),
    "edgeglm_hub_heartbeats_total": ("Device heartbeats written to the inventory.", (), ((),)),
    "edgeglm_hub_status_total": (
        "Device status (registration) messages written to the inventory.",
        (),
        ((),),
    ),
    "edgeglm_hub_store_corrupt_total": (
        "Pieces whose stored bytes no longer matched their digest when a device fetched them.",
        (),
        ((),),
    ),
}
_LATENCY = "edgeglm_hub_http_request_duration_seconds"
_LATENCY_HELP = "Time from a request's arrival to the end of its answer, by route template and method."
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"  # the route label of a path no route serves

_GAUGES = {
    "edgeglm_hub_devices": "Devices in the inventory, by whether the hub counts them online.",
    "edgeglm_hub_devices_by_version": (
        "Devices by the release they run, as model@version (none: nothing installed yet)."
    ),
    "edgeglm_hub_devices_by_profile": "Devices by the device profile they registered with.",
    "edgeglm_hub_rollouts": "Rollouts by state (running, paused and the final states).",
}
_DATABASE_UP = "edgeglm_hub_database_up"
_DATABASE_UP_HELP = "Whether the database answered this scrape's fleet queries (1) or not (0)."
_NONE = "none"


def method_label(method: str) -> str:
    """An HTTP verb as sent, anything else ``other``: a label no client can multiply."""
    return method if method in _METHODS else "other"


@dataclass(frozen=True)
class Fleet:
    """The inventory's counts at one scrape."""

    online: Mapping[bool, int]
    by_version: Mapping[str, int]
    by_profile: Mapping[str, int]
    rollouts: Mapping[str, int]


def read_fleet(db: Database) -> Fleet | None:
    """Devices and rollouts counted by the database (two GROUP BY queries); None if it fails."""
    try:
        with db.session() as s:
            devices = s.execute(
                select(
                    Device.online, Device.profile, Device.current_model, Device.current_version, func.count()
                ).group_by(Device.online, Device.profile, Device.current_model, Device.current_version)
            ).all()
            rollouts = s.execute(select(Rollout.state, func.count()).group_by(Rollout.state)).all()
    except SQLAlchemyError as exc:
        log.warning("metrics: the fleet gauges are left out: %s", str(exc).splitlines()[0][:300])
        return None
    online: Counter[bool] = Counter({True: 0, False: 0})
    by_version: Counter[str] = Counter()
    by_profile: Counter[str] = Counter()
    for is_online, profile, model, version, n in devices:
        online[bool(is_online)] += n
        by_version[f"{model}@{version}" if model and version else _NONE] += n
        by_profile[profile or _NONE] += n
    states: Counter[str] = Counter({state.value: 0 for state in RolloutState})
    for state, n in rollouts:
        states[str(state)] += n
    return Fleet(online, by_version, by_profile, states)


@dataclass
class _Histogram:
    bounds: tuple[float, ...]
    counts: list[int] = field(init=False)  # per bucket, the last one +Inf; cumulated when rendered
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value


class HubMetrics:
    """One per hub process; every method is safe from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: defaultdict[tuple[str, tuple[tuple[str, str], ...]], float] = defaultdict(float)
        for name, (_, labels, initial) in _COUNTERS.items():
            for values in initial:
                self._counts[(name, tuple(sorted(zip(labels, values, strict=True))))] += 0
        self._latency: dict[tuple[str, str], _Histogram] = {}

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        declared = _COUNTERS.get(name)
        if declared is None:
            raise ValueError(f"{name} is not a declared hub counter (cloud_hub.metrics._COUNTERS)")
        if set(labels) != set(declared[1]):
            raise ValueError(f"{name} takes the labels {declared[1]}, not {tuple(labels)}")
        if not value >= 0:
            raise ValueError(f"{name}: a counter only goes up, not by {value!r}")
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._counts[key] += value

    def observe_request(self, method: str, status: int) -> None:
        self.inc("edgeglm_hub_http_requests_total", method=method_label(method), status=str(status))

    def observe_latency(self, route: str, method: str, seconds: float) -> None:
        key = (route, method_label(method))
        with self._lock:
            histogram = self._latency.get(key)
            if histogram is None:
                histogram = self._latency[key] = _Histogram(_LATENCY_BUCKETS)
            histogram.observe(max(0.0, seconds))

    def observe_piece(self, size: int, new: bool) -> None:
        self.inc("edgeglm_hub_pieces_received_total", new="true" if new else "false")
        self.inc("edgeglm_hub_piece_bytes_received_total", float(size))

    def value(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._counts.get((name, tuple(sorted(labels.items()))), 0.0)

    def render(self, fleet: Fleet | None = None, *, database_up: bool | None = None) -> str:
        """Every family; the fleet gauges when ``fleet`` is given, ``edgeglm_hub_database_up``
        when ``database_up`` is (``/metrics`` passes both: the gauges and whether they were read)."""
        with self._lock:
            counts = dict(self._counts)
            latency = {key: (list(h.counts), h.total) for key, h in self._latency.items()}
        lines: list[str] = []
        for name, (help_text, _, _) in _COUNTERS.items():
            lines += _header(name, "counter", help_text)
            series = sorted((labels, v) for (n, labels), v in counts.items() if n == name)
            lines += [_sample(name, labels, v) for labels, v in series]
        lines += _header(_LATENCY, "histogram", _LATENCY_HELP)
        for (route, method), (buckets, total) in sorted(latency.items()):
            base = (("method", method), ("route", route))
            running = 0
            for bound, n in zip((*_LATENCY_BUCKETS, math.inf), buckets, strict=True):
                running += n
                lines.append(_sample(f"{_LATENCY}_bucket", (*base, ("le", _number(bound))), running))
            lines.append(_sample(f"{_LATENCY}_sum", base, total))
            lines.append(_sample(f"{_LATENCY}_count", base, running))
        if fleet is not None:
            online = {"true" if k else "false": v for k, v in fleet.online.items()}
            for name, label, values in (
                ("edgeglm_hub_devices", "online", online),
                ("edgeglm_hub_devices_by_version", "version", fleet.by_version),
                ("edgeglm_hub_devices_by_profile", "profile", fleet.by_profile),
                ("edgeglm_hub_rollouts", "state", fleet.rollouts),
            ):
                lines += _header(name, "gauge", _GAUGES[name])
                lines += [_sample(name, ((label, k),), v) for k, v in sorted(values.items())]
        if database_up is not None:
            lines += _header(_DATABASE_UP, "gauge", _DATABASE_UP_HELP)
            lines.append(_sample(_DATABASE_UP, (), 1 if database_up else 0))
        return "\n".join(lines) + "\n"


class RequestTimer:
    """ASGI middleware: each HTTP request's duration into the latency histogram, labelled with
    the template of the route that serves it (matched as the router will), never the raw path."""

    def __init__(self, app: ASGIApp, *, metrics: HubMetrics, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes  # each route as it matches (not a router that holds routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.metrics.observe_latency(
                route_template(self.routes, scope), scope["method"], time.perf_counter() - started
            )


def route_template(routes: Iterable[BaseRoute], scope: Scope) -> str:
    """The path template of the route that serves ``scope`` (or refuses its method), else
    ``unmatched``."""
    partial = None
    for route in routes:
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return str(getattr(route, "path", UNMATCHED))
        if match is Match.PARTIAL and partial is None:
            partial = str(getattr(route, "path", UNMATCHED))
    return partial or UNMATCHED


def _header(name: str, kind: str, help_text: str) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]


def _sample(name: str, labels: Iterable[tuple[str, str]], value: float) -> str:
    text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
    return f"{name}{{{text}}} {_number(value)}" if text else f"{name} {_number(value)}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
