"""The processes a local EdgeGLM installation runs: a managed mosquitto, the hub, edge agents.

Each one is a real child process with its log in a file, started on a free loopback port and
stopped by PID (SIGTERM, then SIGKILL after a grace period). ``Procs`` owns every process it
started and stops them all, in reverse order, however the caller leaves (an exception, Ctrl-C).
This is the one process harness: ``edgectl demo``, the tests and the benchmarks start their
processes through it (``agent_box.AgentBox`` for ``edge-agent run``, ``wire.Wire`` to play the
hub's side of the wire, ``partition.TcpProxy`` to cut a link), so all of them run the same setup.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from edgeglm.errors import UnavailableError
from edgeglm.keys import create_keypair

MOSQUITTO_HINT = "Install it: sudo apt-get install mosquitto (Debian/Ubuntu) or brew install mosquitto."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(cond: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    """``cond()`` once it is truthy; ``TimeoutError`` naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        socket.create_connection((host, port), timeout=0.5).close()
        return True
    except OSError:
        return False


def healthy(port: int, host: str = "127.0.0.1", path: str = "/healthz") -> bool:
    """``GET path`` on ``host:port`` answers 200 (an agent's HTTP front, a hub)."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as resp:
            return bool(resp.status == 200)
    except OSError:  # refused, reset, timed out, or an HTTP error status (HTTPError is one)
        return False


def tool(name: str) -> str:
    """A console script of this installation (beside the running interpreter), else from PATH."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise UnavailableError(
            name, "is not installed", hint="Install EdgeGLM with 'make .venv/.dev-installed'."
        )
    return found


class Proc:
    """One child process; stdout and stderr go to ``log_path`` (appended across restarts)."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: Mapping[str, str] | None = None):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env = dict(env or {})
        self.popen: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, env: Mapping[str, str] | None = None) -> Proc:
        self.starts += 1
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        full = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
        full.update(self.env)
        full.update(env or {})
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== start {self.starts} ===\n".encode())
            log.flush()
            self.popen = subprocess.Popen(
                self.argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=full, start_new_session=True
            )
        return self

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start_until(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        """Start, then wait until ``ready()``; a process that exits first is UnavailableError with
        the end of its log, one that is not ready in time is stopped (TimeoutError)."""
        self.start()
        try:
            wait_for(lambda: ready() or not self.alive(), timeout, what)
        except TimeoutError:
            self.stop()
            raise
        if not self.alive():
            raise UnavailableError(self.name, f"exited at start: {self.log()[-600:].strip()}")

    def kill9(self) -> None:
        if self.alive():
            assert self.popen is not None
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(10)

    def stop(self, grace: float = 20.0) -> int | None:
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        return self.popen.returncode


def find_mosquitto() -> str | None:
    found = shutil.which("mosquitto")
    return found or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None
    )


def require_mosquitto() -> str:
    """The mosquitto binary, or UnavailableError (exit 69) with the command that installs it."""
    binary = find_mosquitto()
    if binary is None:
        raise UnavailableError(
            "mosquitto", "is not installed (the demo runs its own broker)", hint=MOSQUITTO_HINT
        )
    return binary


class ManagedBroker:
    """A mosquitto of our own on a loopback port, with a generated config (TCP_NODELAY on) and its
    log in ``root``; ``stop()`` and ``start()`` again reuse the port (a broker outage).

    ``listeners`` replaces the default listener on ``port`` (TLS, per-listener auth), which lets
    anonymous clients in unless ``anonymous`` is false;
    ``settings`` are further config lines (password and ACL files, connection limits).
    """

    def __init__(
        self,
        root: Path,
        port: int | None = None,
        *,
        listeners: str | None = None,
        settings: Sequence[str] = (),
        anonymous: bool = True,
        max_packet_bytes: int | None = None,
    ) -> None:
        binary = require_mosquitto()
        self.port = port or free_port()
        self.conf = root / f"mosquitto-{self.port}.conf"
        root.mkdir(parents=True, exist_ok=True)
        default = [f"listener {self.port} 127.0.0.1", f"allow_anonymous {'true' if anonymous else 'false'}"]
        lines = [listeners.rstrip("\n")] if listeners else default
        lines += [*settings, "set_tcp_nodelay true", "persistence false"]
        if max_packet_bytes is not None:
            lines.append(f"max_packet_size {max_packet_bytes}")
        if os.geteuid() == 0:
            # mosquitto drops to 'mosquitto' otherwise, which may not exist or read our 0600 files
            lines.append("user root")
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc = Proc("mosquitto", [binary, "-c", str(self.conf)], root / f"mosquitto-{self.port}.log")

    def start(self, timeout: float = 10.0) -> ManagedBroker:
        self.proc.start_until(lambda: port_open(self.port), timeout, f"mosquitto on {self.port}")
        return self

    def stop(self) -> None:
        self.proc.stop()


def create_token(db_url: str, name: str, role: str) -> str:
    """A new API token through ``edgectl hub token create`` (audited; only its hash is stored),
    for the hub on ``db_url``; the secret is returned, never logged."""
    out = subprocess.run(
        [tool("edgectl"), "hub", "token", "create", name, "--role", role, "--db", db_url, "-o", "json"],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise UnavailableError(f"token {name}", f"could not be created: {out.stderr.strip()[-400:]}")
    return str(json.loads(out.stdout)["token"])


class HubProc:
    """``edgectl hub serve`` on a database (SQLite file or PostgreSQL URL) and a broker."""

    def __init__(
        self,
        root: Path,
        db_url: str,
        broker_port: int,
        trusted: Path,
        *,
        tick_s: float = 0.2,
        offline_after_s: float = 10.0,
    ):
        self.root = root
        self.db_url = db_url
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        edgectl = tool("edgectl")
        self.edgectl = edgectl
        self.fleet_key = root / "fleet.key"  # signs desired states; boxes trust fleet_public
        self.fleet_public = self.fleet_key.with_suffix(".pub")
        if not self.fleet_key.exists():
            create_keypair(root, "fleet")
        argv = [
            edgectl, "-v", "hub", "serve", "--migrate",
            "--db", db_url, "--data", str(root), "--trust", str(trusted), "--fleet-key", str(self.fleet_key),
            "--listen", f"127.0.0.1:{self.port}", "--broker", f"127.0.0.1:{broker_port}",
            "--tick", str(tick_s), "--offline-after", str(offline_after_s),
        ]  # fmt: skip
        self.proc = Proc("cloud-hub", argv, root / "hub.log")

    def migrate(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [self.edgectl, "hub", "migrate", "--db", self.db_url, "--data", str(self.root), "-o", "json"],
            check=True,
            capture_output=True,
        )

    def create_token(self, name: str, role: str) -> str:
        """A new API token (printed once by the hub; only its hash is stored)."""
        return create_token(self.db_url, name, role)

    def up(self) -> bool:
        try:
            urllib.request.urlopen(self.url + "/healthz", timeout=2).close()
            return True
        except OSError:
            return False

    def start(self, timeout: float = 60.0) -> HubProc:
        self.proc.start_until(self.up, timeout, f"the hub on {self.url}")
        return self

    def metric(self, name: str) -> float:
        """One counter from the hub's /metrics (summed over its label sets)."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as resp:
            text = resp.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and line[len(name) : len(name) + 1] in (" ", "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total


def toml_text(top: Mapping[str, Any], sections: Mapping[str, Mapping[str, Any]]) -> str:
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v))

    lines = [f"{k} = {value(v)}" for k, v in top.items()]
    for name, table in sections.items():
        lines.append(f"\n[{name}]")
        lines += [f"{k} = {value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


class Procs:
    """Every process started through it, stopped in reverse order on exit."""

    def __init__(self) -> None:
        self.started: list[Any] = []

    def add(self, thing: Any) -> Any:
        self.started.append(thing)
        return thing

    def stop_all(self) -> list[tuple[str, int | None]]:
        codes = []
        for thing in reversed(self.started):
            proc = thing.proc if hasattr(thing, "proc") else thing
            with contextlib.suppress(Exception):
                codes.append((proc.name, proc.stop()))
        self.started.clear()
        return codes

    @contextlib.contextmanager
    def running(self) -> Iterator[Procs]:
        try:
            yield self
        finally:
            self.stop_all()
