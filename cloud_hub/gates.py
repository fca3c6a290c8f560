"""Health gates of a rollout wave: the updated devices against the devices still on the old version.

    p95_ms<=250             median p95 latency (ms) of the updated devices that served requests
    p95_ratio<=1.2          that median / the baseline's (devices on the old version that served)
    error_rate<=0.02        errors / requests summed over the updated devices' last heartbeats
    smoke_agreement>=0.9    the lowest smoke-test agreement an updated device reported

A verdict is ``pass``, ``breach``, ``idle`` or ``inconclusive``. No gate is judged, either way,
before the updated devices have served ``min_requests`` requests in their last heartbeat windows
together (``idle``: the wave waits for traffic; an idle device's p95 of 0 ms says nothing).
``inconclusive`` (``lacks`` says what): fewer than ``min_samples`` updated devices reported health
since their update (``samples``), no baseline for a ratio (``baseline``), too few smoke results
(``smoke``). Neither ever passes; the controller waits for traffic, and pauses when an
inconclusive verdict outlasts one more soak. A ratio whose missing baseline an operator waived
by resuming such a pause is left out (``waived``), and said so in the verdict.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from edgeglm.errors import UsageError

__all__ = ["METRICS", "Gate", "Verdict", "baseline_of", "evaluate", "parse_gate", "served"]

METRICS = ("p95_ms", "p95_ratio", "error_rate", "smoke_agreement")
_GATE = re.compile(r"^\s*([a-z0-9_]+)\s*(<=|>=|<|>)\s*([0-9]*\.?[0-9]+)\s*$")
_FORMS = "p95_ms<=250, p95_ratio<=1.2, error_rate<=0.02 or smoke_agreement>=0.9"


@dataclass(frozen=True)
class Gate:
    metric: str
    op: str
    threshold: float

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.threshold:g}"

    def holds(self, value: float) -> bool:
        return {
            "<=": value <= self.threshold,
            ">=": value >= self.threshold,
            "<": value < self.threshold,
            ">": value > self.threshold,
        }[self.op]


def parse_gate(text: str) -> Gate:
    m = _GATE.match(text)
    if not m:
        raise UsageError("gate", f"{text[:80]!r}: write METRIC<=BOUND, e.g. {_FORMS}")
    if m[1] not in METRICS:
        raise UsageError("gate", f"{m[1]!r} is not a gate metric; the metrics are {', '.join(METRICS)}")
    return Gate(m[1], m[2], float(m[3]))


@dataclass(frozen=True)
class Verdict:
    state: str  # pass | breach | idle | inconclusive
    detail: str
    values: dict[str, float] = field(default_factory=dict)
    lacks: str = ""  # inconclusive: samples | baseline | smoke


def _requests(h: dict[str, Any]) -> int:
    return int(h.get("requests", 0))


def served(healths: Sequence[dict[str, Any]]) -> int:
    """Requests the devices of ``healths`` served in their last heartbeat windows, together."""
    return sum(_requests(h) for h in healths)


def baseline_of(healths: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What the old version's devices that served requests show now (stored per wave: the last
    wave has none left); nothing when none of them served any (an idle box reports 0 ms)."""
    busy = [h for h in healths if "latency_p95_ms" in h and _requests(h) > 0]
    if not busy:
        return {}
    p95 = statistics.median(float(h["latency_p95_ms"]) for h in busy)
    return {"p95_ms": p95, "devices": len(busy), "requests": served(busy)}


def evaluate(
    gates: Sequence[Gate],
    updated: Sequence[dict[str, Any]],
    baseline: dict[str, Any],
    min_samples: int,
    min_requests: int = 1,
    *,
    waived: str = "",
) -> Verdict:
    """``updated``: the health each updated device reported after its update; ``waived``: who
    waived a missing baseline for this wave (the ratio is then left out)."""
    if not gates:
        return Verdict("pass", "no gates")
    if len(updated) < min_samples:
        got = f"{len(updated)} of {min_samples} health samples since the update"
        return Verdict("inconclusive", got, lacks="samples")
    total = served(updated)
    if total < max(min_requests, 1):
        return Verdict(
            "idle",
            f"waiting for traffic: the updated devices served {total} of the {min_requests} request(s)"
            " a gate needs (--gate-min-requests)",
        )
    busy = [h for h in updated if _requests(h) > 0]
    p95 = statistics.median(float(h.get("latency_p95_ms", 0.0)) for h in busy)
    values: dict[str, float] = {}
    notes: list[str] = []
    for gate in gates:
        if gate.metric == "p95_ms":
            values["p95_ms"] = p95
        elif gate.metric == "p95_ratio":
            if baseline.get("p95_ms"):
                values["p95_ratio"] = p95 / max(float(baseline["p95_ms"]), 1e-9)
            elif waived:
                notes.append(f"{gate} not evaluated: no baseline ({waived})")
            else:
                return Verdict(
                    "inconclusive",
                    "no baseline latency: no device on the old version served requests",
                    lacks="baseline",
                )
        elif gate.metric == "error_rate":
            values["error_rate"] = sum(int(h.get("errors", 0)) for h in busy) / total
        else:
            reported = [float(h["smoke_agreement"]) for h in updated if h.get("smoke_agreement") is not None]
            if len(reported) < min_samples:
                return Verdict(
                    "inconclusive", f"{len(reported)} of {min_samples} smoke-test results", lacks="smoke"
                )
            values["smoke_agreement"] = min(reported)
    judged = [g for g in gates if g.metric in values]
    broken = [f"{g} ({values[g.metric]:.3g})" for g in judged if not g.holds(values[g.metric])]
    if broken:
        return Verdict("breach", "gate breached: " + ", ".join(broken), values)
    held = [f"{g} ({values[g.metric]:.3g})" for g in judged]
    return Verdict("pass", ", ".join(held + notes) + f" over {total} request(s)", values)
