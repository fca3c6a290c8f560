"""Putting a bundle into a slot: assemble it from the piece store, verify it there, keep its pieces.

    pieces (store) ──assemble──> slots/X/ ──verify (signature, digest, every file)──> switch ──> keep

The update machine runs these as its ``assembling`` and ``verifying`` steps (and keeps the pieces
once the slot serves); :func:`install_folder` runs them all for a bundle folder on this box (the
daemon's ``bootstrap_bundle``), after putting the folder's pieces into the store.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edge_agent.update.slots import Slots
from edgeglm.assembler import assemble_bundle
from edgeglm.bundle import Manifest, manifest_digest, parse_manifest, verify_files
from edgeglm.bundle_files import ingest_folder
from edgeglm.errors import IntegrityError
from edgeglm.piece_store import PieceStore

__all__ = ["assemble", "install_folder", "keep", "piece_ref", "verify"]

log = logging.getLogger(__name__)


def piece_ref(manifest: Manifest) -> str:
    """The name the piece store keeps a bundle's pieces under."""
    return f"{manifest.model}@{manifest.version}+{manifest.profile}"


def assemble(slots: Slots, slot: str, manifest: Manifest, doc: dict[str, Any], store: PieceStore) -> None:
    """Write the bundle into ``slot`` from the store (nothing to do if the slot holds it already)."""
    there = slots.manifest(slot)
    if there is not None and manifest_digest(there.to_json_dict()) == manifest_digest(doc):
        log.info("slot %s already holds %s: nothing to assemble", slot, manifest.ref_name)
        return
    folder = slots.clear(slot)
    try:
        assemble_bundle(manifest, doc, store, folder)
    except BaseException:
        slots.clear(slot)  # half a bundle is no use, and on a full disk it holds the space
        raise


def verify(slots: Slots, slot: str, doc: dict[str, Any], trusted: Mapping[str, Any]) -> Manifest:
    """The slot holds exactly the manifest ``doc``, signed by a trusted key, and every file intact."""
    folder = slots.path(slot)
    manifest, _ = parse_manifest((folder / "manifest.json").read_bytes(), trusted)
    if manifest_digest(manifest.to_json_dict()) != manifest_digest(doc):
        raise IntegrityError(f"slot {slot}", "holds another manifest than the one fetched")
    verify_files(manifest, folder)
    return manifest


def keep(store: PieceStore, manifest: Manifest, doc: dict[str, Any]) -> None:
    """Hold the bundle's pieces in the store (a slot serves it: garbage collection spares them)."""
    store.keep(piece_ref(manifest), doc)


def install_folder(
    src: Path,
    manifest: Manifest,
    doc: dict[str, Any],
    slots: Slots,
    store: PieceStore,
    trusted: Mapping[str, Any],
) -> str:
    """Install the (verified) bundle folder ``src`` into the inactive slot and switch to it."""
    ingest_folder(src, manifest, store)
    slot = slots.inactive_name()
    assemble(slots, slot, manifest, doc, store)
    verify(slots, slot, doc, trusted)
    slots.switch(slot)
    keep(store, manifest, doc)
    return slot
