"""The bundle manifest: model, canonical form, Ed25519 signature, verification.

A bundle is a folder with ``manifest.json`` beside the files it lists. The manifest is signed
over its *canonical form*: the JSON object without its ``signature`` key, keys sorted, no
whitespace, UTF-8, no NaN. Verification works on the exact JSON received (never on a
re-serialised model), so what is checked is what was signed.

A received manifest is read as strict JSON (a key twice in one object, ``NaN``: refused), then its
signature is checked on that raw document, before the model validates anything or expands a
file's piece layout; the piece and tensor tables are capped (``MAX_PIECES_PER_FILE``,
``MAX_TENSORS_PER_FILE``, ``MAX_FILES``) and every piece of a tensor file is at most
``piece_bytes``, so no declared size makes validation cost more than the manifest's own length.

Nothing from a manifest touches the file system unchecked: every file path must be relative,
POSIX, free of ``..``, ``.``, empty parts, backslashes and control characters, and unique (also
case-insensitively); on disk a listed file must be a regular file, not a symlink.
"""

from __future__ import annotations

import base64
import json
import math
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import blake3
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from edgeglm.contracts import Digest, Signature, name_problem, version_problem
from edgeglm.errors import IntegrityError, SignatureError
from edgeglm.keys import key_id
from edgeglm.manifest_sections import QualitySection, RuntimeSection
from edgeglm.pieces import Segment, TensorSpan, tensor_segments
from edgeglm.profiles import EXPORT_ONLY, DeviceProfile
from edgeglm.strict_json import loads as strict_loads

__all__ = [
    "MANIFEST_NAME",
    "FileEntry",
    "Manifest",
    "Signature",
    "SmokePosition",
    "SmokeTest",
    "TensorEntry",
    "canonical_bytes",
    "check_relative_path",
    "load_manifest",
    "manifest_digest",
    "parse_manifest",
    "sign_manifest",
    "verify_files",
    "write_manifest",
]

MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 32 << 20
MAX_FILES = 4096
MAX_TENSORS_PER_FILE = 1 << 16
MAX_PIECES_PER_FILE = 1 << 18  # 256 GiB of 1 MiB pieces

_HEX64 = r"[0-9a-f]{64}"
_BAD_PATH_CHARS = re.compile(r"[\x00-\x1f\x7f\\:]")


def check_relative_path(path: str) -> str:
    """Return ``path`` if it is a safe relative POSIX path inside a bundle, else raise."""
    if not path or len(path) > 512:
        raise IntegrityError("manifest", f"file path {path[:80]!r} is empty or too long")
    if path.startswith("/") or _BAD_PATH_CHARS.search(path):
        raise IntegrityError("manifest", f"file path {path[:80]!r} is absolute or has forbidden characters")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise IntegrityError("manifest", f"file path {path[:80]!r} has an empty, '.' or '..' part")
    if path == MANIFEST_NAME:
        raise IntegrityError("manifest", "the manifest cannot list itself")
    return path


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorEntry(_Strict):
    name: str = Field(min_length=1, max_length=1024)
    dtype: str = Field(min_length=1, max_length=32)
    offset: int = Field(ge=0)
    length: int = Field(ge=0)


class FileEntry(_Strict):
    """One file of the bundle and the pieces it is made of, in file order."""

    path: str
    size: int = Field(ge=0)
    digest: Digest
    layout: Literal["tensors", "cdc"]
    piece_bytes: int = Field(gt=0, le=64 << 20)
    tensors: tuple[TensorEntry, ...] = Field(default=(), max_length=MAX_TENSORS_PER_FILE)
    pieces: tuple[tuple[str, int], ...] = Field(max_length=MAX_PIECES_PER_FILE)

    @field_validator("path")
    @classmethod
    def _safe_path(cls, v: str) -> str:
        try:
            return check_relative_path(v)
        except IntegrityError as exc:
            raise ValueError(exc.why) from exc

    @field_validator("pieces")
    @classmethod
    def _piece_ids(cls, v: tuple[tuple[str, int], ...]) -> tuple[tuple[str, int], ...]:
        for pid, size in v:
            if not re.fullmatch(_HEX64, pid) or size <= 0:
                raise ValueError(f"bad piece entry [{pid[:70]!r}, {size}]")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> FileEntry:
        if sum(size for _, size in self.pieces) != self.size:
            raise ValueError(f"{self.path}: piece sizes do not add up to the file size {self.size}")
        if self.layout == "cdc" and self.tensors:
            raise ValueError(f"{self.path}: a cdc file has no tensor table")
        if self.layout == "tensors":
            # Each slice is at most piece_bytes: checked before the layout is expanded, so the
            # expansion has at most as many segments as the table lists pieces (plus its tensors).
            if any(size > self.piece_bytes for _, size in self.pieces):
                raise ValueError(f"{self.path}: a piece is larger than piece_bytes {self.piece_bytes}")
            try:
                segs = self.segments()
            except IntegrityError as exc:
                raise ValueError(f"{self.path}: {exc.why}") from exc
            if [s.size for s in segs] != [size for _, size in self.pieces]:
                raise ValueError(f"{self.path}: pieces do not match the tensor table")
        return self

    def segments(self) -> list[Segment]:
        """The byte range (and tensor slice, for tensor files) of every piece, in order."""
        if self.layout == "tensors":
            spans = [TensorSpan(t.name, t.dtype, t.offset, t.length) for t in self.tensors]
            return tensor_segments(spans, self.size, self.piece_bytes)
        out, pos = [], 0
        for _, size in self.pieces:
            out.append(Segment(pos, size))
            pos += size
        return out


class SmokePosition(_Strict):
    """The exported graph's next-token logits at one golden position: its top ids, best first."""

    ids: tuple[int, ...] = Field(min_length=2, max_length=64)
    logits: tuple[float, ...] = Field(min_length=2, max_length=64)

    @model_validator(mode="after")
    def _paired(self) -> SmokePosition:
        if len(self.ids) != len(self.logits) or len(set(self.ids)) != len(self.ids):
            raise ValueError("ids and logits must pair up, one logit per distinct id")
        finite = all(math.isfinite(x) for x in self.logits)
        if not finite or list(self.logits) != sorted(self.logits, reverse=True):
            raise ValueError("logits must be finite and in descending order")
        return self


class SmokeTest(_Strict):
    """The golden prompt an agent runs after loading a model, and what the export computed for it.

    ``expected_tokens`` are the export's greedy tokens. Bundles from this release on also carry,
    per expected token, the graph's top logits at that position (``reference``, teacher-forced
    on the golden path) and the largest |Δlogit| a box may show there (``logit_tolerance``),
    derived from ``path_logit_diff``: what the export measured between its own numeric paths on
    the same sequence (one prefill of it all, a prompt split as a prefix-cache hit splits it,
    token by token). ``edge_agent/smoke.py`` holds the rule; docs/operator-guide.md explains it.
    The three are left out of the JSON when absent, so an older bundle keeps its digest.
    """

    prompt: str = Field(max_length=4096)
    prompt_tokens: tuple[int, ...] = Field(default=(), max_length=16384)  # a mismatch on the device is a bug
    expected_tokens: tuple[int, ...] = Field(max_length=512)
    max_new_tokens: int = Field(gt=0, le=512)
    stop_tokens: tuple[int, ...] = Field(default=(), max_length=64)  # greedy ends after one, as in serving
    reference: tuple[SmokePosition, ...] = Field(default=(), max_length=512)
    logit_tolerance: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    path_logit_diff: float | None = Field(default=None, ge=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _reference(self) -> SmokeTest:
        if not self.reference:
            if self.logit_tolerance is not None:
                raise ValueError("logit_tolerance needs reference logits")
            return self
        if self.logit_tolerance is None:
            raise ValueError("reference logits need a logit_tolerance")
        if len(self.reference) != len(self.expected_tokens):
            raise ValueError("reference needs one position per expected token")
        for i, (pos, token) in enumerate(zip(self.reference, self.expected_tokens, strict=True)):
            if pos.ids[0] != token:
                raise ValueError(f"reference position {i}: the top id is not the expected token")
        return self

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out: dict[str, Any] = handler(self)
        for key in _SMOKE_OPTIONAL:
            if out.get(key) in (None, [], ()):
                out.pop(key, None)
        return out


_SMOKE_OPTIONAL = ("reference", "logit_tolerance", "path_logit_diff")


class Manifest(_Strict):
    format_version: Literal[1] = 1
    model: str
    version: str
    profile: str
    created_at: str = ""
    source_digest: str | None = None
    dataset_version: str | None = None
    quality: QualitySection = Field(default_factory=QualitySection)
    runtime: RuntimeSection = Field(default_factory=RuntimeSection)
    # the device profile the export built and gated the bundle with; the agent serves it with this
    # one (older bundles lack it: the agent then reads the shipped profile of the same name)
    device_profile: DeviceProfile | None = None
    smoke_test: SmokeTest | None = None
    files: tuple[FileEntry, ...] = Field(max_length=MAX_FILES)
    signature: Signature | None = None

    @field_validator("model", "profile")
    @classmethod
    def _name(cls, v: str) -> str:
        if (problem := name_problem(v)) is not None:
            raise ValueError(problem)
        return v

    @field_validator("version")
    @classmethod
    def _semver(cls, v: str) -> str:
        if (problem := version_problem(v)) is not None:
            raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _profile_named(self) -> Manifest:
        if self.device_profile is not None and self.device_profile.name != self.profile:
            raise ValueError(
                f"device_profile is {self.device_profile.name!r} but the bundle is for {self.profile!r}"
            )
        return self

    @model_serializer(mode="wrap")
    def _omit_absent_profile(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out: dict[str, Any] = handler(self)
        if out.get("device_profile") is None:
            out.pop("device_profile", None)  # an older agent knows no such key: leave it out
        else:  # nor the export-only profile keys, unless the manifest spelled them out itself
            assert self.device_profile is not None
            given = self.device_profile.model_fields_set
            out["device_profile"] = {
                k: v for k, v in out["device_profile"].items() if k not in EXPORT_ONLY or k in given
            }
        return out

    @model_validator(mode="after")
    def _unique_paths(self) -> Manifest:
        paths = [f.path.casefold() for f in self.files]  # case-folded: safe on any file system
        if len(set(paths)) != len(paths):
            raise ValueError("a file path is listed twice")
        dirs = {p.rsplit("/", i)[0] for p in paths for i in range(1, p.count("/") + 1)}
        if dirs & set(paths):
            raise ValueError("a file path is also used as a directory")
        return self

    @property
    def ref_name(self) -> str:
        return f"{self.model}@{self.version}"

    def piece_ids(self) -> set[str]:
        return {pid for f in self.files for pid, _ in f.pieces}

    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=False)


def canonical_bytes(doc: Mapping[str, Any], what: str = "manifest") -> bytes:
    """The signed form of a signed JSON document (a manifest; a desired state): the object without
    ``signature``, sorted keys, compact, UTF-8."""
    body = {k: v for k, v in doc.items() if k != "signature"}
    try:
        return json.dumps(
            body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode()
    except ValueError as exc:
        raise IntegrityError(what, f"not canonicalisable: {exc}") from exc


def manifest_digest(doc: Mapping[str, Any]) -> str:
    """``blake3:<hex>`` of the canonical form: what ``Desired.manifest_digest`` names."""
    return "blake3:" + blake3.blake3(canonical_bytes(doc)).hexdigest()


def _validate(doc: Any) -> Manifest:
    if not isinstance(doc, dict):
        raise IntegrityError("manifest", "is not a JSON object")
    try:
        return Manifest.model_validate(doc)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "manifest"
        raise IntegrityError("manifest", f"{where}: {err['msg']}") from exc


def sign_manifest(manifest: Manifest | Mapping[str, Any], private: Ed25519PrivateKey) -> dict[str, Any]:
    """The manifest as a JSON dict with its ``signature`` set."""
    doc = manifest.to_json_dict() if isinstance(manifest, Manifest) else dict(manifest)
    doc.pop("signature", None)
    _validate(doc)
    sig = private.sign(canonical_bytes(doc))
    doc["signature"] = {
        "alg": "ed25519",
        "key_id": key_id(private.public_key()),
        "value": base64.b64encode(sig).decode(),
    }
    return doc


def parse_manifest(
    raw: bytes | str, trusted: Mapping[str, Ed25519PublicKey] | None
) -> tuple[Manifest, dict[str, Any]]:
    """Parse and validate a manifest; verify its signature against ``trusted`` keys by key id.

    The signature is checked on the raw document first: an unsigned or forged manifest costs no
    more than its JSON parse. ``trusted=None`` skips the check (for inspection tools and for
    manifests verified when they were received — never before activation). Returns the model and
    the exact JSON dict received.
    """
    if len(raw) > MAX_MANIFEST_BYTES:
        raise IntegrityError("manifest", f"is {len(raw)} bytes, over the {MAX_MANIFEST_BYTES}-byte limit")
    try:
        doc = strict_loads(raw)
    except (ValueError, RecursionError) as exc:
        raise IntegrityError("manifest", f"is not valid JSON: {str(exc)[:120]}") from exc
    if not isinstance(doc, dict):
        raise IntegrityError("manifest", "is not a JSON object")
    if trusted is not None:
        verify_signature(doc, trusted)
    return _validate(doc), doc


def verify_signature(doc: Mapping[str, Any], trusted: Mapping[str, Ed25519PublicKey]) -> None:
    """Check ``doc``'s signature over its canonical form, before anything else in it is trusted."""
    ref = _ref(doc)
    raw_sig = doc.get("signature")
    if raw_sig is None:
        raise SignatureError(f"manifest {ref}", "is not signed")
    try:
        sig = Signature.model_validate(raw_sig)
    except ValidationError as exc:
        raise SignatureError(f"manifest {ref}", "has a malformed signature") from exc
    public = trusted.get(sig.key_id)
    if public is None:
        raise SignatureError(f"manifest {ref}", f"signed by key {sig.key_id}, which is not trusted")
    try:
        public.verify(base64.b64decode(sig.value, validate=True), canonical_bytes(doc))
    except (InvalidSignature, ValueError) as exc:
        raise SignatureError(f"manifest {ref}", "signature does not match its content") from exc


def _ref(doc: Mapping[str, Any]) -> str:
    """``model@version`` of a document not yet validated, for messages (clipped, printable)."""
    model, version = doc.get("model"), doc.get("version")
    if not (isinstance(model, str) and isinstance(version, str)):
        return "(unnamed)"
    return ascii(f"{model[:64]}@{version[:64]}")[1:-1]


def write_manifest(folder: Path, doc: Mapping[str, Any]) -> Path:
    path = Path(folder) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def load_manifest(
    folder: Path, trusted: Mapping[str, Ed25519PublicKey] | None
) -> tuple[Manifest, dict[str, Any]]:
    path = Path(folder) / MANIFEST_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise IntegrityError(f"bundle {folder}", f"has no {MANIFEST_NAME}") from exc
    return parse_manifest(raw, trusted)


def verify_files(manifest: Manifest, folder: Path) -> None:
    """Check every listed file exists as a regular file (no symlink) of the right size and digest."""
    folder = Path(folder)
    for entry in manifest.files:
        path = folder / entry.path
        parent = path.parent
        while parent != folder and parent != parent.parent:
            if parent.is_symlink():
                raise IntegrityError(f"bundle file {entry.path}", "lies under a symlinked directory")
            parent = parent.parent
        try:
            st = path.lstat()
        except FileNotFoundError as exc:
            raise IntegrityError(f"bundle file {entry.path}", "is missing") from exc
        if not stat.S_ISREG(st.st_mode):
            raise IntegrityError(f"bundle file {entry.path}", "is not a regular file (symlink or other)")
        if st.st_size != entry.size:
            raise IntegrityError(
                f"bundle file {entry.path}", f"is {st.st_size} bytes, manifest says {entry.size}"
            )
        hasher = blake3.blake3()
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                hasher.update(chunk)
        if "blake3:" + hasher.hexdigest() != entry.digest:
            raise IntegrityError(f"bundle file {entry.path}", "digest does not match the manifest")
