"""The update state machine: small steps, one transition table, each step persisted before it runs.

    fetching_manifest ─ok─> downloading ─ok─> assembling ─ok─> verifying ─ok─> activating ─ok─> committed
          │error               │error            │error           │error          │error
          └──────────────────> failed <──────────┴────────────────┘               v
                                 ^───────────────────────────────────────── rolling_back

Until ``activating`` nothing touches the active slot, so a failure there leaves the current model
serving and the update simply ``failed``. ``activating`` smoke-tests the new slot *before* the
switch and again after it; a failure switches back (``rolling_back``). Every step is idempotent:
``resume()`` re-runs the persisted step after a crash or power cut, and because pieces live in a
content-addressed store that verifies on write, nothing already verified is fetched again. A step
entered more than ``MAX_ENTRIES`` times for one update ends it (the loop guard), rolling back if the
switch may have happened. A revert to the version the other slot still holds downloads nothing
and skips assembly.

Steps report through ``report(step, ok, reason, progress)``; the hub makes reports idempotent by
(rollout id, step).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from edge_agent.update.install import assemble, keep, verify
from edge_agent.update.slots import Slots
from edge_agent.update.state import StateStore, UpdateRecord
from edgeglm.bundle import Manifest, manifest_digest, parse_manifest
from edgeglm.errors import EdgeError, IntegrityError, UpdateError
from edgeglm.piece_store import PieceStore
from edgeglm.planner import PieceStep, plan, receive
from edgeglm.protocol import UPDATE_SUCCEEDED
from edgeglm.tensor_delta import Encoded

__all__ = ["MAX_ENTRIES", "TRANSITIONS", "Fetcher", "UpdateMachine"]

log = logging.getLogger(__name__)

MAX_ENTRIES = 3
PIECE_RETRIES = 3  # rounds in a row that fetch nothing new before a download fails
TERMINAL = frozenset({UPDATE_SUCCEEDED, "failed"})

TRANSITIONS: Mapping[tuple[str, str], str] = {
    ("fetching_manifest", "ok"): "downloading",
    ("fetching_manifest", "error"): "failed",
    ("downloading", "ok"): "assembling",
    ("downloading", "error"): "failed",
    ("assembling", "ok"): "verifying",
    ("assembling", "error"): "failed",
    ("verifying", "ok"): "activating",
    ("verifying", "error"): "failed",
    ("activating", "ok"): UPDATE_SUCCEEDED,
    ("activating", "error"): "rolling_back",
    ("rolling_back", "ok"): "failed",
    ("rolling_back", "error"): "failed",
}


class Fetcher(Protocol):
    """Where manifests and pieces come from (the hub's MQTT gateway; a local source in tests)."""

    def manifest(self, model: str, version: str, profile: str) -> bytes: ...

    def pieces(
        self,
        target: Manifest,
        steps: Sequence[PieceStep],
        have: Sequence[str],
        *,
        cancelled: Callable[[], bool] | None = None,
    ) -> Iterator[tuple[PieceStep, Encoded, str | None]]:
        """The steps' pieces as they arrive. ``cancelled`` (the update was superseded) is polled
        while waiting: once it is true the fetcher stops waiting and returns what it has."""
        ...


Report = Callable[[str, bool, str | None, dict[str, int] | None], None]
Activate = Callable[[Any], None]  # load + warm up + smoke test a bundle folder; raises on failure


@dataclass
class _Run:
    rec: UpdateRecord
    manifest: Manifest | None = None
    doc: dict[str, Any] = field(default_factory=dict)
    reason: str = ""


class UpdateMachine:
    def __init__(
        self,
        state: StateStore,
        store: PieceStore,
        slots: Slots,
        fetcher: Fetcher,
        trusted: Mapping[str, Any],
        activate: Activate,
        report: Report,
        *,
        crash_at: Callable[[str], None] | None = None,  # tests: raise here to simulate a crash
        superseded: Callable[[UpdateRecord], bool] | None = None,  # a newer desired state arrived
    ) -> None:
        self.state = state
        self.store = store
        self.slots = slots
        self.fetcher = fetcher
        self.trusted = trusted
        self.activate = activate
        self.report = report
        self.crash_at = crash_at or (lambda _step: None)
        self.superseded = superseded or (lambda _rec: False)
        self.fetched: list[str] = []  # every piece id received, in order (tests read it)
        self.current: UpdateRecord | None = None  # the update being driven (reports name it)
        self.progress_every_s = 2.0
        self._steps: dict[str, Callable[[_Run], None]] = {
            "fetching_manifest": self._fetch_manifest,
            "downloading": self._download,
            "assembling": self._assemble,
            "verifying": self._verify,
            "activating": self._activate,
            "rolling_back": self._roll_back,
        }

    # ---------------------------------------------------------------------------- entry
    def start(self, *, model: str, version: str, profile: str, digest: str, rollout_id: int | None) -> str:
        """Begin an update to ``model@version`` (the hub's desired state); returns the final step."""
        active = self.slots.manifest(self.slots.active_name())
        if active is not None and (active.model, active.version) == (model, version):
            return UPDATE_SUCCEEDED  # already serving it
        rec = self.state.begin(
            rollout_id=rollout_id,
            model=model,
            version=version,
            profile=profile,
            manifest_digest=digest,
            step="fetching_manifest",
            previous_slot=self.slots.active_name(),
            target_slot=self.slots.inactive_name(),
        )
        return self._drive(_Run(rec), "fetching_manifest")

    def resume(self) -> str | None:
        """After a restart: continue the unfinished update, if any; returns its final step."""
        rec = self.state.latest()
        if rec is None or rec.step in TERMINAL:
            return None
        log.info("resuming update to %s@%s at %s", rec.model, rec.version, rec.step)
        run = _Run(rec)
        if rec.manifest_json:
            run.manifest, run.doc = parse_manifest(rec.manifest_json, self.trusted)
        return self._drive(run, rec.step)

    # ----------------------------------------------------------------------------- loop
    def _drive(self, run: _Run, step: str) -> str:
        self.current = run.rec
        while step not in TERMINAL:
            entries = int((run.rec.attempts or {}).get(step, 0))
            if entries >= MAX_ENTRIES:
                run.reason = f"loop guard: {step} entered {entries} times"
                step = "rolling_back" if step in ("activating",) else "failed"
                if step == "rolling_back" and int((run.rec.attempts or {}).get(step, 0)) >= MAX_ENTRIES:
                    step = "failed"
                continue
            run.rec = self.state.enter(run.rec, step, reason=run.reason)  # persisted before the effect
            self.current = run.rec
            self.crash_at(step)
            t0 = time.perf_counter()
            try:
                self._steps[step](run)
                event = "ok"
                log.info(
                    "update to %s@%s: %s took %.2fs",
                    run.rec.model,
                    run.rec.version,
                    step,
                    time.perf_counter() - t0,
                )
            except EdgeError as exc:
                run.reason = str(exc)
                event = "error"
                log.warning("update to %s@%s: %s failed: %s", run.rec.model, run.rec.version, step, exc)
            except OSError as exc:
                run.reason = f"{step}: {exc}"
                event = "error"
                log.warning("update to %s@%s: %s failed: %s", run.rec.model, run.rec.version, step, exc)
            if step == "rolling_back":
                self.report("rolled_back", False, run.reason, None)
            step = TRANSITIONS[(step, event)]
        # The final report is queued (durably, in the outbox) before the final step is persisted:
        # a crash in between resumes the last step, which is idempotent, and reports again.
        if step == UPDATE_SUCCEEDED:
            self.report(UPDATE_SUCCEEDED, True, None, None)
        else:
            self.report("failed", False, run.reason or "failed", None)
        run.rec = self.state.enter(run.rec, step, reason=run.reason)
        self.current = run.rec
        self.crash_at(step)
        return step

    # ---------------------------------------------------------------------------- steps
    def _fetch_manifest(self, run: _Run) -> None:
        rec = run.rec
        raw = self._held_manifest(rec.manifest_digest) or self.fetcher.manifest(
            rec.model, rec.version, rec.profile
        )
        manifest, doc = parse_manifest(raw, self.trusted)  # signature and every path checked
        if (manifest.model, manifest.version, manifest.profile) != (rec.model, rec.version, rec.profile):
            raise IntegrityError(
                "manifest", f"is {manifest.ref_name} for {manifest.profile}, not what was asked for"
            )
        if rec.manifest_digest and manifest_digest(doc) != rec.manifest_digest:
            raise IntegrityError("manifest", "digest differs from the one in the desired state")
        run.manifest, run.doc = manifest, doc
        text = raw.decode() if isinstance(raw, bytes) else raw
        run.rec = self.state.save(rec, manifest_json=text)
        self.report("fetching_manifest", True, None, None)

    def _held_manifest(self, digest: str) -> bytes | None:
        """The signed manifest of a slot that holds exactly ``digest`` (a revert: no network)."""
        for name in ("a", "b"):
            m = self.slots.manifest(name)
            if digest and m is not None and manifest_digest(m.to_json_dict()) == digest:
                return (self.slots.path(name) / "manifest.json").read_bytes()
        return None

    def _held(self) -> list[Manifest]:
        return [m for m in (self.slots.manifest(n) for n in ("a", "b")) if m is not None]

    def _download(self, run: _Run) -> None:
        target = self._manifest(run)
        have = [p for p in target.piece_ids() if self.store.has(p)]
        held = self._held()
        the_plan = plan(target, held, have=have)
        steps = the_plan.steps()
        total = sum(s.size for s in steps)
        done = 0
        last_report = time.monotonic()
        idle_rounds, attempt = 0, 0
        while idle_rounds < PIECE_RETRIES:  # give up only after rounds that bring nothing new
            todo = [s for s in steps if not self.store.has(s.piece_id)]
            if not todo:
                break
            attempt += 1
            before = done
            versions = [m.version for m in held if m.model == target.model]

            def cancelled() -> bool:  # a revert must not wait on a slow link
                return self.superseded(run.rec)

            for step, encoded, base in self.fetcher.pieces(target, todo, versions, cancelled=cancelled):
                if self.superseded(run.rec):  # the hub changed its mind: stop downloading now
                    raise UpdateError("download", "superseded by a newer desired state")
                if self.store.has(step.piece_id):
                    continue
                try:
                    receive(self.store, step.piece_id, step.size, encoded, base)
                except IntegrityError as exc:  # a flipped byte: dropped, fetched again next round
                    log.warning("piece %s rejected (%s); fetching it again", step.piece_id[:16], exc.why)
                    continue
                self.fetched.append(step.piece_id)
                log.debug("piece %s verified (%d bytes)", step.piece_id, step.size)
                done += step.size
                if time.monotonic() - last_report >= self.progress_every_s:
                    last_report = time.monotonic()
                    self.report("downloading", True, None, self._progress(steps))
            if self.superseded(run.rec):  # the hub changed its mind (it refuses the old target now)
                raise UpdateError("download", "superseded by a newer desired state")
            idle_rounds = 0 if done > before else idle_rounds + 1
            log.info("download round %d: %d of %d bytes", attempt, done, total)
        missing = [s.piece_id for s in steps if not self.store.has(s.piece_id)]
        if missing:
            raise UpdateError("download", f"{len(missing)} piece(s) could not be fetched intact")
        self.report("downloading", True, None, self._progress(steps))

    def _progress(self, steps: Sequence[PieceStep]) -> dict[str, int]:
        """What is in the store already (pieces verified before a restart count too)."""
        held = [s for s in steps if self.store.has(s.piece_id)]
        return {
            "bytes_done": sum(s.size for s in held),
            "bytes_total": sum(s.size for s in steps),
            "pieces_done": len(held),
            "pieces_total": len(steps),
        }

    def _assemble(self, run: _Run) -> None:
        assemble(self.slots, run.rec.target_slot, self._manifest(run), run.doc, self.store)

    def _verify(self, run: _Run) -> None:
        verify(self.slots, run.rec.target_slot, run.doc, self.trusted)

    def _activate(self, run: _Run) -> None:
        target = run.rec.target_slot
        if self.slots.active_name() != target:
            self.activate(self.slots.path(target))  # smoke test before the switch
            self.crash_at("activating:switch")
            self.slots.switch(target)
        self.activate(self.slots.active)  # and on the active slot (after a crash: again)
        keep(self.store, self._manifest(run), run.doc)

    def _roll_back(self, run: _Run) -> None:
        previous = run.rec.previous_slot
        if self.slots.active_name() != previous:
            self.slots.switch(previous)
        if self.slots.manifest(previous) is not None:
            self.activate(self.slots.active)

    def _manifest(self, run: _Run) -> Manifest:
        if run.manifest is None:
            raise UpdateError("update", "no manifest fetched yet")
        return run.manifest
