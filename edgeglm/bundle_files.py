"""The files of a bundle folder: describe them as manifest entries, read their pieces back.

``describe_folder`` walks a folder once per file (streaming: memory is bounded by one piece),
choosing the ``tensors`` layout for every ONNX external-data file (its tensor table comes from
the graph) and FastCDC for the rest. ``FolderSource`` serves pieces by id straight from the
files, so a bundle on disk can feed the planner, the hub or a piece store without a copy.
"""

from __future__ import annotations

import stat
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import blake3
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeglm.bundle import (
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    TensorEntry,
    check_relative_path,
    sign_manifest,
    write_manifest,
)
from edgeglm.errors import IntegrityError, NotFoundError
from edgeglm.onnx_tensors import external_tensors, read_external_tables
from edgeglm.piece_store import PieceStore
from edgeglm.pieces import (
    DEFAULT_CDC_AVG_BYTES,
    DEFAULT_PIECE_BYTES,
    TensorSpan,
    cdc_segments,
    piece_id,
    read_segments,
    tensor_segments,
)

__all__ = [
    "FolderSource",
    "describe_file",
    "describe_folder",
    "describe_onnx",
    "ingest_folder",
    "seal_folder",
]

Progress = Callable[[int], None]


def describe_file(
    path: Path,
    rel: str,
    tensors: Iterable[TensorSpan] | None = None,
    *,
    piece_bytes: int = DEFAULT_PIECE_BYTES,
    cdc_avg_bytes: int = DEFAULT_CDC_AVG_BYTES,
    progress: Progress | None = None,
) -> FileEntry:
    """A manifest entry for one file: tensor-relative pieces if ``tensors`` is given, else CDC."""
    size = path.stat().st_size
    spans = list(tensors) if tensors is not None else None
    layout: Literal["tensors", "cdc"]
    if spans is not None:
        segments = tensor_segments(spans, size, piece_bytes)
        layout, unit = "tensors", piece_bytes
    else:
        segments = cdc_segments(path, cdc_avg_bytes)
        layout, unit = "cdc", cdc_avg_bytes
    hasher = blake3.blake3()
    pieces = []
    for seg, data in read_segments(path, segments):
        hasher.update(data)
        pieces.append((piece_id(data), seg.size))
        if progress:
            progress(seg.size)
    return FileEntry(
        path=rel,
        size=size,
        digest="blake3:" + hasher.hexdigest(),
        layout=layout,
        piece_bytes=unit,
        tensors=tuple(
            TensorEntry(name=s.name, dtype=s.dtype, offset=s.offset, length=s.length) for s in spans or ()
        ),
        pieces=tuple(pieces),
    )


def _files(folder: Path) -> list[tuple[Path, str]]:
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            raise IntegrityError(
                f"bundle folder {folder}", f"{rel} is a symlink; bundles hold regular files only"
            )
        if stat.S_ISDIR(st.st_mode) or rel == MANIFEST_NAME:
            continue
        if not stat.S_ISREG(st.st_mode):
            raise IntegrityError(f"bundle folder {folder}", f"{rel} is not a regular file")
        out.append((path, check_relative_path(rel)))
    return out


def describe_folder(
    folder: Path,
    *,
    piece_bytes: int = DEFAULT_PIECE_BYTES,
    cdc_avg_bytes: int = DEFAULT_CDC_AVG_BYTES,
    progress: Progress | None = None,
) -> list[FileEntry]:
    """Entries for every regular file under ``folder`` except the manifest, sorted by path."""
    folder = Path(folder)
    tables = read_external_tables(folder)
    entries = []
    for path, rel in _files(folder):
        spans = None
        if rel in tables:
            spans = [TensorSpan(t.name, t.dtype, t.offset, t.length) for t in tables[rel]]
        entries.append(
            describe_file(
                path, rel, spans, piece_bytes=piece_bytes, cdc_avg_bytes=cdc_avg_bytes, progress=progress
            )
        )
    return entries


def describe_onnx(model_path: Path, **kwargs: Any) -> list[FileEntry]:
    """Entries for one ONNX model and the external-data files it points to (paths relative to it)."""
    model_path = Path(model_path)
    spans: dict[str, list[TensorSpan]] = {}
    for t in external_tensors(model_path):
        rel = check_relative_path(t.location)
        spans.setdefault(rel, []).append(TensorSpan(t.name, t.dtype, t.offset, t.length))
    entries = [describe_file(model_path, model_path.name, None, **kwargs)]
    for rel, table in sorted(spans.items()):
        entries.append(describe_file(model_path.parent / rel, rel, table, **kwargs))
    return entries


class FolderSource:
    """Serves the pieces of the files listed in ``entries`` from ``folder``, verified on read."""

    def __init__(self, folder: Path, entries: Iterable[FileEntry]) -> None:
        self.folder = Path(folder)
        self._where: dict[str, tuple[str, int, int]] = {}
        for entry in entries:
            for seg, (pid, _) in zip(entry.segments(), entry.pieces, strict=True):
                self._where.setdefault(pid, (entry.path, seg.offset, seg.size))

    @classmethod
    def of(cls, folder: Path, manifest: Manifest) -> FolderSource:
        return cls(folder, manifest.files)

    def __contains__(self, pid: object) -> bool:
        return pid in self._where

    def read(self, pid: str) -> bytes:
        try:
            rel, offset, size = self._where[pid]
        except KeyError as exc:
            raise NotFoundError(f"piece {pid[:16]}", f"not in the bundle at {self.folder}") from exc
        with open(self.folder / rel, "rb") as fh:
            fh.seek(offset)
            data = fh.read(size)
        if piece_id(data) != pid:
            raise IntegrityError(f"bundle file {rel}", f"bytes at {offset} no longer match piece {pid[:16]}")
        return data


def ingest_folder(folder: Path, manifest: Manifest, store: PieceStore) -> int:
    """Put every piece of a bundle on disk into ``store`` (each verified); returns how many were new."""
    new = 0
    for entry in manifest.files:
        chunks = read_segments(Path(folder) / entry.path, entry.segments())
        for (pid, _), (_, data) in zip(entry.pieces, chunks, strict=True):
            new += store.put(pid, data)
    return new


def seal_folder(
    folder: Path,
    key: Ed25519PrivateKey,
    *,
    model: str,
    version: str,
    profile: str,
    piece_bytes: int = DEFAULT_PIECE_BYTES,
    cdc_avg_bytes: int = DEFAULT_CDC_AVG_BYTES,
    progress: Progress | None = None,
    **fields: Any,
) -> tuple[Manifest, dict[str, Any]]:
    """Describe every file of ``folder``, sign the manifest and write it as ``manifest.json``.

    ``fields`` are the other manifest fields (quality, runtime, smoke_test, source_digest, ...).
    """
    entries = describe_folder(folder, piece_bytes=piece_bytes, cdc_avg_bytes=cdc_avg_bytes, progress=progress)
    fields.setdefault("created_at", datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
    manifest = Manifest(model=model, version=version, profile=profile, files=tuple(entries), **fields)
    doc = sign_manifest(manifest, key)
    write_manifest(folder, doc)
    return Manifest.model_validate(doc), doc
