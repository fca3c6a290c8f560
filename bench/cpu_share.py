"""What else ran on the box while a benchmark process did: the load beside each measurement.

The machines are shared: a run that coincided with someone else's build is slower for reasons that
are not the engine's. :func:`measured` runs one command and records, from ``/proc/stat`` and the
kernel's accounting of our children, the CPU seconds *other* processes used during it (all busy
time minus the command's own), the steal time, and the 1-minute load average before it.
"""

from __future__ import annotations

import os
import resource
import subprocess
import time
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class CpuTimes:
    busy_s: float
    steal_s: float

    @classmethod
    def now(cls) -> CpuTimes:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:9]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields
        hz = os.sysconf("SC_CLK_TCK")
        return cls((user + nice + system + irq + softirq) / hz, steal / hz)


@dataclass(frozen=True)
class Load:
    wall_s: float
    own_cpu_s: float
    foreign_cpu_s: float  # CPU seconds other processes used during the run (all cores together)
    steal_s: float
    load1_before: float

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 2) for k, v in asdict(self).items()}


def foreign_cpu_s(before: CpuTimes, after: CpuTimes, own_cpu_s: float) -> float:
    """Busy CPU seconds between two readings that were not the measured command's own (>= 0)."""
    return max(0.0, after.busy_s - before.busy_s - own_cpu_s)


def _children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def measured(
    cmd: list[str], *, timeout: float = 1800, **kwargs: Any
) -> tuple[subprocess.CompletedProcess[str], Load]:
    """Run ``cmd`` (text output captured) and the load beside it."""
    load1 = os.getloadavg()[0]
    c0, s0, t0 = _children_cpu_s(), CpuTimes.now(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    wall, s1 = time.perf_counter() - t0, CpuTimes.now()
    own = _children_cpu_s() - c0
    return proc, Load(wall, own, foreign_cpu_s(s0, s1, own), s1.steal_s - s0.steal_s, load1)
