"""A demo left running (``edgectl demo --keep``): its state file, who its processes are, stopping them.

The state file ``<workdir>/demo-state.json`` records each process the demo left running with its
*identity*: PID, start time (``/proc/<pid>/stat``'s start tick and this boot's id; ``ps``'s start
time elsewhere) and command line. ``stop`` signals a recorded PID only while that identity still
holds, so a PID the system has since given to another process is never signalled. Each process
leads a session and process group of its own (``Proc`` starts it so): SIGTERM goes to the group,
then SIGKILL to what is left of it after the grace period.

Secrets never go into the state file: the viewer token ``edgectl demo --keep`` prints is made
after the file is written and exists only in the hub's database, hashed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgeglm.errors import ConfigError, EdgeError, NotFoundError

__all__ = [
    "STATE_FILE",
    "KeptProcess",
    "StopOutcome",
    "identity",
    "load_state",
    "record",
    "running",
    "stop",
    "stop_processes",
    "write_state",
]

STATE_FILE = "demo-state.json"
STATE_VERSION = 1
_PROC = Path("/proc")


@dataclass(frozen=True)
class KeptProcess:
    """One process a kept demo left running, as the state file records it."""

    name: str
    pid: int
    started: str  # identity(pid)[0] when it was recorded
    argv: list[str]
    log: str

    def same(self) -> bool:
        """The PID is still this very process (alive, same start time and command line)."""
        now = identity(self.pid)
        return now is not None and now == (self.started, self.argv)


@dataclass(frozen=True)
class StopOutcome:
    name: str
    pid: int
    outcome: str  # "stopped", "killed", "already gone", "left alone: ..."


# ------------------------------------------------------------------------------ identity
def _boot_id() -> str:
    try:
        return (_PROC / "sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "?"


def identity(pid: int) -> tuple[str, list[str]] | None:
    """``(start time, argv)`` of a live process, or None when ``pid`` is not one (gone or a zombie)."""
    if _PROC.joinpath("self/stat").exists():
        try:
            stat = _PROC.joinpath(str(pid), "stat").read_text()
            raw = _PROC.joinpath(str(pid), "cmdline").read_bytes()
        except OSError:  # gone, or not ours to read
            return None
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
        if fields[0] in ("Z", "X"):
            return None
        argv = [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]]
        return f"{_boot_id()}:{fields[19]}", argv  # field 22 of stat: start time in clock ticks
    out = subprocess.run(
        ["ps", "-ww", "-o", "stat=", "-o", "lstart=", "-o", "args=", "-p", str(pid)],
        capture_output=True,
        text=True,
    )
    line = out.stdout.strip()
    if out.returncode != 0 or not line or line.startswith("Z"):
        return None
    parts = line.split(maxsplit=6)  # stat, then lstart's five words ("Mon Jan  1 00:00:00 2024")
    return " ".join(parts[1:6]), parts[6].split(" ") if len(parts) > 6 else []


def _group_alive(pgid: int) -> bool:
    """Some process other than a zombie is still in process group ``pgid``."""
    if not _PROC.joinpath("self/stat").exists():
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = entry.joinpath("stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


# ------------------------------------------------------------------------------ state file
def record(name: str, pid: int, log: Path) -> KeptProcess:
    """The identity of a process we just left running."""
    found = identity(pid)
    if found is None:
        raise EdgeError(name, f"exited before the demo could leave it running (log: {log})")
    return KeptProcess(name, pid, found[0], found[1], str(log))


def write_state(workdir: Path, processes: Iterable[KeptProcess], **info: Any) -> Path:
    """Write the state file atomically (processes in the order they started)."""
    path = workdir / STATE_FILE
    data = {"version": STATE_VERSION, "workdir": str(workdir), **info}
    data["processes"] = [asdict(p) for p in processes]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    return path


def load_state(workdir: Path) -> dict[str, Any] | None:
    """The state file's contents with ``processes`` as :class:`KeptProcess`; None when there is none."""
    path = workdir / STATE_FILE
    try:
        data = json.loads(path.read_text())
        if data.get("version") != STATE_VERSION:
            raise ValueError(f"version {data.get('version')!r}, expected {STATE_VERSION}")
        data["processes"] = [
            KeptProcess(str(p["name"]), int(p["pid"]), str(p["started"]), list(p["argv"]), str(p["log"]))
            for p in data["processes"]
        ]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            str(path),
            f"is not a kept demo's state file ({exc})",
            hint="Stop the processes it names by hand (see ps), then delete the file.",
        ) from exc
    return dict(data)


def running(workdir: Path) -> list[KeptProcess]:
    """The recorded processes of a kept demo in ``workdir`` that still run."""
    state = load_state(workdir)
    return [p for p in state["processes"] if p.same()] if state else []


# ------------------------------------------------------------------------------ stop
def _signal(proc: KeptProcess, sig: signal.Signals) -> None:
    """``sig`` to the process group ``proc`` leads (to the process alone if it leads none)."""
    with contextlib.suppress(ProcessLookupError):
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)


def _wait_gone(proc: KeptProcess, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if not proc.same() and not _group_alive(proc.pid):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def stop(workdir: Path, grace: float = 20.0) -> list[StopOutcome]:
    """Stop every process the kept demo in ``workdir`` recorded, newest first; remove the state file.

    A recorded PID is signalled only while it is still the recorded process. ``NotFoundError`` when
    no kept demo is recorded there; the state file stays when a process could not be stopped.
    """
    state = load_state(workdir)
    if state is None:
        raise NotFoundError(
            "demo",
            f"nothing to stop: no kept demo in {workdir} (no {STATE_FILE})",
            hint="Pass the --workdir the demo was started with ('edgectl demo --keep' prints it).",
        )
    outcomes = stop_processes(state["processes"], grace, workdir)
    (workdir / STATE_FILE).unlink(missing_ok=True)
    return outcomes


def stop_processes(
    processes: list[KeptProcess], grace: float = 20.0, workdir: Path | None = None
) -> list[StopOutcome]:
    """Stop ``processes`` newest first, each only while it is still the recorded process;
    EdgeError (with ``outcomes``) when one could not be stopped."""
    outcomes: list[StopOutcome] = []
    failed: list[str] = []
    for proc in reversed(processes):
        now = identity(proc.pid)
        if now is None:
            outcomes.append(StopOutcome(proc.name, proc.pid, "already gone"))
            continue
        if now != (proc.started, proc.argv):
            outcomes.append(
                StopOutcome(proc.name, proc.pid, "left alone: the PID now belongs to another process")
            )
            continue
        try:
            _signal(proc, signal.SIGTERM)
            if _wait_gone(proc, grace):
                outcomes.append(StopOutcome(proc.name, proc.pid, "stopped"))
                continue
            if proc.same():
                _signal(proc, signal.SIGKILL)
            else:  # the leader is gone, the rest of its group is not: the group id cannot be reused yet
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            gone = _wait_gone(proc, 10.0)
        except PermissionError as exc:
            gone, why = False, f"not allowed to signal it ({exc.strerror})"
        else:
            why = "still running after SIGKILL"
        if gone:
            outcomes.append(StopOutcome(proc.name, proc.pid, f"killed (no exit {grace:g} s after SIGTERM)"))
        else:
            outcomes.append(StopOutcome(proc.name, proc.pid, why))
            failed.append(f"{proc.name} (PID {proc.pid}): {why}")
    if failed:
        raise EdgeError(
            "demo",
            "could not stop " + "; ".join(failed),
            hint="Stop them by hand"
            + (f", then delete {workdir / STATE_FILE}." if workdir is not None else "."),
            outcomes=outcomes,
        )
    return outcomes
