"""A content-addressed piece store on disk, shared by the hub and the agent.

Layout under ``root``::

    objects/ab/abcdef...   one file per piece, named by its BLAKE3-256 id
    refs/<name>.json       a kept version: the manifest whose pieces garbage collection keeps
    tmp/                   half-written objects (removed by gc)

Writes are atomic (temp file, fsync, rename), so a crash leaves either the whole piece or nothing.
Every read verifies the bytes against the id; a corrupt object is deleted and reported, so it can
be fetched again. ``gc()`` deletes every object that no ref names.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeglm.errors import IntegrityError, NotFoundError, UsageError
from edgeglm.pieces import piece_id

__all__ = ["GcStats", "PieceStore"]

_ID = re.compile(r"^[0-9a-f]{64}$")
_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$")


@dataclass(frozen=True)
class GcStats:
    kept: int
    removed: int
    removed_bytes: int


def _check_id(pid: str) -> str:
    if not isinstance(pid, str) or not _ID.match(pid):
        raise IntegrityError("piece id", f"{str(pid)[:80]!r} is not 64 lowercase hex characters")
    return pid


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PieceStore:
    """Pieces by id, plus named refs that keep whole versions alive."""

    def __init__(self, root: Path | str, *, durable: bool = True) -> None:
        self.root = Path(root)
        self.durable = durable
        self._objects = self.root / "objects"
        self._refs = self.root / "refs"
        self._tmp = self.root / "tmp"
        for d in (self._objects, self._refs, self._tmp):
            d.mkdir(parents=True, exist_ok=True)

    def _path(self, pid: str) -> Path:
        _check_id(pid)
        return self._objects / pid[:2] / pid

    def has(self, pid: str) -> bool:
        return self._path(pid).is_file()

    def __contains__(self, pid: object) -> bool:
        return isinstance(pid, str) and _ID.match(pid) is not None and self.has(pid)

    def put(self, pid: str, data: bytes | bytearray | memoryview) -> bool:
        """Store ``data`` under ``pid`` after checking it hashes to ``pid``. False if already held."""
        path = self._path(pid)
        actual = piece_id(data)
        if actual != pid:
            raise IntegrityError(f"piece {pid[:16]}", f"bytes hash to {actual[:16]}")
        if path.is_file():
            return False
        self._write_atomic(path, data)
        return True

    def _write_atomic(self, path: Path, data: bytes | bytearray | memoryview) -> None:
        path.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name[:16], dir=self._tmp)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if self.durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        if self.durable:
            _fsync_dir(path.parent)

    def get(self, pid: str) -> bytes:
        """The piece's bytes, verified. A corrupt object is removed and IntegrityError raised."""
        path = self._path(pid)
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise NotFoundError(f"piece {pid[:16]}", "not in the store") from exc
        if piece_id(data) != pid:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            raise IntegrityError(f"piece {pid[:16]}", "stored bytes are corrupt; removed, fetch it again")
        return data

    def read(self, pid: str) -> bytes:
        """Alias of :meth:`get`, so a store is a piece source for the planner."""
        return self.get(pid)

    def size(self, pid: str) -> int:
        return self._path(pid).stat().st_size

    def remove(self, pid: str) -> int:
        """Delete one piece whatever refs say (the hub's own collector decides); its size, 0 if absent."""
        path = self._path(pid)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        return size

    def ids(self) -> Iterator[str]:
        for sub in self._objects.iterdir():
            if sub.is_dir():
                for obj in sub.iterdir():
                    if _ID.match(obj.name):
                        yield obj.name

    # -- refs: the versions kept -------------------------------------------------------------

    def _ref_path(self, name: str) -> Path:
        if not _REF.match(name):
            raise UsageError("ref name", f"{name!r} must match {_REF.pattern}")
        return self._refs / f"{name}.json"

    def keep(self, name: str, manifest: dict[str, Any]) -> None:
        """Keep every piece of ``manifest`` (a manifest dict) alive under ``name``."""
        self._write_atomic(self._ref_path(name), json.dumps(manifest, sort_keys=True).encode())

    def release(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._ref_path(name).unlink()

    def refs(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for path in sorted(self._refs.glob("*.json")):
            out[path.stem] = json.loads(path.read_text())
        return out

    def ref(self, name: str) -> dict[str, Any]:
        path = self._ref_path(name)
        if not path.is_file():
            raise NotFoundError(f"version {name}", "not kept in this store")
        loaded: dict[str, Any] = json.loads(path.read_text())
        return loaded

    def gc(self, extra_keep: Iterable[str] = (), *, tmp_age_s: float = 600.0) -> GcStats:
        """Delete objects no ref (and no id in ``extra_keep``) names, and temp files older than
        ``tmp_age_s`` (younger ones may belong to a write in progress)."""
        keep = set(extra_keep)
        for manifest in self.refs().values():
            for f in manifest.get("files", []):
                keep.update(p[0] for p in f.get("pieces", []))
        kept = removed = removed_bytes = 0
        for pid in list(self.ids()):
            if pid in keep:
                kept += 1
                continue
            path = self._path(pid)
            removed_bytes += path.stat().st_size
            path.unlink()
            removed += 1
        now = time.time()
        for tmp in self._tmp.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if now - tmp.stat().st_mtime >= tmp_age_s:
                    tmp.unlink()
        return GcStats(kept=kept, removed=removed, removed_bytes=removed_bytes)
