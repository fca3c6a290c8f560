"""Boot: what the daemon serves before any link is up.

    bootstrap_bundle ──verify──> install_folder (assemble, verify, switch) ──┐   first start only
    active slot ──Activator.boot (signature, every digest, smoke test) <─────┘
         │ does not load                                      │ loads
         v                                                    v
    the other slot (switched to), once; else serve nothing    serve it

A box answers from the model it trusts, or not at all: requests get ``unavailable`` until an
update brings one. A bootstrap bundle that does not verify is a provisioning mistake, reported as
:class:`ConfigError` (exit 78: systemd does not loop on it).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edge_agent.activation import Activator
from edge_agent.update.install import install_folder
from edge_agent.update.slots import Slots
from edgeglm.bundle import load_manifest, verify_files
from edgeglm.errors import ConfigError, EdgeError
from edgeglm.piece_store import PieceStore

__all__ = ["boot", "install_bootstrap"]

log = logging.getLogger(__name__)


def install_bootstrap(src: Path | None, slots: Slots, store: PieceStore, trusted: Mapping[str, Any]) -> None:
    """First start: install ``src`` (``bootstrap_bundle``) when neither slot holds a model."""
    if src is None or any(slots.manifest(n) is not None for n in ("a", "b")):
        return
    try:
        manifest, doc = load_manifest(src, trusted)
        verify_files(manifest, src)
    except EdgeError as exc:  # provisioning is config: exit 78, systemd does not loop on it
        raise ConfigError(f"config bootstrap_bundle {src}", exc.why) from exc
    slot = install_folder(src, manifest, doc, slots, store, trusted)
    log.info("installed %s@%s from %s into slot %s", manifest.model, manifest.version, src, slot)


def boot(slots: Slots, activator: Activator) -> None:
    """Serve the active slot (``activator.serve``); if it does not load, fall back to the other one."""
    for attempt in range(2):
        name = slots.active_name()
        if slots.manifest(name) is None:
            if attempt == 0 and slots.manifest(slots.inactive_name()) is not None:
                log.error("active slot %s holds no model: switching to the other slot", name)
                slots.switch(slots.inactive_name())
                continue
            log.warning("no model installed yet: requests get 'unavailable' until one arrives")
            return
        try:
            activator.serve(activator.boot(slots.active))
            return
        except EdgeError as exc:
            log.error("slot %s does not load: %s", name, exc)
            other = slots.inactive_name()
            if attempt == 1 or slots.manifest(other) is None:
                log.error("no slot loads: serving nothing until an update arrives")
                return
            slots.switch(other)
