"""Activating a slot: load its bundle in an engine, warm it up, smoke-test it, then serve it.

The update machine calls :meth:`Activator.__call__` twice for one update: on the inactive slot
before the switch (the candidate is loaded, warmed up and must pass the golden smoke test, while the
old model keeps serving), and on the active slot after it (the same candidate is promoted to
serving without a second load). After a crash between the two, the second call finds the slot
already serving (the daemon loaded it at boot) and smoke-tests it through the scheduler.

The engine a switch replaces stays loaded as a *standby* when two models fit the profile's
memory budget (``keep_previous``): a revert to it then costs a digest check and a smoke test, not
a model load (seconds for a 1.5B model). It is dropped before any other model is loaded, so no
more than two engines are ever in memory.

The smoke test (also the warm-up: its first prefill and decode size ORT's buffers) runs the
manifest's golden prompt teacher-forced and compares each position's logits with the export's
(``smoke.py`` holds the rule); the share of positions that pass must reach the profile's
``smoke_min_agreement``. The profile is the one the bundle was exported and gated with (recorded
in its manifest), or the box's own when its config names a profile file (``profile``, an override).
The manifest's signature is checked on every load (file digests were checked by the machine's
``verifying`` step; :meth:`Activator.boot` checks them too, since nothing vouches for a slot on
disk across a restart).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from edge_agent.inference.engine import Engine
from edge_agent.inference.scheduler import Scheduler
from edge_agent.smoke import SmokeResult, smoke_test
from edgeglm.bundle import load_manifest, manifest_digest, verify_files
from edgeglm.errors import UpdateError
from edgeglm.profiles import DeviceProfile

__all__ = ["Activator"]

log = logging.getLogger(__name__)


class Activator:
    """The machine's ``activate`` callback; ``serve(engine)`` puts an engine in front of requests."""

    def __init__(
        self,
        trusted: Mapping[str, Any],
        profile: DeviceProfile | None,
        active: Callable[[], Path],
        serve: Callable[[Engine], Engine | None],
        serving: Callable[[], tuple[Engine, Scheduler] | None],
        *,
        threads: int | None = None,
        keep_previous: bool = True,
        quiesce: Callable[[Engine], None] = lambda _e: None,
    ) -> None:
        self.trusted = trusted
        self.profile = profile  # the box's explicit override; None: each bundle's own
        self.active = active
        self.serve = serve
        self.serving = serving
        self.threads = threads
        self.keep_previous = keep_previous
        self.quiesce = quiesce
        self.last: SmokeResult | None = None
        self._candidate: tuple[Path, str, Engine] | None = None
        self._standby: tuple[Path, str, Engine] | None = None

    def boot(self, folder: Path) -> Engine:
        """Load the active slot at start: signature and every file digest, then the smoke test."""
        manifest, _ = load_manifest(folder, self.trusted)
        verify_files(manifest, folder)
        engine = self._load(folder)
        self._check(engine, None)
        return engine

    def __call__(self, folder: Path) -> None:
        real = Path(folder).resolve()
        _, doc = load_manifest(real, self.trusted)  # the signature, on every activation
        digest = manifest_digest(doc)
        live = self.serving()
        if (
            live is not None
            and Path(live[0].folder).resolve() == real
            and manifest_digest(live[0].manifest.to_json_dict()) == digest
        ):
            self._check(live[0], live[1])  # serving it already (a resume after the switch)
            return
        cand, standby = self._candidate, self._standby
        if cand is not None and cand[0] == real and cand[1] == digest:
            engine = cand[2]  # loaded and smoke-tested before the switch
        elif standby is not None and standby[0] == real and standby[1] == digest:
            self._standby = None
            engine = standby[2]  # the model this box ran before: still loaded
            self.quiesce(engine)
            log.info("reusing the loaded %s@%s (standby)", engine.model, engine.version)
            self._check(engine, None)
        else:
            self._candidate = self._standby = None  # at most two engines in memory
            engine = self._load(real)
            self._check(engine, None)
        if real == Path(self.active()).resolve():
            self._candidate = None
            previous = self.serve(engine)
            if previous is not None and self.keep_previous and self._two_fit(engine, previous):
                self._standby = (
                    Path(previous.folder).resolve(),
                    manifest_digest(previous.manifest.to_json_dict()),
                    previous,
                )
        else:
            self._candidate = (real, digest, engine)

    def discard(self) -> None:
        """Drop a loaded candidate (an update that failed after loading it)."""
        self._candidate = None

    def _two_fit(self, a: Engine, b: Engine) -> bool:  # a: the new engine, whose budget applies
        need = sum(f.size for f in a.manifest.files) + sum(f.size for f in b.manifest.files)
        fits = need <= a.profile.memory_budget_mb * 2**20
        if not fits:
            log.info("not keeping %s@%s loaded: two models exceed the memory budget", b.model, b.version)
        return fits

    def _load(self, folder: Path) -> Engine:
        t0 = time.perf_counter()
        engine = Engine.load(folder, profile=self.profile, threads=self.threads)
        log.info(
            "loaded %s@%s from %s in %.2fs", engine.model, engine.version, folder, time.perf_counter() - t0
        )
        return engine

    def _check(self, engine: Engine, scheduler: Scheduler | None) -> None:
        result = smoke_test(engine, scheduler)
        self.last = result
        need = engine.profile.quality.smoke_min_agreement
        log.info(
            "smoke test of %s@%s: agreement %.3f (need %.3f) in %.2fs: %s",
            engine.model,
            engine.version,
            result.agreement,
            need,
            result.seconds,
            result.describe(),
        )
        if result.agreement < need:
            raise UpdateError(
                f"smoke test of {engine.model}@{engine.version}",
                f"{result.describe()}; the profile needs {need:.0%}",
            )
