"""What this box trusts: the release keys (bundles) and fleet keys (desired states).

Two ways to configure it (``edge_agent.config``):

    trusted_keys + fleet_keys   fixed public keys; rotating one means touching every box
    trust_root                  the fleet's root of trust (edgeglm.trust_root): the keys it names,
                                updated from the chain the hub publishes retained on
                                edgeglm/v1/fleet/root, each newer root checked against the one held

The release and fleet keys are :class:`KeyRing` s: the update machine, activation and the worker
hold the rings, and an accepted root replaces their contents at once. A root is persisted in
``agent.db`` *before* it is trusted, so a power cut never brings back a revoked key; at start the
newer of the provisioned file and the persisted one is used. Listeners (the update worker) hear of
every accepted root, so that a desired state signed by a just-added fleet key, which arrived before
the root naming it, is acted on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from edge_agent.update.state import StateStore
from edgeglm.errors import ConfigError, IntegrityError
from edgeglm.keys import load_public_keys
from edgeglm.mqtt import Incoming
from edgeglm.trust_root import KeyRing, Root, advance, parse_chain, parse_root

__all__ = ["BoxTrust"]

log = logging.getLogger(__name__)


class BoxTrust:
    def __init__(
        self,
        state: StateStore,
        *,
        trusted_keys: tuple[Path, ...] = (),
        fleet_keys: tuple[Path, ...] = (),
        root: Path | None = None,
    ) -> None:
        self.state = state
        self.release = KeyRing()
        self.fleet = KeyRing()
        self.root: Root | None = None
        self._listeners: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._told_fixed = False
        if root is None:
            self.release.replace(load_public_keys(list(trusted_keys)))
            self.fleet.replace(load_public_keys(list(fleet_keys)) if fleet_keys else {})
            if not fleet_keys:
                log.warning("no fleet_keys configured: every desired state from the hub will be refused")
            return
        try:
            provisioned = parse_root(root.read_bytes())
        except OSError as exc:
            raise ConfigError(f"config trust_root {root}", exc.strerror or str(exc)) from exc
        except IntegrityError as exc:
            raise ConfigError(f"config trust_root {root}", f"{exc.what} {exc.why}") from exc
        held = state.accepted_root()
        current = provisioned
        if held is not None:
            stored = parse_root(held)
            if stored.version > provisioned.version:
                current = stored
        self._use(current)
        log.info("root of trust version %d (expires %s)", current.version, _when(current.expires_at))

    # ------------------------------------------------------------------ the root topic
    def on_root(self, msg: Incoming) -> None:
        """The root topic's handler (paho's thread): walk the chain from the root held."""
        if self.root is None:
            if not self._told_fixed:  # retained: it comes again at every reconnect
                self._told_fixed = True
                log.warning(
                    "the hub publishes a root of trust, but this box trusts fixed keys "
                    "(trusted_keys, fleet_keys): set trust_root to follow key rotations"
                )
            return
        if not msg.payload:
            return
        with self._lock:
            assert self.root is not None
            try:
                newest = advance(self.root, parse_chain(msg.payload))
            except IntegrityError as exc:
                log.warning("refused a root-of-trust chain: %s", exc)
                return
            if newest.version == self.root.version:
                return
            self.state.accept_root(newest.version, newest.raw)  # before trusting it
            old = self.root.version
            self._use(newest)
            log.warning(
                "root of trust advanced from version %d to %d: release keys %s, fleet keys %s",
                old,
                newest.version,
                ",".join(sorted(self.release)) or "none",
                ",".join(sorted(self.fleet)) or "none",
            )
        for listener in list(self._listeners):
            listener()

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def check_fresh(self, now: float | None = None) -> None:
        """IntegrityError if the root held has expired (a newer one is being withheld)."""
        root = self.root
        if root is not None and root.expires_at <= (time.time() if now is None else now):
            raise IntegrityError(
                f"root of trust version {root.version}",
                f"expired at {_when(root.expires_at)}: no desired state is acted on until the hub "
                "publishes a newer root",
            )

    def _use(self, root: Root) -> None:
        self.root = root
        self.release.replace(root.role("release"))
        self.fleet.replace(root.role("fleet"))


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
