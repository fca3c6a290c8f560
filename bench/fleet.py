"""Fleet benchmark: thousands of simulated devices in one process against real hubs and mosquitto.

    python -m bench.fleet [--devices N] [--quick] [--db sqlite|postgresql] [--replicas 1,3] --json FILE

Setup, once per replica count in ``--replicas`` (each a fresh installation, so the counts are
compared in one invocation on the same machine): a mosquitto of its own (TCP_NODELAY, no
connection limit); a fresh hub database (``sqlite``: a file; ``postgresql``: a database made for
the run on ``--pg`` and dropped after it) with releases 1.0.0 / 1.1.0 / 1.2.0 of a small bundle;
and N ``edgectl hub serve --broker`` processes on it, with one fleet key, one shared-subscription
group and one controller lease between them. SQLite serves one replica only (refused otherwise).
The devices are paho MQTT 5 clients driven by one external loop on an epoll selector (a thread
per client does not scale, and paho's own select() loop stops at ~340 sockets); the fd limit is
raised and connections ramp up 100 at a time. Each device speaks the real wire protocol:
retained status with a last will, heartbeats (QoS 0), desired state in, update reports out.
The simulated devices fetch no bytes (tests/integration/test_hub_replicas.py measures pieces
served per replica).

Measured per replica count (JSON ``runs``, one object each):
    replicas            hub processes
    devices             simulated devices connected
    heartbeats_sent     heartbeats sent in the window, one per device per --heartbeat-s, staggered
    heartbeats_stored   heartbeats the hubs counted in their database for the same window
    heartbeats_by_replica  each replica's share (its edgeglm_hub_heartbeats_total, connect-time
                        heartbeats and the window's)
    rollout_s           deploy 1.1.0 in 3 waves (1,10,100 percent, no soak, no gates) with instant
                        simulated updates, until the rollout is completed
    breach_to_revert_s  deploy 1.2.0 (waves 5,100; gate error_rate<=0.02, 3 samples) whose devices
                        report a 50% error rate: from the third breaching heartbeat sent to the
                        last moved device receiving its revert desired state
    breach_to_first_revert_s  ... to the first moved device receiving it (the controller noticed)
    controller_replica  the replica that held the rollout controller's lease at the end
plus connect_s, heartbeat_window_s, heartbeats_per_s, tick_s and the rollout's wave sizes; the
load average before each run is in ``load_before``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import selectors
import shutil
import socket
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edgectl.demo.procs import HubProc, ManagedBroker
from edgeglm.errors import UsageError
from edgeglm.protocol import (
    Desired,
    Health,
    Heartbeat,
    Report,
    Status,
    decode,
    desired_topic,
    encode,
    heartbeat_topic,
    report_topic,
    status_topic,
)

MODEL = "glm-fleet"
PROFILE = "cpu-x86-int4"
PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
TICK_S = 0.2  # the controller's tick in every hub the bench starts (edgectl hub serve --tick)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _raise_fd_limit() -> int:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


# ------------------------------------------------------------------------------ the simulator
@dataclass
class _Dev:
    name: str
    client: paho.Client
    version: str = "1.0.0"
    seq: int = 0
    connected: bool = False
    desired: list[tuple[str, float]] = field(default_factory=list)


class Fleet:
    """N paho clients on one epoll loop; devices answer desired state at once."""

    def __init__(self, port: int, n: int) -> None:
        self.port = port
        self.sel = selectors.EpollSelector()
        self.devs: list[_Dev] = []
        self.bad_versions: set[str] = set()
        self.bad_beats: list[float] = []  # when each breaching heartbeat was sent
        self.n = n

    # socket bookkeeping -------------------------------------------------------------------
    def _register(self, client: paho.Client, _u: Any, sock: Any) -> None:
        self.sel.register(sock, selectors.EVENT_READ, client)

    def _unregister(self, _c: paho.Client, _u: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(sock)

    def _want_write(self, client: paho.Client, _u: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)

    def _done_write(self, client: paho.Client, _u: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.modify(sock, selectors.EVENT_READ, client)

    # device behaviour ---------------------------------------------------------------------
    def _status(self, d: _Dev, state: str) -> bytes:
        return encode(
            Status(
                device_id=d.name,
                state=state,
                profile=PROFILE,
                model=MODEL,
                version=d.version,
                agent_version="bench",
                ts=time.time(),
            )
        )

    def _on_connect(self, client: paho.Client, d: _Dev, _f: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            return
        d.connected = True
        client.subscribe(desired_topic(d.name), qos=1)
        client.publish(status_topic(d.name), self._status(d, "online"), qos=1, retain=True)
        self.heartbeat(d)

    def _on_message(self, client: paho.Client, d: _Dev, msg: Any) -> None:
        if not msg.payload:
            return
        want = decode(Desired, msg.payload)
        d.desired.append((want.version, time.monotonic()))
        if want.version == d.version:
            return
        d.version = want.version
        d.seq += 1
        rep = Report(
            device_id=d.name,
            rollout_id=want.rollout_id,
            step="committed",
            seq=d.seq,
            ok=True,
            version=want.version,
            ts=time.time(),
        )
        client.publish(report_topic(d.name), encode(rep), qos=1)
        client.publish(status_topic(d.name), self._status(d, "online"), qos=1, retain=True)
        if want.version in self.bad_versions:
            self.heartbeat(d)  # the new version's health, at once: 50% errors
            self.bad_beats.append(time.monotonic())

    def heartbeat(self, d: _Dev) -> None:
        bad = d.version in self.bad_versions
        d.seq += 1
        health = Health(
            latency_p50_ms=40,
            latency_p95_ms=90,
            tokens_per_s=20,
            error_rate=0.5 if bad else 0.0,
            queue_depth=0,
            rss_mb=900,
            requests=100,
            errors=50 if bad else 0,
        )
        hb = Heartbeat(
            device_id=d.name, ts=time.time(), model=MODEL, version=d.version, health=health, seq=d.seq
        )
        d.client.publish(heartbeat_topic(d.name), encode(hb), qos=0)

    # the loop ---------------------------------------------------------------------------
    def pump(self, seconds: float) -> None:
        """Run the network loop for ``seconds`` (reads, writes, keepalives)."""
        end = time.monotonic() + seconds
        while True:
            left = end - time.monotonic()
            if left <= 0:
                break
            for key, mask in self.sel.select(min(left, 0.05)):
                client = key.data
                if mask & selectors.EVENT_READ:
                    client.loop_read()
                if mask & selectors.EVENT_WRITE:
                    client.loop_write()
        now = time.monotonic()
        if now - getattr(self, "_misc", 0.0) > 1.0:
            self._misc = now
            for d in self.devs:
                d.client.loop_misc()

    def connect(self) -> float:
        t = time.perf_counter()
        for start in range(0, self.n, 100):
            for i in range(start, min(start + 100, self.n)):
                d = _Dev(
                    f"dev-{i:05d}",
                    paho.Client(CallbackAPIVersion.VERSION2, client_id=f"dev-{i:05d}", protocol=paho.MQTTv5),
                )
                c = d.client
                c.user_data_set(d)
                c.on_socket_open = self._register
                c.on_socket_close = self._unregister
                c.on_socket_register_write = self._want_write
                c.on_socket_unregister_write = self._done_write
                c.on_connect = self._on_connect
                c.on_message = self._on_message
                c.will_set(status_topic(d.name), self._status(d, "offline"), qos=1, retain=True)
                c.connect("127.0.0.1", self.port, keepalive=600)
                c.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.devs.append(d)
            deadline = time.monotonic() + 30
            while sum(d.connected for d in self.devs) < len(self.devs):
                self.pump(0.05)
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"only {sum(d.connected for d in self.devs)} of {len(self.devs)} connected"
                    )
        return time.perf_counter() - t

    def close(self) -> None:
        """Disconnect every device and close its socket (the next run needs the descriptors)."""
        for d in self.devs:
            with contextlib.suppress(Exception):
                d.client.disconnect()
        self.pump(1.0)
        for d in self.devs:
            sock = d.client.socket()
            if sock is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self.sel.unregister(sock)
                sock.close()
        self.sel.close()
        self.devs.clear()

    def heartbeat_window(self, window_s: float, every_s: float) -> int:
        """One heartbeat per device per ``every_s``, evenly staggered, for ``window_s``; returns sent."""
        n = len(self.devs)
        offsets = np.arange(n) * (every_s / n)
        start = time.monotonic()
        sent = 0
        rounds = int(window_s // every_s)
        for r in range(rounds):
            i = 0
            while i < n:
                due = start + r * every_s + offsets[i]
                now = time.monotonic()
                if now < due:
                    self.pump(min(due - now, 0.02))
                    continue
                while i < n and start + r * every_s + offsets[i] <= time.monotonic():
                    self.heartbeat(self.devs[i])
                    sent += 1
                    i += 1
                self.pump(0.0)
        self.pump(max(0.0, start + window_s - time.monotonic()))
        return sent


# ------------------------------------------------------------------------------- the database
@contextlib.contextmanager
def fresh_database(kind: str, work: Path, pg_admin: str) -> Iterator[str]:
    """A new, empty hub database URL for one run: a SQLite file in ``work``, or a PostgreSQL
    database made on ``pg_admin``'s server and dropped (with its connections) afterwards."""
    if kind == "sqlite":
        yield f"sqlite:///{work / 'hub.db'}"
        return
    import sqlalchemy as sa

    name = f"bench_fleet_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(pg_admin, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        try:
            yield admin.url.set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


# ------------------------------------------------------------------------------------ the hubs
class Hubs:
    """``replicas`` hub processes on one database and one broker, with one fleet key; the
    bench's API calls go to the first (any would do: they share everything but their data folder)."""

    def __init__(self, work: Path, db_url: str, port: int, replicas: int) -> None:
        self.work = work
        self.db = db_url
        self.broker = port
        self.replicas = replicas
        self.url = ""
        self.procs: list[HubProc] = []

    def setup(self) -> None:
        from cloud_hub import registry
        from cloud_hub.auth import Role, create_token
        from cloud_hub.db import migrate
        from cloud_hub.server import build_context
        from cloud_hub.settings import HubSettings
        from edgeglm.bundle_files import seal_folder
        from edgeglm.keys import create_keypair, load_private_key

        migrate(self.db)
        priv, self.pub, _ = create_keypair(self.work / "keys", "release")
        key = load_private_key(priv)
        ctx = build_context(
            HubSettings(data_dir=self.work / "hub-0", db_url=self.db, trusted_keys=(self.pub,))
        )
        with ctx.db.session() as s:
            _, self.token = create_token(s, "bench", Role.operator, "bench")
        for i, version in enumerate(("1.0.0", "1.1.0", "1.2.0")):
            folder = self.work / "bundles" / version
            folder.mkdir(parents=True)
            rng = np.random.default_rng(i)
            (folder / "weights.bin").write_bytes(rng.integers(0, 256, 64 * 1024, dtype=np.uint8).tobytes())
            seal_folder(folder, key, model=MODEL, version=version, profile=PROFILE, quality={"passed": True})
            with ctx.db.session() as s:
                registry.Registry(s, ctx.store, ctx.trusted).publish_folder(folder, "bench")
        ctx.db.dispose()

    def start(self) -> None:
        """The first replica makes the fleet key; the others get a copy of it (the same file on
        every replica, as in production), and each its own data folder."""
        for i in range(self.replicas):
            root = self.work / f"hub-{i}"
            if i:
                root.mkdir(parents=True, exist_ok=True)
                for name in ("fleet.key", "fleet.pub"):
                    shutil.copy2(self.procs[0].root / name, root / name)
            proc = HubProc(root, self.db, self.broker, self.pub, tick_s=TICK_S, offline_after_s=3600)
            self.procs.append(proc.start())
        self.url = self.procs[0].url

    def api(self, method: str, path: str, body: Any = None) -> Any:
        req = urllib.request.Request(
            self.url + path,
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=120) as resp:
            return json.load(resp)

    def _scalar(self, sql: str) -> Any:
        import sqlalchemy as sa

        engine = sa.create_engine(self.db)
        try:
            with engine.connect() as conn:
                return conn.execute(sa.text(sql)).scalar()
        finally:
            engine.dispose()

    def heartbeats_stored(self) -> int:
        return int(self._scalar("SELECT COALESCE(SUM(heartbeats), 0) FROM devices"))

    def heartbeats_by_replica(self) -> list[int]:
        return [int(p.metric("edgeglm_hub_heartbeats_total")) for p in self.procs]

    def controller_replica(self) -> int | None:
        """Which replica holds the controller's lease (its holder names the process id)."""
        holder = str(self._scalar("SELECT holder FROM leases WHERE name = 'rollout-controller'") or "")
        pids = holder.split(":")[1:2]
        return next((i for i, p in enumerate(self.procs) if pids and str(p.proc.pid) == pids[0]), None)

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.proc.stop(grace=30)

    def keep_logs(self, to: Path) -> None:
        to.mkdir(parents=True, exist_ok=True)
        for i, p in enumerate(self.procs):
            shutil.copy2(p.proc.log_path, to / f"hub-{i}.log")


def _wait_rollout(hubs: Hubs, fleet: Fleet, rid: int, states: set[str], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        fleet.pump(0.25)
        view = hubs.api("GET", f"/api/v1/rollouts/{rid}?devices=false")
        if view["state"] in states:
            return view
        if time.monotonic() > deadline:
            raise RuntimeError(f"rollout {rid} still {view['state']} after {timeout:.0f}s: {view['devices']}")


def _told_back(d: _Dev) -> float:
    """When ``d`` was first told to go back to 1.1.0 after it was moved to 1.2.0 (NaN: never)."""
    moved = next(t for v, t in d.desired if v == "1.2.0")
    return next((t for v, t in d.desired if v == "1.1.0" and t > moved), float("nan"))


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_once(
    n: int,
    heartbeat_s: float,
    window_s: float,
    *,
    db: str,
    replicas: int,
    pg_admin: str,
    logs: Path | None = None,
) -> dict[str, Any]:
    """One installation with ``replicas`` hubs, measured as the module docstring says."""
    load_before = _load()
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        work = Path(tmp)
        limits = ["max_connections -1", "max_queued_messages 0", "max_inflight_messages 0"]
        broker = ManagedBroker(work / "broker", settings=limits).start()
        fleet: Fleet | None = None
        try:
            with fresh_database(db, work, pg_admin) as url:
                hubs = Hubs(work, url, broker.port, replicas)
                try:
                    time.sleep(0.3)
                    hubs.setup()
                    hubs.start()
                    fleet = Fleet(broker.port, n)
                    result = _measure(hubs, fleet, n, heartbeat_s, window_s)
                finally:
                    if fleet is not None:
                        fleet.close()
                    hubs.stop()
                    if logs is not None:
                        hubs.keep_logs(logs / f"replicas-{replicas}")
        finally:
            broker.stop()
    return {"replicas": replicas, "db": db, "load_before": load_before, "tick_s": TICK_S, **result}


def _measure(hubs: Hubs, fleet: Fleet, n: int, heartbeat_s: float, window_s: float) -> dict[str, Any]:
    tag = f"[{hubs.replicas} replica{'s' if hubs.replicas > 1 else ''}]"
    connect_s = fleet.connect()
    print(f"{tag} {n} devices connected in {connect_s:.1f}s", file=sys.stderr)
    deadline = time.monotonic() + 120
    while len(hubs.api("GET", "/api/v1/devices?online=true")) < n:
        fleet.pump(0.5)
        if time.monotonic() > deadline:
            raise RuntimeError("the hubs did not register every device")
    deadline = time.monotonic() + 60  # each device sent one heartbeat as it connected
    while hubs.heartbeats_stored() < n and time.monotonic() < deadline:
        fleet.pump(0.5)
    before = hubs.heartbeats_stored()
    t = time.monotonic()
    sent = fleet.heartbeat_window(window_s, heartbeat_s)
    elapsed = time.monotonic() - t
    deadline = time.monotonic() + 30
    while hubs.heartbeats_stored() - before < sent and time.monotonic() < deadline:
        fleet.pump(0.5)
    fleet.pump(1.0)  # nothing more may come: a count above what was sent would show here
    stored = hubs.heartbeats_stored() - before
    by_replica = hubs.heartbeats_by_replica()
    print(f"{tag} heartbeats: sent {sent}, stored {stored} in {elapsed:.1f}s", file=sys.stderr)

    t = time.monotonic()
    r = hubs.api(
        "POST",
        "/api/v1/rollouts",
        {"release": f"{MODEL}@1.1.0", "waves": ["1", "10", "100"], "soak_s": 0, "device_timeout_s": 600},
    )
    done = _wait_rollout(hubs, fleet, r["id"], {"completed", "reverted", "paused", "aborted"}, 600)
    rollout_s = time.monotonic() - t
    print(f"{tag} rollout of 1.1.0 over {n}: {done['state']} in {rollout_s:.1f}s", file=sys.stderr)

    fleet.bad_versions.add("1.2.0")
    fleet.bad_beats.clear()
    r = hubs.api(
        "POST",
        "/api/v1/rollouts",
        {
            "release": f"{MODEL}@1.2.0",
            "waves": ["5", "100"],
            "soak_s": 60,
            "gates": ["error_rate<=0.02"],
            "min_samples": 3,
            "device_timeout_s": 600,
        },
    )
    reverted = _wait_rollout(hubs, fleet, r["id"], {"reverted", "completed", "paused", "aborted"}, 300)
    moved = [d for d in fleet.devs if any(v == "1.2.0" for v, _ in d.desired)]
    deadline = time.monotonic() + 60
    while not all(d.version == "1.1.0" for d in moved) and time.monotonic() < deadline:
        fleet.pump(0.1)
    breach = sorted(fleet.bad_beats)[2] if len(fleet.bad_beats) >= 3 else float("nan")
    reverts = [_told_back(d) for d in moved]
    if not moved or any(np.isnan(reverts)):
        missed = [d for d, t in zip(moved, reverts, strict=True) if np.isnan(t)]
        for d in missed[:5]:
            seen = [(v, round(t - breach, 3)) for v, t in d.desired]
            print(
                f"{d.name}: connected {d.client.is_connected()}, runs {d.version}, told {seen}",
                file=sys.stderr,
            )
        raise RuntimeError(f"{len(missed)} of {len(moved)} moved device(s) were never told to go back")
    breach_to_revert = max(reverts) - breach
    print(
        f"{tag} breach -> revert of {len(moved)} devices: {breach_to_revert:.2f}s ({reverted['state']})",
        file=sys.stderr,
    )
    return {
        "devices": n,
        "connect_s": connect_s,
        "heartbeat_interval_s": heartbeat_s,
        "heartbeat_window_s": elapsed,
        "heartbeats_sent": sent,
        "heartbeats_stored": stored,
        "heartbeats_per_s": stored / elapsed if elapsed else 0.0,
        "heartbeats_by_replica": by_replica,
        "rollout_state": done["state"],
        "rollout_waves": [w["size"] for w in done["waves"]],
        "rollout_s": rollout_s,
        "revert_state": reverted["state"],
        "reverted_devices": len(moved),
        "breach_to_revert_s": breach_to_revert,
        "breach_to_first_revert_s": min(reverts) - breach,
        "controller_replica": hubs.controller_replica(),
    }


def parse_replicas(text: str) -> list[int]:
    """``"1,3"`` -> [1, 3]: each a positive count of hub processes."""
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        counts = []
    if not counts or any(c < 1 for c in counts):
        raise UsageError("--replicas", f"{text!r}: write counts of hub processes, e.g. 1,3")
    return counts


def run(
    n: int,
    heartbeat_s: float,
    window_s: float,
    *,
    db: str,
    replicas: list[int],
    pg_admin: str,
    logs: Path | None = None,
) -> dict[str, Any]:
    if db == "sqlite" and any(r > 1 for r in replicas):
        raise UsageError(
            "--replicas", "several hub processes need a shared server database", hint="Add --db postgresql."
        )
    fd_limit = _raise_fd_limit()
    if fd_limit < n + 200:
        raise RuntimeError(f"the fd limit is {fd_limit}; {n} devices need more")
    runs = []
    for count in replicas:
        runs.append(run_once(n, heartbeat_s, window_s, db=db, replicas=count, pg_admin=pg_admin, logs=logs))
    return {"devices": n, "db": db, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--quick", action="store_true", help="500 devices, a 10 s heartbeat window")
    ap.add_argument("--heartbeat-s", type=float, default=5.0)
    ap.add_argument("--window-s", type=float, default=30.0)
    ap.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite")
    ap.add_argument(
        "--replicas", default="1", help="hub process counts, one fresh run each, e.g. 1,3 (postgresql)"
    )
    ap.add_argument(
        "--pg", default=PG_ADMIN, help="a PostgreSQL server URL the bench may create databases on"
    )
    ap.add_argument("--logs", type=Path, help="keep each hub's log here (replicas-N/hub-I.log)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if shutil.which("mosquitto") is None:
        print("bench.fleet needs mosquitto: apt-get install mosquitto", file=sys.stderr)
        return 69
    try:
        replicas = parse_replicas(args.replicas)
        n, window = (500, 10.0) if args.quick else (args.devices, args.window_s)
        result = run(
            n, args.heartbeat_s, window, db=args.db, replicas=replicas, pg_admin=args.pg, logs=args.logs
        )
    except UsageError as exc:
        print(f"bench.fleet: {exc}\n  hint: {exc.hint}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2, sort_keys=True)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
