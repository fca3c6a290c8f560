"""Garbage collection of the hub's piece store (``edgectl hub gc``) and copying an old folder store
into the current one (``edgectl hub store import``).

What is live is what the database names, never what a store says about itself::

    live pieces     every piece of every published bundle (bundles.manifest_json) and of every
                    open upload (uploads.manifest_json where state = 'open')
    live encodings  those whose piece and base are both still held

``collect`` works in this order, so that a publish running beside it keeps its pieces:

    1. list the pieces the store holds          (a piece stored after this is never looked at)
    2. read the live set from the database      (an upload that began before a piece of it was
                                                 stored is seen here: ``begin`` commits first)
    3. delete held - live, and the encodings of what is gone
    4. read the live set again: a removed piece named by now is reported as ``lost``

Races that remain, and what they cost:

* A piece the store held with nothing naming it, adopted by an upload that began between steps
  2 and 3 (its ``begin`` saw the piece and did not ask for it): the commit finds it missing and
  asks for it again (``edgectl publish`` resumes); if the commit came before step 3, the bundle
  lacks it and step 4 reports it: publish that bundle again (the repair path).
* :meth:`cloud_hub.registry.Registry.publish_folder` begins, stores and commits in one
  transaction: its upload is invisible to step 2, so its new pieces can be removed if they were
  stored before step 1. Do not collect while seeding a hub that way.
* Encodings made during a run may be removed with their piece; they are made again on demand.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import delete, select

from cloud_hub.db import Database
from cloud_hub.models import Bundle, Chunk, Release, Upload
from cloud_hub.piece_storage import PieceStorage
from edgeglm.bundle import parse_manifest
from edgeglm.errors import IntegrityError, NotFoundError
from edgeglm.piece_store import PieceStore

__all__ = ["GcReport", "ImportReport", "collect", "import_folder"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GcReport:
    store: str
    dry_run: bool
    pieces_held: int
    pieces_live: int
    pieces_removed: int
    bytes_removed: int
    encodings_held: int
    encodings_removed: int
    encoding_bytes_removed: int
    # published bundles (model@version+profile) the store lacks pieces of: publish them again
    incomplete: dict[str, int] = field(default_factory=dict)
    # pieces removed here that a bundle or upload named by the time the run ended (see the races)
    lost: tuple[str, ...] = ()


def _live(db: Database) -> tuple[set[str], dict[str, set[str]]]:
    """Every piece an open upload names, and the pieces of each published bundle by name."""
    uploads: set[str] = set()
    bundles: dict[str, set[str]] = {}
    with db.session() as s:
        for text in s.scalars(select(Upload.manifest_json).where(Upload.state == "open")):
            uploads |= parse_manifest(text, None)[0].piece_ids()
        rows = s.execute(select(Bundle.manifest_json, Bundle.profile, Release.version).join(Release))
        for text, profile, version in rows:
            manifest = parse_manifest(text, None)[0]
            bundles[f"{manifest.model}@{version}+{profile}"] = manifest.piece_ids()
    return uploads, bundles


def collect(db: Database, store: PieceStorage, *, dry_run: bool = False) -> GcReport:
    """Remove the pieces nothing names and the encodings whose piece or base is gone."""
    held = set(store.ids())
    uploads, bundles = _live(db)
    live = uploads.union(*bundles.values())
    dead = held - live
    remaining = held - dead
    encodings = list(store.encoding_keys())
    dead_encodings = [
        k
        for k in encodings
        if k.piece_id not in remaining or (k.base_id is not None and k.base_id not in remaining)
    ]
    incomplete = {name: len(pids - held) for name, pids in sorted(bundles.items()) if pids - held}
    removed_bytes = encoding_bytes = 0
    lost: tuple[str, ...] = ()
    if not dry_run:
        encoding_bytes = store.remove_encodings(dead_encodings)
        removed_bytes = store.remove(sorted(dead))
        with db.session() as s:  # the inventory of pieces follows the store
            gone = sorted(dead)
            for start in range(0, len(gone), 500):
                s.execute(delete(Chunk).where(Chunk.piece_id.in_(gone[start : start + 500])))
        uploads_after, bundles_after = _live(db)
        lost = tuple(sorted(dead & uploads_after.union(*bundles_after.values())))
        for pid in lost:
            log.error("gc removed piece %s while a publish adopted it: publish that bundle again", pid)
    report = GcReport(
        store=store.description,
        dry_run=dry_run,
        pieces_held=len(held),
        pieces_live=len(live),
        pieces_removed=len(dead),
        bytes_removed=removed_bytes,
        encodings_held=len(encodings),
        encodings_removed=len(dead_encodings),
        encoding_bytes_removed=encoding_bytes,
        incomplete=incomplete,
        lost=lost,
    )
    log.info(
        "gc%s on %s: %d of %d pieces and %d of %d encodings %s",
        " (dry run)" if dry_run else "",
        report.store,
        report.pieces_removed,
        report.pieces_held,
        report.encodings_removed,
        report.encodings_held,
        "would go" if dry_run else "removed",
    )
    return report


@dataclass(frozen=True)
class ImportReport:
    source: str
    store: str
    pieces_seen: int
    copied: int
    held_already: int
    bytes_copied: int
    corrupt: tuple[str, ...]  # pieces whose bytes no longer match their id: left out (and removed)


def import_folder(folder: Path, store: PieceStorage) -> ImportReport:
    """Copy every piece of a folder store (a hub's old ``DATA/pieces``) into ``store``, one piece at
    a time, each verified on the way. Encodings are not copied: they are made again on demand."""
    if not (folder / "objects").is_dir():
        raise NotFoundError(f"folder {folder}", "is not a piece store (it has no objects/ folder)")
    source = PieceStore(folder)
    seen = copied = held = copied_bytes = 0
    corrupt: list[str] = []
    for pid in _ids(source):
        seen += 1
        if store.has(pid):
            held += 1
            continue
        try:
            data = source.get(pid)
        except IntegrityError:
            corrupt.append(pid)
            continue
        if store.put(pid, data):
            copied += 1
            copied_bytes += len(data)
        else:
            held += 1
    log.info("imported %d pieces (%d bytes) from %s into %s", copied, copied_bytes, folder, store.description)
    return ImportReport(str(folder), store.description, seen, copied, held, copied_bytes, tuple(corrupt))


def _ids(source: PieceStore) -> Iterator[str]:
    yield from sorted(source.ids())
