"""The update worker: follows the hub's desired state, one update at a time, on a thread of its own.

    desired (retained) ──on_desired──> newest wish ──wake──> worker thread ──> UpdateMachine.start
                                                                              └─ garbage collection

At start the unfinished update, if any, resumes. A desired state is acted on only if the hub's
fleet key signed it for this device, it has not expired, it is not issued far ahead of this box's
clock, and its sequence is not below the one accepted last (:func:`check_desired`); the accepted
sequence is written down before anything else happens, so no restart lets the box go back. A
lower sequence is stale (reordered or replayed) and ignored; anything else refused is reported
(step ``desired_refused``, no rollout id: a refused message names no rollout the hub should trust).
An update that ended ``failed`` is not tried again for
the same (rollout, manifest digest): the retained desired state would otherwise loop a box through
the same failure; the hub answers failures by reverting the desired state. A different desired
state arriving during a download supersedes it at once (reported ``failed``, reason "superseded");
the new one runs next. After a success, and after a failure on a full disk, the piece store keeps
only what the two slots hold. Each accepted desired state is handed to ``offer`` too (the fetcher
learns from it whether the hub offers the bytes over HTTP, and the credential: edge_agent.fetch_http),
a newer one with the same target included (the hub signs it again with a fresh credential).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from edge_agent.activation import Activator
from edge_agent.update.install import piece_ref
from edge_agent.update.machine import Fetcher, UpdateMachine
from edge_agent.update.slots import Slots
from edge_agent.update.state import StateStore, UpdateRecord
from edgeglm.desired_signing import Accepted, check_desired, desired_digest
from edgeglm.errors import IntegrityError, ProtocolError, ReplayError
from edgeglm.mqtt import Incoming
from edgeglm.piece_store import PieceStore
from edgeglm.protocol import UPDATE_SUCCEEDED, Desired, decode

__all__ = ["PutReport", "UpdateWorker"]

log = logging.getLogger(__name__)

# (rollout id, version, step, ok, reason, progress): queue one report for the hub
PutReport = Callable[[int | None, str, str, bool, str | None, dict[str, int] | None], None]


@dataclass(frozen=True)
class _Want:
    model: str
    version: str
    profile: str
    digest: str
    rollout_id: int | None


class UpdateWorker:
    def __init__(
        self,
        state: StateStore,
        store: PieceStore,
        slots: Slots,
        fetcher: Fetcher,
        trusted: Mapping[str, Any],
        activator: Activator,
        *,
        device_id: str,
        fleet_keys: Mapping[str, Any],
        fresh: Callable[[], None] = lambda: None,
        profile: str,
        report: PutReport,
        crash_at: Callable[[str], None] | None = None,
        offer: Callable[[Desired], None] | None = None,
    ) -> None:
        self.offer = offer or (lambda _d: None)
        self.state, self.store, self.slots, self.activator = state, store, slots, activator
        self.profile, self.put_report = profile, report
        self.device_id, self.fleet_keys, self.fresh = device_id, fleet_keys, fresh
        self._refused: bytes | None = None  # the last refused payload: a newer root may admit it
        self.machine = UpdateMachine(
            state,
            store,
            slots,
            fetcher,
            trusted,
            activator,
            self._report,
            crash_at=crash_at,
            superseded=self._superseded,
        )
        self._want: _Want | None = None
        held = state.accepted_desired()
        self._accepted = Accepted(*held) if held is not None else None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()

    def start(self) -> UpdateWorker:
        threading.Thread(target=self._work, name="update-worker", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def on_desired(self, msg: Incoming) -> None:
        """The desired-state topic's handler (paho's thread): check it, note it, wake the worker."""
        if not msg.payload:
            return  # the hub cleared it: keep running what we run
        self._consider(msg.payload, report=True)

    def recheck(self) -> None:
        """The trusted keys changed (a newer root): the last refused desired state may now pass."""
        payload = self._refused
        if payload is not None:
            self._consider(payload, report=False)

    def _consider(self, payload: bytes, *, report: bool) -> None:
        with self._lock:
            try:
                self.fresh()
                d = check_desired(
                    payload,
                    self.fleet_keys,
                    device_id=self.device_id,
                    accepted=self._accepted,
                    now=time.time(),
                )
            except IntegrityError as exc:
                self._refused = None if isinstance(exc, ReplayError) else payload
                if report:
                    self._refuse(payload, exc)
                return
            self._refused = None
            assert d.sequence is not None
            accepted = Accepted(d.sequence, desired_digest(payload))
            if accepted != self._accepted:
                self.state.accept_desired(accepted.sequence, accepted.digest)  # before acting on it
                if not report:
                    log.info("acting on desired state %s@%s, admitted by a newer root", d.model, d.version)
                self._accepted = accepted
            self._want = _Want(d.model, d.version, d.profile, d.manifest_digest, d.rollout_id)
            self.offer(d)
        self._wake.set()

    def _refuse(self, payload: bytes, exc: IntegrityError) -> None:
        if isinstance(exc, ReplayError):  # a late copy or a replay of an older one: nothing to report
            log.warning("ignored a stale desired state: %s", exc)
            return
        try:
            d = decode(Desired, payload)
        except ProtocolError:
            log.warning("refused a desired state: %s", exc)
            return
        log.warning("refused a desired state: %s", exc)
        self.put_report(None, d.version, "desired_refused", False, str(exc), None)

    def _report(self, step: str, ok: bool, reason: str | None, progress: dict[str, int] | None) -> None:
        rec = self.machine.current
        if rec is not None:
            self.put_report(rec.rollout_id, rec.version, step, ok, reason, progress)

    def _superseded(self, rec: UpdateRecord) -> bool:
        with self._lock:
            want = self._want
        return want is not None and (want.model, want.version, want.digest) != (
            rec.model,
            rec.version,
            rec.manifest_digest,
        )

    def _work(self) -> None:
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
        if want.profile != self.profile:
            self.put_report(
                want.rollout_id, want.version, "failed", False, f"this box runs profile {self.profile}", None
            )
            return
        if self._serving(want) or self._failed_before(want):
            return
        final = self.machine.start(
            model=want.model,
            version=want.version,
            profile=want.profile,
            digest=want.digest,
            rollout_id=want.rollout_id,
        )
        self.activator.discard()
        if final == UPDATE_SUCCEEDED:
            self._collect_garbage()
        elif final == "failed" and _disk_full(self.state.latest()):
            log.warning("the data folder is full: dropping the pieces of the failed update")
            self._collect_garbage()  # a later rollout fetches them again; the box needs the space now

    def _serving(self, want: _Want) -> bool:
        """It serves ``want`` already: a new rollout to it succeeds at once."""
        live = self.activator.serving()
        if live is None or (live[0].model, live[0].version) != (want.model, want.version):
            return False
        last = self.state.latest()
        if want.rollout_id and not (last and last.rollout_id == want.rollout_id):
            self.put_report(want.rollout_id, want.version, UPDATE_SUCCEEDED, True, None, None)
        return True

    def _failed_before(self, want: _Want) -> bool:
        last = self.state.latest()
        failed = (
            last is not None
            and last.step == "failed"
            and (last.rollout_id, last.manifest_digest) == (want.rollout_id, want.digest)
        )
        if failed:
            log.info("not retrying %s@%s (rollout %s): it failed", want.model, want.version, want.rollout_id)
        return failed

    def _collect_garbage(self) -> None:
        """Keep the pieces of what the two slots hold; drop the rest."""
        held = {piece_ref(m) for m in (self.slots.manifest(n) for n in ("a", "b")) if m is not None}
        for ref in list(self.store.refs()):
            if ref not in held:
                self.store.release(ref)
        stats = self.store.gc()
        log.info("piece store: %s", stats)


def _disk_full(rec: UpdateRecord | None) -> bool:
    reason = str(getattr(rec, "reason", "") or "")
    return "No space left on device" in reason or "disk is full" in reason
