"""The model registry: publishing bundles (resumable), releases and their per-profile bundles.

Publishing is three calls, so that an interrupted upload resumes where it stopped::

    begin(manifest)       verify signature + structure + quality gate; -> upload id, missing pieces
    put_piece(id, piece)  bytes must hash to a piece of that manifest; stored content-addressed
    commit(id)            every piece present -> release (model + semver) gains this profile's bundle

A second ``begin`` with the same manifest returns the same open upload and only the pieces still
missing. A published bundle is immutable: the same model, version and profile with a different
manifest is a conflict, the same manifest again is a no-op. A bundle whose quality gate failed
(or that carries no quality report) is refused unless ``force`` (admin only, recorded).

The bundles and open uploads are what keeps a piece alive: ``edgectl hub gc``
(:mod:`cloud_hub.piece_gc`) removes what none of them names.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import select
from sqlalchemy.orm import Session

from cloud_hub import audit
from cloud_hub.models import Bundle, Chunk, Model, Release, Upload
from cloud_hub.piece_storage import PieceStorage
from edgeglm import contracts
from edgeglm.bundle import MANIFEST_NAME, Manifest, load_manifest, manifest_digest, parse_manifest
from edgeglm.bundle_files import FolderSource
from edgeglm.errors import ConflictError, IntegrityError, NotFoundError

__all__ = ["Registry", "UploadState", "parse_ref", "semver_key"]

log = logging.getLogger(__name__)


def semver_key(version: str) -> tuple[int, int, int, str]:
    """(major, minor, patch, pre-release) of ``version`` (the contract's), or IntegrityError."""
    try:
        return contracts.semver_key(version)
    except ValueError as exc:
        raise IntegrityError("version", str(exc)) from exc


def parse_ref(ref: str) -> tuple[str, str]:
    """``model@version`` -> (model, version)."""
    model, sep, version = ref.rpartition("@")
    if not sep or not model or not version:
        raise NotFoundError(f"release {ref!r}", "write it as MODEL@VERSION")
    semver_key(version)
    return model, version


@dataclass(frozen=True)
class UploadState:
    upload_id: str
    model: str
    version: str
    profile: str
    manifest_digest: str
    state: str  # open | committed
    missing: tuple[tuple[str, int], ...]  # (piece id, size) still to send
    total_pieces: int
    total_bytes: int


class Registry:
    """Registry operations on one session; pieces go to ``store`` (the hub's piece store, folder or
    database: :mod:`cloud_hub.piece_storage`), which keeps them whatever becomes of the session."""

    def __init__(
        self, session: Session, store: PieceStorage, trusted: Mapping[str, Ed25519PublicKey]
    ) -> None:
        self.s = session
        self.store = store
        self.trusted = trusted

    # ------------------------------------------------------------------------- publishing
    def begin(self, raw: bytes, actor: str, *, force: bool = False) -> UploadState:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise IntegrityError("manifest", f"is not UTF-8 (byte {exc.start})") from exc
        manifest, doc = parse_manifest(text, self.trusted)  # signature checked against trusted keys
        digest = manifest_digest(doc)
        existing = self._bundle(manifest.model, manifest.version, manifest.profile)
        if existing is not None:
            if existing.manifest_digest != digest:
                raise ConflictError(
                    f"release {manifest.ref_name} ({manifest.profile})",
                    "is published already with a different manifest; a published bundle never changes",
                    hint="Export under a new version.",
                )
            if not self._missing(manifest):
                return self._state_of_bundle(existing, manifest)
            # the store lost pieces of a published bundle (a corrupt piece is removed when read):
            # publishing the same bundle again repairs it; nothing about the release changes
            repair = self._open_for(text, digest, manifest, actor, force=False, action="upload.repair")
            return self._state(repair, manifest)
        passed, why = _quality(manifest)
        if not passed and not force:
            raise IntegrityError(
                f"bundle {manifest.ref_name} ({manifest.profile})",
                why,
                hint="Fix the export, or publish with --force (admin) to register it anyway.",
            )
        upload = self._open_for(text, digest, manifest, actor, force=force, action="upload.begin")
        return self._state(upload, manifest)

    def _open_for(
        self, text: str, digest: str, manifest: Manifest, actor: str, *, force: bool, action: str
    ) -> Upload:
        """The open upload of this manifest, made (and audited as ``action``) when there is none."""
        upload = self.s.scalar(select(Upload).where(Upload.manifest_digest == digest, Upload.state == "open"))
        if upload is None:
            upload = Upload(
                id=uuid.uuid4().hex,
                manifest_json=text,
                manifest_digest=digest,
                model=manifest.model,
                version=manifest.version,
                profile=manifest.profile,
                force=force,
                created_by=actor,
            )
            self.s.add(upload)
            self.s.flush()
            audit.record(
                self.s,
                actor,
                action,
                f"release/{manifest.ref_name}/{manifest.profile}",
                after={"upload": upload.id, "digest": digest, "force": force},
            )
        elif force and not upload.force:
            upload.force = True
        return upload

    def put_piece(self, upload_id: str, pid: str, data: bytes) -> bool:
        """Store one piece of an open upload; False when the hub held it already."""
        upload = self._open_upload(upload_id)
        manifest = _manifest(upload.manifest_json)
        sizes = {p: size for f in manifest.files for p, size in f.pieces}
        if pid not in sizes:
            raise NotFoundError(f"piece {pid[:16]}", f"is not part of upload {upload_id}")
        if len(data) != sizes[pid]:
            raise IntegrityError(f"piece {pid[:16]}", f"is {len(data)} bytes, the manifest says {sizes[pid]}")
        new = self.store.put(pid, data)  # checks BLAKE3(data) == pid
        if self.s.get(Chunk, pid) is None:
            self.s.add(Chunk(piece_id=pid, size=len(data)))
        return new

    def publish_folder(self, folder: Path, actor: str, *, force: bool = False) -> Bundle:
        """A sealed bundle folder on this machine, published in one go (begin, the missing pieces,
        commit): how a hub is seeded without going through its HTTP API."""
        manifest, _ = load_manifest(folder, None)
        source = FolderSource.of(folder, manifest)
        upload = self.begin((folder / MANIFEST_NAME).read_bytes(), actor, force=force)
        for pid, _size in upload.missing:
            self.put_piece(upload.upload_id, pid, source.read(pid))
        return self.commit(upload.upload_id, actor)

    def status(self, upload_id: str) -> UploadState:
        upload = self.s.get(Upload, upload_id)
        if upload is None:
            raise NotFoundError(f"upload {upload_id}", "does not exist")
        return self._state(upload, _manifest(upload.manifest_json))

    def commit(self, upload_id: str, actor: str) -> Bundle:
        upload = self._open_upload(upload_id)
        manifest = _manifest(upload.manifest_json)
        missing = self._missing(manifest)
        if missing:
            raise ConflictError(
                f"upload {upload_id}",
                f"{len(missing)} of {len(manifest.piece_ids())} pieces are still missing",
                hint="Send them (edgectl publish resumes), then commit again.",
            )
        existing = self._bundle(manifest.model, manifest.version, manifest.profile)
        if existing is not None and existing.manifest_digest == upload.manifest_digest:
            upload.state = "committed"  # a repair: the published bundle has all its pieces again
            audit.record(
                self.s,
                actor,
                "release.repair",
                f"release/{manifest.ref_name}/{manifest.profile}",
                after={"digest": upload.manifest_digest, "upload": upload.id},
            )
            log.warning(
                "repaired %s for %s: its missing pieces were sent again", manifest.ref_name, manifest.profile
            )
            return existing
        model = self.s.scalar(select(Model).where(Model.name == manifest.model))
        if model is None:
            model = Model(name=manifest.model)
            self.s.add(model)
            self.s.flush()
        release = self.s.scalar(
            select(Release).where(Release.model_id == model.id, Release.version == manifest.version)
        )
        if release is None:
            major, minor, patch, pre = semver_key(manifest.version)
            release = Release(
                model_id=model.id,
                version=manifest.version,
                major=major,
                minor=minor,
                patch=patch,
                prerelease=pre,
                dataset_version=manifest.dataset_version,
                created_by=actor,
            )
            self.s.add(release)
            self.s.flush()
        elif release.dataset_version != manifest.dataset_version:
            raise ConflictError(
                f"release {manifest.ref_name}",
                f"has dataset version {release.dataset_version!r}, this bundle says "
                f"{manifest.dataset_version!r}",
            )
        passed, _ = _quality(manifest)
        assert manifest.signature is not None  # parse_manifest checked it against trusted keys
        bundle = Bundle(
            release_id=release.id,
            profile=manifest.profile,
            manifest_json=upload.manifest_json,
            manifest_digest=upload.manifest_digest,
            key_id=manifest.signature.key_id,
            total_bytes=manifest.total_bytes(),
            pieces=len(manifest.piece_ids()),
            quality=manifest.quality.model_dump(mode="json"),
            quality_passed=passed,
            forced=upload.force and not passed,
        )
        self.s.add(bundle)
        upload.state = "committed"
        self.s.flush()
        audit.record(
            self.s,
            actor,
            "release.publish",
            f"release/{manifest.ref_name}/{manifest.profile}",
            after={
                "digest": upload.manifest_digest,
                "bytes": bundle.total_bytes,
                "quality_passed": passed,
                "forced": bundle.forced,
            },
        )
        log.info("published %s for %s (%d bytes)", manifest.ref_name, manifest.profile, bundle.total_bytes)
        return bundle

    # ---------------------------------------------------------------------------- reading
    def releases(self, model: str | None = None) -> list[Release]:
        q = select(Release).join(Model)
        if model:
            q = q.where(Model.name == model)
        rows = list(self.s.scalars(q))
        return sorted(rows, key=lambda r: (r.model.name, _order(r)))

    def release(self, model: str, version: str) -> Release:
        row = self.s.scalar(
            select(Release).join(Model).where(Model.name == model, Release.version == version)
        )
        if row is None:
            raise NotFoundError(f"release {model}@{version}", "is not in the registry")
        return row

    def bundle(self, model: str, version: str, profile: str) -> Bundle:
        row = self._bundle(model, version, profile)
        if row is None:
            raise NotFoundError(f"bundle {model}@{version}", f"has no build for profile {profile!r}")
        return row

    # ---------------------------------------------------------------------------- private
    def _bundle(self, model: str, version: str, profile: str) -> Bundle | None:
        return self.s.scalar(
            select(Bundle)
            .join(Release)
            .join(Model)
            .where(Model.name == model, Release.version == version, Bundle.profile == profile)
        )

    def _open_upload(self, upload_id: str) -> Upload:
        upload = self.s.get(Upload, upload_id)
        if upload is None:
            raise NotFoundError(f"upload {upload_id}", "does not exist")
        if upload.state != "open":
            raise ConflictError(f"upload {upload_id}", "is committed already")
        return upload

    def _missing(self, manifest: Manifest) -> list[tuple[str, int]]:
        seen: dict[str, int] = {}
        for f in manifest.files:
            for pid, size in f.pieces:
                seen.setdefault(pid, size)
        absent = self.store.missing(seen)
        return [(pid, size) for pid, size in seen.items() if pid in absent]

    def _state(self, upload: Upload, manifest: Manifest) -> UploadState:
        missing = () if upload.state == "committed" else tuple(self._missing(manifest))
        return UploadState(
            upload.id,
            manifest.model,
            manifest.version,
            manifest.profile,
            upload.manifest_digest,
            upload.state,
            missing,
            len(manifest.piece_ids()),
            manifest.total_bytes(),
        )

    def _state_of_bundle(self, bundle: Bundle, manifest: Manifest) -> UploadState:
        upload = self.s.scalar(
            select(Upload).where(
                Upload.manifest_digest == bundle.manifest_digest, Upload.state == "committed"
            )
        )
        return UploadState(
            upload.id if upload else "",
            manifest.model,
            manifest.version,
            manifest.profile,
            bundle.manifest_digest,
            "committed",
            (),
            bundle.pieces,
            bundle.total_bytes,
        )


def _manifest(text: str) -> Manifest:
    manifest, _ = parse_manifest(text, None)  # verified when the upload began; stored verbatim
    return manifest


def _order(r: Release) -> tuple[int, int, int, int, str]:
    # a prerelease sorts before its release (semver 11)
    return r.major, r.minor, r.patch, 0 if r.prerelease else 1, r.prerelease


def _quality(manifest: Manifest) -> tuple[bool, str]:
    q = manifest.quality
    if q.empty:
        return False, "carries no quality report (not validated against its reference)"
    if q.passed is not True:
        detail = "; ".join(q.failures[:3])
        return False, "failed its quality gate" + (f": {detail}" if detail else "")
    return True, ""
