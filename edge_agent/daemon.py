"""``edge-agent run``: the daemon on each box: serve the active slot, follow the hub's desired state.

    cloud broker ── desired (retained) ──> update worker ──> UpdateMachine ──> Activator ──> Front
         ^  <── FetchRequests / data ───── MqttFetcher            │ reports          (serves the
         │                                                        v                 active slot)
         └──── status (retained, LWT) · heartbeats · reports <── Outbox (SQLite) <── heartbeat timer
    local broker (optional; default: the cloud one) ── infer requests ──> Front

Start-up order: the state and the slots first; the active slot is verified (signature and every
file digest) and loaded *before* any link comes up, so a box answers from the model it trusts;
a slot that fails to load at boot is abandoned for the other one. The links then connect in the
background (serving never waits for the cloud), the unfinished update, if any, resumes, and the
worker follows the retained desired state. systemd hears ``READY=1`` when serving, and the
watchdog is petted only while the engine answers.

An update that ended ``failed`` is not tried again for the same (rollout, manifest digest) after a
restart: the retained desired state would otherwise loop a box through the same failure; the hub
answers failures by reverting the desired state. A different desired state arriving during a
download supersedes it at once (reported ``failed``, reason "superseded"); the new one runs next.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy.exc

from edge_agent.activation import Activator
from edge_agent.config import AgentConfig, resolve_profile
from edge_agent.fetch import MqttFetcher
from edge_agent.front import Front
from edge_agent.metrics import Metrics
from edge_agent.notify import Watchdog, notify
from edge_agent.outbox import Outbox, OutboxItem
from edge_agent.update.machine import UpdateMachine
from edge_agent.update.slots import Slots
from edge_agent.update.state import StateStore
from edgeglm import __version__
from edgeglm.assembler import assemble_bundle
from edgeglm.bundle import load_manifest, verify_files
from edgeglm.bundle_files import ingest_folder
from edgeglm.errors import ConfigError, EdgeError, ProtocolError
from edgeglm.keys import load_public_keys
from edgeglm.mqtt import Incoming, MqttLink
from edgeglm.protocol import (
    UPDATE_SUCCEEDED,
    Desired,
    Heartbeat,
    Progress,
    Report,
    Status,
    decode,
    desired_topic,
    encode,
    heartbeat_topic,
    report_topic,
    status_topic,
)

__all__ = ["Agent"]

log = logging.getLogger(__name__)

FAULT_ENV = "EDGEGLM_FAULT_KILL_AT"  # fault injection for the crash tests: SIGKILL at this step


@dataclass(frozen=True)
class _Want:
    model: str
    version: str
    profile: str
    digest: str
    rollout_id: int | None


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.device_id = config.device_id
        self.trusted = dict(load_public_keys(list(config.trusted_keys)))
        data = Path(config.data_dir)
        data.mkdir(parents=True, exist_ok=True)
        self.state = StateStore(data / "agent.db")
        self.outbox = Outbox(data / "outbox.db", max_rows=config.telemetry.outbox_max_rows)
        from edgeglm.piece_store import PieceStore

        self.store = PieceStore(data / "pieces")
        self.slots = Slots(data)
        self.profile_name, self.profile_override = resolve_profile(config)
        self.metrics = Metrics()
        self._stop = threading.Event()
        self._term = threading.Event()  # SIGTERM / SIGINT
        self._wake = threading.Event()
        self._want: _Want | None = None
        self.http: Any = None  # the optional HTTP API (serving.http_listen)
        self._issued_at = 0.0  # the newest desired state seen: an older one arriving later is stale
        self._lock = threading.Lock()
        self.cloud: MqttLink | None = None
        self.local: MqttLink | None = None
        self.front: Front | None = None
        self.machine: UpdateMachine | None = None
        self.activator: Activator | None = None
        self.watchdog: Watchdog | None = None
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------------- lifecycle
    def start(self) -> Agent:
        c = self.config
        cloud_settings = c.cloud.settings()
        self.cloud = MqttLink(
            cloud_settings,
            client_id=f"edge-agent-{self.device_id}",
            will=(status_topic(self.device_id), encode(self._status("offline")), 1, True),
        )
        self.cloud.on_connected(self._announce)
        serving_link = self.cloud
        if c.local is not None:
            self.local = MqttLink(c.local.settings(), client_id=f"edge-agent-{self.device_id}-local")
            serving_link = self.local
        self.front = Front(
            serving_link,
            self.metrics,
            device_id=self.device_id,
            site=c.serving.site,
            queue_size=c.serving.queue_size,
        )
        if (address := c.serving.http_address()) is not None:
            from edge_agent.http_api import HttpApi

            try:
                api = HttpApi(
                    None, None, self.metrics, host=address[0], port=address[1], current=self.front.current
                )
            except OSError as exc:  # the port is taken, or the address is not this box's
                raise ConfigError(
                    "serving.http_listen", f"cannot listen on {c.serving.http_listen}: {exc}"
                ) from exc
            self.http = api  # bound now, before any link is up; started once serving
        self.activator = Activator(
            self.trusted,
            self.profile_override,
            active=lambda: self.slots.active,
            serve=self._serve,
            serving=self.front.current,
            threads=c.serving.threads,
            keep_previous=c.update.keep_previous_loaded,
            quiesce=self.front.quiesce,
        )
        self._bootstrap()
        self._boot()
        self.front.start()
        fetcher = MqttFetcher(
            self.cloud,
            self.device_id,
            window=c.update.window,
            batch=c.update.batch,
            timeout_s=c.update.request_timeout_s,
            bandwidth_bytes_s=c.update.bandwidth_bytes_s,
        )
        self.machine = UpdateMachine(
            self.state,
            self.store,
            self.slots,
            fetcher,
            self.trusted,
            self.activator,
            self._report,
            crash_at=_fault_injection(os.environ.get(FAULT_ENV)),
            superseded=self._superseded,
        )
        self.cloud.subscribe(desired_topic(self.device_id), 1, self._on_desired)
        self.cloud.start()
        if self.local is not None:
            self.local.start()
        self.outbox.start(self._deliver, lambda: self.cloud is not None and self.cloud.connected)
        self._spawn("update-worker", self._work)
        self._spawn("heartbeats", self._beat)
        if self.http is not None:
            self.http.start()
        self.watchdog = Watchdog(self.front.healthy)
        self.watchdog.start()
        notify("READY=1")
        log.info("edge agent %s up (profile %s, slot %s)", self.device_id, self.profile_name, self._slot())
        return self

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._wake.set()
        notify("STOPPING=1")
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.cloud is not None:
            self.cloud.deliver(
                status_topic(self.device_id), encode(self._status("offline")), qos=1, retain=True, timeout=2
            )
            self.outbox.flush(2.0)
        self.outbox.close()
        for link in (self.local, self.cloud):
            if link is not None:
                link.close()
        if self.http is not None:
            self.http.stop()
        if self.front is not None:
            self.front.stop()
        self.state.close()

    def run_forever(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self._term.set())
        self.start()
        try:
            while not self._term.wait(1.0):
                pass
        finally:
            self.stop()

    def _spawn(self, name: str, target: Any) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    # ------------------------------------------------------------------------- the slots
    def _bootstrap(self) -> None:
        """First start: install ``bootstrap_bundle`` when neither slot holds a model."""
        src = self.config.bootstrap_bundle
        if src is None or any(self.slots.manifest(n) is not None for n in ("a", "b")):
            return
        try:
            manifest, doc = load_manifest(src, self.trusted)
            verify_files(manifest, src)
        except EdgeError as exc:  # provisioning is config: exit 78, systemd does not loop on it
            raise ConfigError(f"config bootstrap_bundle {src}", exc.why) from exc
        ingest_folder(src, manifest, self.store)
        slot = self.slots.inactive_name()
        assemble_bundle(manifest, doc, self.store, self.slots.clear(slot))
        verify_files(manifest, self.slots.path(slot))
        self.slots.switch(slot)
        self.store.keep(f"{manifest.model}@{manifest.version}+{manifest.profile}", doc)
        log.info("installed %s@%s from %s into slot %s", manifest.model, manifest.version, src, slot)

    def _boot(self) -> None:
        """Load the active slot; if it does not load, fall back to the other one."""
        assert self.activator is not None
        for attempt in range(2):
            name = self.slots.active_name()
            if self.slots.manifest(name) is None:
                if attempt == 0 and self.slots.manifest(self.slots.inactive_name()) is not None:
                    log.error("active slot %s holds no model: switching to the other slot", name)
                    self.slots.switch(self.slots.inactive_name())
                    continue
                log.warning("no model installed yet: requests get 'unavailable' until one arrives")
                return
            try:
                self._serve(self.activator.boot(self.slots.active))
                return
            except EdgeError as exc:
                log.error("slot %s does not load: %s", name, exc)
                other = self.slots.inactive_name()
                if attempt == 1 or self.slots.manifest(other) is None:
                    log.error("no slot loads: serving nothing until an update arrives")
                    return
                self.slots.switch(other)

    def _serve(self, engine: Any) -> Any:
        assert self.front is not None
        previous = self.front.serve(engine)
        if self.cloud is not None and self.cloud.connected:
            self._announce()
        return previous

    def _slot(self) -> str | None:
        return self.slots.active_name() if self.slots.manifest(self.slots.active_name()) else None

    # ------------------------------------------------------------------------- wire
    def _status(self, state: str) -> Status:
        live = self.front.current() if self.front is not None else None
        return Status(
            device_id=self.device_id,
            state=state,  # type: ignore[arg-type]
            profile=self.profile_name,
            model=live[0].model if live else None,
            version=live[0].version if live else None,
            slot=self._slot() if live else None,  # type: ignore[arg-type]
            agent_version=__version__,
            ts=time.time(),
        )

    def _announce(self) -> None:
        """Retained online status: on every (re)connect and after every switch."""
        if self.cloud is not None:
            online = encode(self._status("online"))
            self.cloud.publish(status_topic(self.device_id), online, qos=1, retain=True)

    def _deliver(self, item: OutboxItem) -> bool:
        assert self.cloud is not None
        return self.cloud.deliver(item.topic, item.payload, qos=item.qos, retain=item.retain)

    def _report(self, step: str, ok: bool, reason: str | None, progress: dict[str, int] | None) -> None:
        rec = self.machine.current if self.machine is not None else None
        if rec is None:
            return
        self._put_report(rec.rollout_id, rec.version, step, ok, reason, progress)

    def _put_report(
        self,
        rollout_id: int | None,
        version: str,
        step: str,
        ok: bool,
        reason: str | None,
        progress: dict[str, int] | None = None,
    ) -> None:
        def body(seq: int) -> bytes:
            return encode(
                Report(
                    device_id=self.device_id,
                    rollout_id=rollout_id,
                    step=step,
                    seq=seq,
                    ok=ok,
                    reason=reason[:500] if reason else None,
                    progress=Progress(**progress) if progress else None,
                    version=version,
                    ts=time.time(),
                )
            )

        self.outbox.put("report", report_topic(self.device_id), body, qos=1, seq="report")
        log.info("report %s ok=%s%s", step, ok, f" ({reason[:200]})" if reason else "")

    def _beat(self) -> None:
        every = self.config.telemetry.heartbeat_s
        warned = 0.0
        while not self._stop.wait(every):
            try:
                self._put_heartbeat()
            except (OSError, sqlalchemy.exc.OperationalError) as exc:  # a full disk, most likely
                if time.monotonic() - warned > 60:  # one line a minute, not a traceback a beat
                    warned = time.monotonic()
                    log.warning("heartbeat not queued (it is dropped): %s", str(exc).splitlines()[0][:200])
            except Exception:
                log.exception("heartbeat failed")

    def _put_heartbeat(self) -> None:
        live = self.front.current() if self.front is not None else None
        health = self.metrics.health()
        last = self.activator.last if self.activator is not None else None
        if last is not None:
            health = health.model_copy(update={"smoke_agreement": last.agreement})

        def body(seq: int) -> bytes:  # seq: unique across restarts, like report seqs
            return encode(
                Heartbeat(
                    device_id=self.device_id,
                    ts=time.time(),
                    model=live[0].model if live else None,
                    version=live[0].version if live else None,
                    health=health,
                    seq=seq,
                )
            )

        self.outbox.put("heartbeat", heartbeat_topic(self.device_id), body, qos=0, seq="heartbeat")

    # ------------------------------------------------------------------------- updates
    def _on_desired(self, msg: Incoming) -> None:
        if not msg.payload:
            return  # the hub cleared it: keep running what we run
        try:
            d = decode(Desired, msg.payload)
        except ProtocolError as exc:
            log.warning("ignored a bad desired state: %s", exc)
            return
        with self._lock:
            if d.issued_at < self._issued_at:  # reordered or replayed: the hub has said more since
                log.warning(
                    "ignored a stale desired state %s@%s (rollout %s): issued %.3f, before the newest %.3f",
                    d.model, d.version, d.rollout_id, d.issued_at, self._issued_at,
                )  # fmt: skip
                return
            self._issued_at = d.issued_at
            self._want = _Want(d.model, d.version, d.profile, d.manifest_digest, d.rollout_id)
        self._wake.set()

    def _superseded(self, rec: Any) -> bool:
        with self._lock:
            want = self._want
        return want is not None and (want.model, want.version, want.digest) != (
            rec.model,
            rec.version,
            rec.manifest_digest,
        )

    def _work(self) -> None:
        assert self.machine is not None
        try:
            self.machine.resume()
        except Exception:
            log.exception("resuming the unfinished update failed")
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            with self._lock:
                want, self._want = self._want, None
            if want is None or self._stop.is_set():
                continue
            try:
                self._follow(want)
            except Exception:
                log.exception("update to %s@%s failed unexpectedly", want.model, want.version)

    def _follow(self, want: _Want) -> None:
        assert self.machine is not None
        if want.profile != self.profile_name:
            self._put_report(
                want.rollout_id, want.version, "failed", False, f"this box runs profile {self.profile_name}"
            )
            return
        live = self.front.current() if self.front is not None else None
        if live is not None and (live[0].model, live[0].version) == (want.model, want.version):
            last = self.state.latest()
            if want.rollout_id and not (last and last.rollout_id == want.rollout_id):
                self._put_report(want.rollout_id, want.version, UPDATE_SUCCEEDED, True, None)
            return
        last = self.state.latest()
        if (
            last is not None
            and last.step == "failed"
            and (last.rollout_id, last.manifest_digest) == (want.rollout_id, want.digest)
        ):
            log.info("not retrying %s@%s (rollout %s): it failed", want.model, want.version, want.rollout_id)
            return
        final = self.machine.start(
            model=want.model,
            version=want.version,
            profile=want.profile,
            digest=want.digest,
            rollout_id=want.rollout_id,
        )
        if self.activator is not None:
            self.activator.discard()
        if final == UPDATE_SUCCEEDED:
            self._collect_garbage()
        elif final == "failed" and _disk_full(self.state.latest()):
            log.warning("the data folder is full: dropping the pieces of the failed update")
            self._collect_garbage()  # a later rollout fetches them again; the box needs the space now

    def _collect_garbage(self) -> None:
        """Keep the pieces of what the two slots hold; drop the rest."""
        held = {
            f"{m.model}@{m.version}+{m.profile}"
            for m in (self.slots.manifest(n) for n in ("a", "b"))
            if m is not None
        }
        for ref in list(self.store.refs()):
            if ref not in held:
                self.store.release(ref)
        stats = self.store.gc()
        log.info("piece store: %s", stats)


def _disk_full(rec: Any) -> bool:
    reason = str(getattr(rec, "reason", "") or "")
    return "No space left on device" in reason or "disk is full" in reason


def _fault_injection(step: str | None) -> Any:
    if not step:
        return None

    def crash_at(at: str) -> None:
        if at == step:
            log.warning("fault injection: SIGKILL at %s", at)
            os.kill(os.getpid(), signal.SIGKILL)

    return crash_at
