"""The fleet's root of trust: which release keys and fleet keys are valid, signed offline.

Modelled on TUF's root role and Uptane's two repositories (the release key plays Uptane's image
repository targets key; the hub's fleet key its director). One document, a *root*, says which keys
are valid for what; it is signed by the offline root key(s) and numbered. A box is provisioned
with one root (``trust_root = /etc/edge-agent/root.json``) and from then on accepts a newer one only
through the chain: version N+1 must carry a threshold of signatures from the root keys of version N
*and* of its own (so the root key itself can be rotated), exactly one version at a time. The hub
publishes the whole chain, retained, on ``edgeglm/v1/fleet/root``; a box that was offline for
several rotations walks it from the version it holds.

    {"type": "edgeglm-root", "version": 2, "expires_at": 1830000000.0,
     "keys":  {"<key id>": "<raw Ed25519 public key, base64>", ...},
     "root":    {"keys": ["<key id>", ...], "threshold": 1},
     "release": ["<key id>", ...],     manifests must be signed by one of these
     "fleet":   ["<key id>", ...],     desired states must be signed by one of these
     "signatures": [{"alg": "ed25519", "key_id": "...", "value": "..."}, ...]}

The signatures cover the canonical form of the document without ``signatures`` (sorted keys,
compact, UTF-8: as a manifest's). Removing a key from ``release`` or ``fleet`` revokes it: a
box that accepted that root refuses what the key signs from then on. An expired root still
checks the chain (a newer root may follow) but a box refuses to act on desired states under it:
that is TUF's defence against a freeze, where an attacker withholds every newer root.

    root_body(version, root=, ...)      an unsigned root naming public keys by role
    sign_root(body, privates)           the signed document (bytes)
    parse_root(raw)                     a Root, structure and self-signatures checked
    advance(current, chain, now)        the newest Root the chain reaches from ``current``
    KeyRing                             a live, read-only view of a role's keys (swapped whole)
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgeglm import strict_json
from edgeglm.bundle import canonical_bytes
from edgeglm.contracts import Signature
from edgeglm.errors import IntegrityError, SignatureError
from edgeglm.keys import key_id

__all__ = [
    "MAX_CHAIN",
    "MAX_ROOT_BYTES",
    "KeyRing",
    "Root",
    "RootChain",
    "RootDocument",
    "advance",
    "chain_payload",
    "parse_chain",
    "parse_root",
    "public_b64",
    "root_body",
    "sign_root",
]

MAX_ROOT_BYTES = 64 * 1024  # one root document
MAX_CHAIN = 256  # root versions in the published chain
_MAX_KEYS = 64


class _RootRole(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    keys: tuple[str, ...] = Field(min_length=1, max_length=_MAX_KEYS)
    threshold: int = Field(ge=1, le=_MAX_KEYS)


class RootDocument(BaseModel):
    """A root as published; see the module docstring."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["edgeglm-root"] = "edgeglm-root"
    version: int = Field(ge=1, lt=2**53)
    expires_at: float = Field(gt=0, allow_inf_nan=False)
    keys: dict[str, str] = Field(max_length=3 * _MAX_KEYS)
    root: _RootRole
    release: tuple[str, ...] = Field(max_length=_MAX_KEYS)
    fleet: tuple[str, ...] = Field(max_length=_MAX_KEYS)
    signatures: tuple[Signature, ...] = Field(default=(), max_length=_MAX_KEYS)

    @model_validator(mode="after")
    def _named_keys_exist(self) -> RootDocument:
        for kid in (*self.root.keys, *self.release, *self.fleet):
            if kid not in self.keys:
                raise ValueError(f"key id {kid} is named in a role but not listed in keys")
        if self.root.threshold > len(set(self.root.keys)):
            raise ValueError("the root threshold is larger than the number of root keys")
        return self


@dataclass(frozen=True)
class Root:
    """A parsed, self-consistent root: its document and its keys by role."""

    doc: RootDocument
    raw: bytes
    keys: Mapping[str, Ed25519PublicKey]

    @property
    def version(self) -> int:
        return self.doc.version

    @property
    def expires_at(self) -> float:
        return self.doc.expires_at

    def role(self, name: Literal["root", "release", "fleet"]) -> dict[str, Ed25519PublicKey]:
        ids = self.doc.root.keys if name == "root" else getattr(self.doc, name)
        return {kid: self.keys[kid] for kid in ids}

    def signed_by(self, raw_doc: Mapping[str, Any], doc: RootDocument) -> int:
        """How many distinct root keys of *this* root signed ``doc``."""
        body = canonical_bytes({k: v for k, v in raw_doc.items() if k != "signatures"}, "root")
        good = set()
        for sig in doc.signatures:
            public = self.role("root").get(sig.key_id)
            if public is None or sig.key_id in good:
                continue
            try:
                public.verify(base64.b64decode(sig.value, validate=True), body)
            except (InvalidSignature, ValueError):
                continue
            good.add(sig.key_id)
        return len(good)


def public_b64(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def root_body(
    version: int,
    *,
    root: Sequence[Ed25519PublicKey],
    release: Sequence[Ed25519PublicKey],
    fleet: Sequence[Ed25519PublicKey],
    expires_at: float,
    threshold: int = 1,
) -> dict[str, Any]:
    """An unsigned root naming these public keys by role (for :func:`sign_root`)."""
    return {
        "type": "edgeglm-root",
        "version": version,
        "expires_at": expires_at,
        "keys": {key_id(k): public_b64(k) for k in (*root, *release, *fleet)},
        "root": {"keys": sorted({key_id(k) for k in root}), "threshold": threshold},
        "release": sorted({key_id(k) for k in release}),
        "fleet": sorted({key_id(k) for k in fleet}),
    }


def sign_root(body: Mapping[str, Any], privates: Sequence[Ed25519PrivateKey]) -> bytes:
    """``body`` (a root without signatures) signed by each of ``privates``: the bytes to publish."""
    doc = {k: v for k, v in body.items() if k != "signatures"}
    RootDocument.model_validate(doc)
    data = canonical_bytes(doc, "root")
    doc["signatures"] = [
        {"alg": "ed25519", "key_id": key_id(p.public_key()), "value": base64.b64encode(p.sign(data)).decode()}
        for p in privates
    ]
    return json.dumps(doc, sort_keys=True, indent=1).encode()


def _load(raw: bytes) -> tuple[RootDocument, dict[str, Any], dict[str, Ed25519PublicKey]]:
    if not isinstance(raw, bytes | bytearray) or len(raw) > MAX_ROOT_BYTES:
        raise IntegrityError("root", f"must be at most {MAX_ROOT_BYTES} bytes of JSON")
    try:  # UTF-8 only, one key once, no lone surrogates: see edgeglm.strict_json
        doc = strict_json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise IntegrityError("root", f"is not valid UTF-8 JSON: {str(exc)[:120]}") from exc
    if not isinstance(doc, dict):
        raise IntegrityError("root", "is not a JSON object")
    try:
        model = RootDocument.model_validate(doc)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "root"
        raise IntegrityError("root", f"{where}: {err['msg']}") from exc
    keys: dict[str, Ed25519PublicKey] = {}
    for kid, b64 in model.keys.items():
        try:
            public = Ed25519PublicKey.from_public_bytes(base64.b64decode(b64, validate=True))
        except ValueError as exc:
            raise IntegrityError("root", f"key {kid} is not a raw Ed25519 public key in base64") from exc
        if key_id(public) != kid:
            raise IntegrityError("root", f"key {kid} does not match its id ({key_id(public)})")
        keys[kid] = public
    return model, doc, keys


def parse_root(raw: bytes) -> Root:
    """A root whose structure is valid and which carries a threshold of its own root keys'
    signatures. Trust in it comes from elsewhere: provisioning, or :func:`advance`."""
    model, doc, keys = _load(raw)
    root = Root(model, bytes(raw), keys)
    if root.signed_by(doc, model) < model.root.threshold:
        raise SignatureError(
            f"root version {model.version}",
            f"carries fewer than {model.root.threshold} valid signature(s) of its own root keys",
        )
    return root


def advance(current: Root, chain: Sequence[bytes]) -> Root:
    """Walk ``chain`` (root documents, any order) from ``current``: each next version must be
    signed by a threshold of the previous version's root keys and of its own. Returns the newest
    root reached (``current`` if the chain holds nothing newer). A chain that offers a next
    version which fails its checks raises (SignatureError, IntegrityError) naming it."""
    if len(chain) > MAX_CHAIN:
        raise IntegrityError("root chain", f"holds {len(chain)} roots, more than {MAX_CHAIN}")
    by_version: dict[int, bytes] = {}
    for raw in chain:
        model, _, _ = _load(raw)
        if model.version in by_version and by_version[model.version] != raw:
            raise IntegrityError("root chain", f"holds two different roots numbered {model.version}")
        by_version[model.version] = raw
    held = by_version.get(current.version)
    if held is not None and held != current.raw and parse_root(held).doc != current.doc:
        raise IntegrityError(
            f"root version {current.version}", "in the chain differs from the one this box holds"
        )
    while current.version + 1 in by_version:
        raw = by_version[current.version + 1]
        model, doc, _ = _load(raw)
        what = f"root version {model.version}"
        if current.signed_by(doc, model) < current.doc.root.threshold:
            raise SignatureError(what, f"is not signed by the root keys of version {current.version}")
        current = parse_root(raw)  # and by its own
    return current


class RootChain(BaseModel):
    """The payload published retained on ``edgeglm/v1/fleet/root``: every root, oldest first."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    roots: tuple[dict[str, Any], ...] = Field(max_length=MAX_CHAIN)


def chain_payload(raws: Sequence[bytes]) -> bytes:
    return json.dumps({"roots": [json.loads(r) for r in raws]}, separators=(",", ":")).encode()


def parse_chain(payload: bytes) -> list[bytes]:
    """The root documents in a published chain (as bytes); IntegrityError if it is not one."""
    if len(payload) > MAX_ROOT_BYTES * 8:
        raise IntegrityError("root chain", f"is {len(payload)} bytes, over {MAX_ROOT_BYTES * 8}")
    try:
        chain = RootChain.model_validate_json(payload)
    except ValidationError as exc:
        raise IntegrityError("root chain", f"is malformed: {str(exc)[:200]}") from exc
    return [json.dumps(doc).encode() for doc in chain.roots]


class KeyRing(Mapping[str, Ed25519PublicKey]):
    """A role's trusted keys by key id, replaced whole when a newer root is accepted: everything
    holding the ring (the update machine, activation, the serving engine) sees the new keys at once."""

    def __init__(self, keys: Mapping[str, Ed25519PublicKey] | None = None) -> None:
        self._keys: Mapping[str, Ed25519PublicKey] = dict(keys or {})
        self._lock = threading.Lock()

    def replace(self, keys: Mapping[str, Ed25519PublicKey]) -> None:
        with self._lock:
            self._keys = dict(keys)

    def __getitem__(self, kid: str) -> Ed25519PublicKey:
        return self._keys[kid]

    def __iter__(self) -> Iterator[str]:
        return iter(dict(self._keys))

    def __len__(self) -> int:
        return len(self._keys)
