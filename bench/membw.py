"""The memory read-bandwidth probe run beside each benchmark round (the roofline's denominator).

Batch-1 decode reads every weight once per token, so tokens/s can be at most
``read bandwidth / bytes read per token``. ``membw.c`` (next to this file) sums a 1 GiB array with
the benchmark's thread count; it is compiled once with ``gcc -O3 -march=native -fopenmp`` into the
bench cache and run for about a second before each measured run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import subprocess
from pathlib import Path

from bench.anchor_build import CACHE

SOURCE = Path(__file__).with_name("membw.c")


def binary() -> Path:
    """The compiled probe, rebuilt only when the source changed."""
    if shutil.which("gcc") is None:
        raise RuntimeError("the bandwidth probe needs gcc (apt-get install gcc)")
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:10]
    exe = CACHE / f"membw-{digest}"
    if not exe.exists():
        exe.parent.mkdir(parents=True, exist_ok=True)
        tmp = exe.with_suffix(".tmp")
        subprocess.run(["gcc", "-O3", "-march=native", "-fopenmp", str(SOURCE), "-o", str(tmp)], check=True)
        tmp.replace(exe)
    return exe


def read_gb_s(threads: int, mib: int = 1024, repeats: int = 5) -> dict[str, float | list[float]]:
    """Read bandwidth with ``threads`` threads: every repeat's GB/s and their median."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_PROC_BIND="close")
    out = subprocess.run([str(binary()), str(mib), str(repeats)], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"membw failed: {out.stderr.strip()}")
    runs = [float(x) for x in json.loads(out.stdout)["gb_s"]]
    return {"median_gb_s": round(statistics.median(runs), 2), "runs_gb_s": runs}


def roofline_tok_s(bytes_per_token: int, gb_s: float) -> float:
    """The most tokens/s a decoder reading ``bytes_per_token`` can reach at ``gb_s`` GB/s."""
    if bytes_per_token <= 0 or gb_s <= 0:
        raise ValueError("bytes per token and bandwidth must be positive")
    return gb_s * 1e9 / bytes_per_token


def share_of_roofline(tok_s: float, bytes_per_token: int, gb_s: float) -> float:
    """Measured tokens/s as a share of the roofline (1.0 = reading weights at the probe's speed)."""
    return tok_s / roofline_tok_s(bytes_per_token, gb_s)
