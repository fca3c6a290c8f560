"""The edge agent's Prometheus metrics and its heartbeat health summary.

One :class:`Metrics` per agent process records every request, rejection and decode step. It renders
the Prometheus text exposition format 0.0.4 (``render``) for a local scrape, and summarises a sliding
window of per-request samples into the :class:`edgeglm.protocol.Health` a heartbeat carries
(``health``). Standard library only: no ``prometheus_client`` on an edge box.
"""

from __future__ import annotations

import bisect
import math
import os
import resource
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

from edgeglm.protocol import Health

__all__ = ["Metrics", "current_rss_mb"]

_PREFIX = "edgeglm_agent_"
_OK_OUTCOMES = frozenset({"stop", "length", "cancelled"})
_MAX_SAMPLES = 10_000
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_FAST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_BATCH_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
_MIB = 1024 * 1024


def _rss_bytes() -> int:
    """Current resident set size: ``/proc/self/statm`` where there is one, else peak ``ru_maxrss``."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def current_rss_mb() -> float:
    """Current resident set size of this process in MiB."""
    return _rss_bytes() / _MIB


def _escape(value: str) -> str:
    """A label value escaped per the exposition format: backslash, double quote, newline."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    """A sample value or bucket bound as Prometheus writes it (``+Inf``, ``1`` rather than ``1.0``)."""
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def _header(name: str, kind: str, help_text: str) -> list[str]:
    return [f"# HELP {_PREFIX}{name} {help_text}", f"# TYPE {_PREFIX}{name} {kind}"]


def _labelled(name: str, label: str, values: Iterable[tuple[str, float]]) -> list[str]:
    return [f'{_PREFIX}{name}{{{label}="{_escape(key)}"}} {_number(n)}' for key, n in values]


class _Histogram:
    """Cumulative-bucket histogram; the caller holds the lock."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last slot is +Inf
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # first bound with value <= le
        self.total += value
        self.count += 1

    def lines(self, name: str, help_text: str) -> list[str]:
        out = _header(name, "histogram", help_text)
        running = 0
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += n
            out.append(f'{_PREFIX}{name}_bucket{{le="{_number(bound)}"}} {running}')
        out.append(f"{_PREFIX}{name}_sum {_number(self.total)}")
        out.append(f"{_PREFIX}{name}_count {self.count}")
        return out


class _Sample(NamedTuple):
    """One finished or rejected request, as the health window sees it."""

    at: float
    latency_s: float | None  # None for a rejection: it never ran
    completion_tokens: int
    error: bool


def _percentile(ordered: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty sequence."""
    return ordered[max(0, math.ceil(p * len(ordered)) - 1)]


class Metrics:
    """Thread-safe; one per agent process.

    Outcomes ``stop``, ``length`` and ``cancelled`` are successes; any other outcome is an error code
    and also counts in ``errors_total{code=...}``. Negative durations and counts are clamped to 0, so
    a caller's clock hiccup never breaks serving.
    """

    def __init__(
        self,
        *,
        model: str = "",
        version: str = "",
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s must be positive, got {window_s!r}")
        self._lock = threading.Lock()
        self._clock = clock
        self._window_s = float(window_s)
        self._started_at = clock()
        self._model, self._version = model, version
        self._requests: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()
        self._tokens: Counter[str] = Counter(prompt=0, completion=0, prompt_cached=0)
        self._latency = _Histogram(_LATENCY_BUCKETS)
        self._ttft = _Histogram(_FAST_BUCKETS)
        self._queue_wait = _Histogram(_FAST_BUCKETS)
        self._batch = _Histogram(_BATCH_BUCKETS)
        self._queue_depth = 0
        self._in_flight = 0
        self._samples: deque[_Sample] = deque(maxlen=_MAX_SAMPLES)
        self._update_bytes: Counter[str] = Counter(http=0, mqtt=0)
        self._fallbacks: Counter[str] = Counter()

    def update_bytes(self, transport: str, n: int) -> None:
        """``n`` bytes of encoded pieces arrived over ``transport`` (``http`` or ``mqtt``)."""
        with self._lock:
            self._update_bytes[transport] += max(0, n)

    def http_fallback(self, reason: str) -> None:
        """A piece the hub offered over HTTP was taken over MQTT instead (``reason``: status, ...)."""
        with self._lock:
            self._fallbacks[reason] += 1

    def set_model(self, model: str, version: str) -> None:
        """Name the model the agent now serves (``model_info``)."""
        with self._lock:
            self._model, self._version = model, version

    def request_started(self) -> None:
        """A request was admitted: one more in flight."""
        with self._lock:
            self._in_flight += 1

    def request_finished(
        self,
        *,
        outcome: str,
        latency_s: float,
        ttft_s: float | None,
        prompt_tokens: int,
        completion_tokens: int,
        queue_s: float = 0.0,
        cached_tokens: int = 0,
    ) -> None:
        """A request ended with ``outcome``; safe without a matching ``request_started``."""
        error = outcome not in _OK_OUTCOMES
        latency_s, queue_s = max(0.0, latency_s), max(0.0, queue_s)
        prompt_tokens, completion_tokens = max(0, prompt_tokens), max(0, completion_tokens)
        with self._lock:
            self._in_flight = max(0, self._in_flight - 1)
            self._requests[outcome] += 1
            if error:
                self._errors[outcome] += 1
            self._tokens["prompt"] += prompt_tokens
            self._tokens["completion"] += completion_tokens
            self._tokens["prompt_cached"] += max(0, cached_tokens)
            self._latency.observe(latency_s)
            if ttft_s is not None:
                self._ttft.observe(max(0.0, ttft_s))
            self._queue_wait.observe(queue_s)
            self._record(_Sample(self._clock(), latency_s, completion_tokens, error))

    def rejected(self, code: str, *, health: bool = True) -> None:
        """A request refused before it was queued: an error outcome with no latency sample.

        ``health=False``: refused by the front itself (no token, too many in flight), whatever the
        model: counted for Prometheus but kept out of the heartbeat's window, so strangers or a
        flood cannot push an updated box's error rate past a rollout gate.
        """
        with self._lock:
            self._requests[code] += 1
            self._errors[code] += 1
            if health:
                self._record(_Sample(self._clock(), None, 0, True))

    def observe_batch(self, size: int) -> None:
        """One decode step ran with ``size`` sequences."""
        with self._lock:
            self._batch.observe(max(0, size))

    def set_queue_depth(self, depth: int) -> None:
        """Requests now waiting for a decode slot."""
        with self._lock:
            self._queue_depth = max(0, depth)

    def _record(self, sample: _Sample) -> None:
        self._samples.append(sample)
        self._prune(sample.at)

    def _prune(self, now: float) -> None:
        horizon = now - self._window_s
        while self._samples and self._samples[0].at < horizon:
            self._samples.popleft()

    def render(self) -> str:
        """Every family in the Prometheus text exposition format 0.0.4."""
        rss = _rss_bytes()
        with self._lock:
            lines = [
                *_header(
                    "requests_total", "counter", "Requests by outcome (stop, length, cancelled or error)."
                ),
                *_labelled("requests_total", "outcome", sorted(self._requests.items())),
                *_header("errors_total", "counter", "Requests that ended in an error, by error code."),
                *_labelled("errors_total", "code", sorted(self._errors.items())),
                *_header(
                    "tokens_total", "counter", "Tokens by kind: prompt, completion, prompt_cached (reused)."
                ),
                *_labelled("tokens_total", "kind", sorted(self._tokens.items())),
                *self._latency.lines("request_latency_seconds", "Request latency from admission to end."),
                *self._ttft.lines("time_to_first_token_seconds", "Time from admission to the first token."),
                *self._queue_wait.lines("queue_wait_seconds", "Time a request waited for a decode slot."),
                *self._batch.lines("batch_size", "Sequences per decode step."),
                *_header("queue_depth", "gauge", "Requests waiting for a decode slot."),
                f"{_PREFIX}queue_depth {self._queue_depth}",
                *_header("requests_in_flight", "gauge", "Requests admitted and not yet finished."),
                f"{_PREFIX}requests_in_flight {self._in_flight}",
                *_header("update_bytes_total", "counter", "Bytes of encoded pieces received, by transport."),
                *_labelled("update_bytes_total", "transport", sorted(self._update_bytes.items())),
                *_header(
                    "update_http_fallbacks_total",
                    "counter",
                    "Pieces offered over HTTP that were taken over MQTT instead, by reason.",
                ),
                *_labelled("update_http_fallbacks_total", "reason", sorted(self._fallbacks.items())),
                *_header("model_info", "gauge", "The model and version being served."),
                f'{_PREFIX}model_info{{model="{_escape(self._model)}",version="{_escape(self._version)}"}} 1',
            ]
        lines += _header("resident_memory_bytes", "gauge", "Current resident set size of the agent process.")
        lines.append(f"{_PREFIX}resident_memory_bytes {rss}")
        return "\n".join(lines) + "\n"

    def health(self, rss_mb: float | None = None) -> Health:
        """Summary of the last ``window_s`` seconds for a heartbeat (``smoke_agreement`` left None).

        Percentiles are nearest-rank over the latencies of finished requests. Tokens per second
        divide the window's completion tokens by the span the window actually covers: at most
        ``window_s``, no more than the time since start, and no more than the retained samples reach
        back once the sample cap has evicted some of the window; never less than one second, so a
        heartbeat sent just after start does not report a burst as a huge rate.
        """
        with self._lock:
            now = self._clock()
            self._prune(now)
            window = list(self._samples)
            covered = min(self._window_s, now - self._started_at)
            if len(window) == _MAX_SAMPLES:
                covered = min(covered, now - window[0].at)
            queue_depth = self._queue_depth
        latencies = sorted(s.latency_s for s in window if s.latency_s is not None)
        errors = sum(1 for s in window if s.error)
        tokens = sum(s.completion_tokens for s in window)
        return Health(
            latency_p50_ms=_percentile(latencies, 0.50) * 1000 if latencies else 0.0,
            latency_p95_ms=_percentile(latencies, 0.95) * 1000 if latencies else 0.0,
            tokens_per_s=tokens / max(covered, 1.0),
            error_rate=errors / len(window) if window else 0.0,
            queue_depth=queue_depth,
            rss_mb=current_rss_mb() if rss_mb is None else float(rss_mb),
            requests=len(window),
            errors=errors,
        )
