"""Health gates of a rollout wave: the updated devices against the devices still on the old version.

    p95_ratio<=1.2          median p95 latency of updated devices / the baseline's median p95
    error_rate<=0.02        errors / requests summed over the updated devices' last heartbeats
    smoke_agreement>=0.9    the lowest smoke-test agreement an updated device reported

A verdict is ``pass``, ``breach`` or ``inconclusive``: fewer than ``min_samples`` updated devices
have reported health since their update (or no baseline exists for a ratio). Inconclusive never
passes; the controller waits, then pauses the rollout.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from edgeglm.errors import UsageError

__all__ = ["Gate", "Verdict", "baseline_of", "evaluate", "parse_gate"]

_GATE = re.compile(r"^\s*(p95_ratio|error_rate|smoke_agreement)\s*(<=|>=|<|>)\s*([0-9]*\.?[0-9]+)\s*$")


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
        raise UsageError(
            "gate", f"{text[:80]!r}: write p95_ratio<=1.2, error_rate<=0.02 or smoke_agreement>=0.9"
        )
    return Gate(m[1], m[2], float(m[3]))


@dataclass(frozen=True)
class Verdict:
    state: str  # pass | breach | inconclusive
    detail: str
    values: dict[str, float] = field(default_factory=dict)


def baseline_of(healths: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What the old version's devices show now (stored per wave: the last wave has none left)."""
    p95s = [float(h["latency_p95_ms"]) for h in healths if "latency_p95_ms" in h]
    return {"p95_ms": statistics.median(p95s), "devices": len(p95s)} if p95s else {}


def evaluate(
    gates: Sequence[Gate], updated: Sequence[dict[str, Any]], baseline: dict[str, Any], min_samples: int
) -> Verdict:
    """``updated``: the health each updated device reported after its update."""
    if not gates:
        return Verdict("pass", "no gates")
    if len(updated) < min_samples:
        return Verdict("inconclusive", f"{len(updated)} of {min_samples} health samples since the update")
    values: dict[str, float] = {}
    for gate in gates:
        if gate.metric == "p95_ratio":
            if not baseline.get("p95_ms"):
                return Verdict("inconclusive", "no baseline latency from devices on the old version")
            p95 = statistics.median(float(h["latency_p95_ms"]) for h in updated)
            values["p95_ratio"] = p95 / max(float(baseline["p95_ms"]), 1e-9)
        elif gate.metric == "error_rate":
            requests = sum(int(h.get("requests", 0)) for h in updated)
            errors = sum(int(h.get("errors", 0)) for h in updated)
            values["error_rate"] = (
                errors / requests
                if requests
                else statistics.fmean(float(h.get("error_rate", 0.0)) for h in updated)
            )
        else:
            reported = [float(h["smoke_agreement"]) for h in updated if h.get("smoke_agreement") is not None]
            if len(reported) < min_samples:
                return Verdict("inconclusive", f"{len(reported)} of {min_samples} smoke-test results")
            values["smoke_agreement"] = min(reported)
    broken = [f"{g} ({values[g.metric]:.3g})" for g in gates if not g.holds(values[g.metric])]
    if broken:
        return Verdict("breach", "gate breached: " + ", ".join(broken), values)
    return Verdict("pass", ", ".join(f"{g} ({values[g.metric]:.3g})" for g in gates), values)
