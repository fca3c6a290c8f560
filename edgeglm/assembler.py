"""Rebuild bundle files from a piece store, byte-identical, verified, atomically.

Each file is written piece by piece to a temporary name beside its destination while a BLAKE3
of the whole file is computed; size and digest are checked against the manifest, the file is
fsynced and only then renamed into place. Memory is bounded by one piece; a crash leaves no
half-written file under a final name.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import blake3

from edgeglm.bundle import FileEntry, Manifest, write_manifest
from edgeglm.errors import IntegrityError
from edgeglm.piece_store import PieceStore

__all__ = ["assemble_bundle", "assemble_file"]


def _inside(dest_dir: Path, rel: str) -> Path:
    root = dest_dir.resolve()
    path = (root / rel).resolve()
    if root not in path.parents:
        raise IntegrityError(f"bundle file {rel}", f"would be written outside {dest_dir}")
    return path


def assemble_file(
    entry: FileEntry,
    store: PieceStore,
    dest_dir: Path,
    *,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write ``entry`` under ``dest_dir`` from ``store``; raise IntegrityError if it does not verify."""
    path = _inside(Path(dest_dir), entry.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    hasher = blake3.blake3()
    written = 0
    try:
        with open(tmp, "wb") as fh:
            for pid, size in entry.pieces:
                data = store.get(pid)
                if len(data) != size:
                    raise IntegrityError(f"bundle file {entry.path}", f"piece {pid[:16]} has the wrong size")
                fh.write(data)
                hasher.update(data)
                written += size
                if progress:
                    progress(size)
            fh.flush()
            os.fsync(fh.fileno())
        if written != entry.size or "blake3:" + hasher.hexdigest() != entry.digest:
            raise IntegrityError(
                f"bundle file {entry.path}", "assembled bytes do not match the manifest digest"
            )
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return path


def assemble_bundle(
    manifest: Manifest,
    doc: Mapping[str, Any],
    store: PieceStore,
    dest_dir: Path,
    *,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Assemble every file and write the (signed) manifest ``doc`` last; fsync the folder."""
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    for entry in manifest.files:
        assemble_file(entry, store, dest_dir, progress=progress)
    write_manifest(dest_dir, doc)
    fd = os.open(dest_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return dest_dir
