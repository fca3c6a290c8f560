"""The hub's Prometheus metrics (text format 0.0.4), kept in-process and thread-safe.

Counters only so far: HTTP requests by method and status, pieces received (new / already held)
and their bytes; the ingest and rollout controller add theirs through :meth:`HubMetrics.inc`.
"""

from __future__ import annotations

import threading
from collections import Counter

__all__ = ["HubMetrics"]

_HELP = {
    "edgeglm_hub_http_requests_total": "HTTP requests answered, by method and status",
    "edgeglm_hub_pieces_received_total": "bundle pieces received by publish, by whether they were new",
    "edgeglm_hub_piece_bytes_received_total": "bytes of bundle pieces received by publish",
}


class HubMetrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, tuple[tuple[str, str], ...]]] = Counter()

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._counts[key] += value

    def observe_request(self, method: str, status: int) -> None:
        self.inc("edgeglm_hub_http_requests_total", method=method, status=str(status))

    def observe_piece(self, size: int, new: bool) -> None:
        self.inc("edgeglm_hub_pieces_received_total", new="true" if new else "false")
        self.inc("edgeglm_hub_piece_bytes_received_total", float(size))

    def value(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._counts.get((name, tuple(sorted(labels.items()))), 0.0)

    def render(self) -> str:
        with self._lock:
            items = sorted(self._counts.items())
        lines: list[str] = []
        seen: set[str] = set()
        for (name, labels), value in items:
            if name not in seen:
                seen.add(name)
                lines.append(f"# HELP {name} {_HELP.get(name, name)}")
                lines.append(f"# TYPE {name} counter")
            text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            lines.append(f"{name}{{{text}}} {value:g}" if text else f"{name} {value:g}")
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
