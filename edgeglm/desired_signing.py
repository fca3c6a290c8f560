"""The hub's signature on a device's desired state (PRODUCT.md section 11, the trust model).

Two kinds of signature: the release key signs bundles (what a model is); the hub's fleet key
signs each device's desired state (what a box should run). A signed desired state names its
device, carries that device's sequence number (the hub counts per device; the agent persists the
highest it accepted and never accepts a lower one, nor a different message under the same number)
and an expiry. The signature covers the canonical form of the JSON object as published: sorted
keys, compact, UTF-8, without ``signature`` (as a manifest's does).

    sign_desired(body, private)             the payload to publish (JSON bytes)
    check_desired(payload, trusted, ...)    the Desired an agent may act on, else IntegrityError
                                            (SignatureError: the signature; ReplayError: an older one)

``check_desired`` refuses, with one-line reasons: a payload that is not a valid Desired; a
missing or untrusted or wrong signature; another device's; an expired one; one issued more than
``MAX_AHEAD_S`` ahead of the box's clock; a sequence below the accepted one; a different message
under the accepted sequence (the same message again is a redelivery of the retained state: fine).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgeglm.bundle import canonical_bytes
from edgeglm.errors import IntegrityError, ProtocolError, ReplayError, SignatureError
from edgeglm.keys import key_id
from edgeglm.protocol import Desired, decode

__all__ = ["DESIRED_TTL_S", "MAX_AHEAD_S", "Accepted", "check_desired", "desired_digest", "sign_desired"]

DESIRED_TTL_S = 30 * 24 * 3600.0  # a desired state is valid this long after it is issued
MAX_AHEAD_S = 300.0  # issued_at may run this far ahead of the box's clock (clock skew), no more


@dataclass(frozen=True)
class Accepted:
    """The newest desired state a box accepted: its sequence and the digest of its payload."""

    sequence: int
    digest: str


def _canonical(doc: Mapping[str, Any]) -> bytes:
    return canonical_bytes(doc, "desired state")


def desired_digest(payload: bytes) -> str:
    """What a box remembers of the desired state it accepted (SHA-256 of the payload's canonical form)."""
    return hashlib.sha256(_canonical(json.loads(payload))).hexdigest()


def sign_desired(body: Desired, private: Ed25519PrivateKey) -> bytes:
    """``body`` (with device_id, sequence and expires_at set) signed, as the payload to publish."""
    if body.device_id is None or body.sequence is None or body.expires_at is None:
        raise ValueError("a desired state to sign names its device, sequence and expiry")
    doc = body.model_dump(mode="json", exclude={"signature"})
    value = base64.b64encode(private.sign(_canonical(doc))).decode()
    doc["signature"] = {"alg": "ed25519", "key_id": key_id(private.public_key()), "value": value}
    return json.dumps(doc, separators=(",", ":")).encode()


def check_desired(
    payload: bytes,
    trusted: Mapping[str, Ed25519PublicKey],
    *,
    device_id: str,
    accepted: Accepted | None,
    now: float,
) -> Desired:
    """The desired state in ``payload`` if this box may act on it; IntegrityError saying why not."""
    try:
        d = decode(Desired, payload)
        doc = json.loads(payload)
    except (ProtocolError, ValueError) as exc:
        raise IntegrityError("desired state", f"is malformed: {str(exc)[:200]}") from exc
    what = f"desired state {d.model}@{d.version}"
    sig = d.signature
    if sig is None:
        raise SignatureError(what, "is not signed by the hub's fleet key")
    public = trusted.get(sig.key_id)
    if public is None:
        raise SignatureError(what, f"is signed by key {sig.key_id}, which is not a trusted fleet key")
    try:
        public.verify(base64.b64decode(sig.value, validate=True), _canonical(doc))
    except (InvalidSignature, ValueError) as exc:
        raise SignatureError(what, "has a signature that does not match its content") from exc
    if d.device_id != device_id:
        raise IntegrityError(what, f"is for device {d.device_id!r}, not for this one ({device_id!r})")
    if d.sequence is None or d.expires_at is None:
        raise IntegrityError(what, "carries no sequence or no expiry")
    if d.expires_at <= now:
        raise IntegrityError(what, f"expired {now - d.expires_at:.0f}s ago (sequence {d.sequence})")
    if d.issued_at > now + MAX_AHEAD_S:
        raise IntegrityError(
            what, f"is issued {d.issued_at - now:.0f}s ahead of this box's clock (at most {MAX_AHEAD_S:.0f}s)"
        )
    if accepted is not None:
        if d.sequence < accepted.sequence:
            raise ReplayError(
                what, f"has sequence {d.sequence}, below the {accepted.sequence} already accepted (a replay)"
            )
        if d.sequence == accepted.sequence and desired_digest(payload) != accepted.digest:
            raise IntegrityError(what, f"reuses sequence {d.sequence} for a different desired state")
    return d
