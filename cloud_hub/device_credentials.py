"""Devices' HTTP credentials: stateless tokens the hub issues in desired states and can revoke.

Devices authenticate to the broker only; to fetch piece bytes over HTTP (:mod:`cloud_hub.routes.pieces`)
a box needs a credential. The hub puts one in each desired state it signs, next to the URL of the
bytes (``Desired.pieces_url`` / ``pieces_token``)::

    egd1:{device id}:{epoch}:{expires, unix s}:{HMAC-SHA256, base64url}
    key = HKDF-SHA256(the fleet key's private bytes, info "edgeglm device http credential v1")

Every replica holds the same fleet key, so every replica checks a token any of them issued,
without a table of tokens. A token is good while, in this order (before any other work):

    its MAC matches (else 401 "not valid": forged, altered, or made with another fleet key)
    it has not expired (401; it expires with the desired state that carried it, which the hub
        signs again, with a new token, at half its life)
    its device is in the inventory and its HTTP access is not revoked (403, at once: the row is
        read on every request)
    its epoch is the device's ``http_epoch`` (401: the access was revoked and allowed again
        since, which bumps the epoch, so a token that leaked before stays dead)

:func:`revoke` / :func:`allow` change a device's access (audited, ``device.http_access``); a revoked
device gets no token in its desired states and fetches over MQTT. A fleet key rotation changes the
key: tokens made with the old one are refused until the device's desired state is signed again
(the controller does that for every device after a rotation), and the box uses MQTT meanwhile.
Tokens are secrets: nothing here logs one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from sqlalchemy.orm import Session

from cloud_hub import audit
from cloud_hub.models import Device
from edgeglm.contracts import NAME_PATTERN
from edgeglm.errors import AccessError, NotFoundError, PermissionDenied

__all__ = [
    "CREDENTIAL_HINT",
    "CredentialKey",
    "DeviceCaller",
    "allow",
    "authenticate_device",
    "offer",
    "revoke",
]

_VERSION = "egd1"
_INFO = b"edgeglm device http credential v1"
_NUMBER = r"(0|[1-9][0-9]{0,11})"  # canonical: the MAC covers the number, so one spelling only
_TOKEN = re.compile(rf"^{_VERSION}:({NAME_PATTERN}):{_NUMBER}:{_NUMBER}:([A-Za-z0-9_-]{{43}})$")
CREDENTIAL_HINT = "Use the pieces_token of the box's newest desired state; without one, fetch over MQTT."
_REVOKED_HINT = (
    "The box fetches over MQTT meanwhile; an operator allows HTTP again with"
    " 'edgectl devices http-access DEVICE --allow'."
)


@dataclass(frozen=True)
class DeviceCaller:
    """A device that presented a valid HTTP credential (``request.state.device``)."""

    device_id: str


class CredentialKey:
    """The HMAC key derived from the fleet key: issues and checks tokens (never logs them)."""

    def __init__(self, fleet_private: Ed25519PrivateKey) -> None:
        raw = fleet_private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        self._key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(raw)

    def _mac(self, device_id: str, epoch: int, expires: int) -> str:
        message = f"{_VERSION}:{device_id}:{epoch}:{expires}".encode()
        digest = hmac.new(self._key, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def issue(self, device_id: str, epoch: int, expires_at: float) -> str:
        expires = int(expires_at)
        return f"{_VERSION}:{device_id}:{epoch}:{expires}:{self._mac(device_id, epoch, expires)}"

    def check(self, token: str, *, now: float) -> tuple[str, int]:
        """(device id, epoch) of a token this key made that has not expired; else AccessError."""
        found = _TOKEN.fullmatch(token)  # not .match: "$" also matches before a final "\n"
        if found is None:
            raise AccessError("device credential", "missing or malformed", hint=CREDENTIAL_HINT)
        device_id, epoch, expires = found[1], int(found[2]), int(found[3])
        if not hmac.compare_digest(found[4], self._mac(device_id, epoch, expires)):
            raise AccessError("device credential", "not valid", hint=CREDENTIAL_HINT)
        if expires <= now:
            raise AccessError(
                f"device credential of {device_id}",
                f"expired {now - expires:.0f} s ago",
                hint="The hub signs the desired state again with a new one; the box uses MQTT meanwhile.",
            )
        return device_id, epoch


def authenticate_device(s: Session, key: CredentialKey, token: str, *, now: float) -> DeviceCaller:
    """The device a bearer token speaks for, or AccessError (401) / PermissionDenied (403)."""
    device_id, epoch = key.check(token, now=now)
    device = s.get(Device, device_id)
    if device is None:
        raise AccessError("device credential", "not valid", hint=CREDENTIAL_HINT)
    if device.http_revoked:
        raise PermissionDenied(f"HTTP access of device {device_id}", "is revoked", hint=_REVOKED_HINT)
    if epoch != device.http_epoch:
        raise AccessError(
            f"device credential of {device_id}",
            "is superseded (the device's HTTP access was revoked and allowed again since)",
            hint="The box gets a new one in its next desired state; it uses MQTT meanwhile.",
        )
    return DeviceCaller(device_id)


def offer(
    key: CredentialKey | None, pieces_url: str | None, device: Device, expires_at: float
) -> tuple[str | None, str | None]:
    """The desired state's ``pieces_url`` and ``pieces_token`` for ``device``, or (None, None): no
    URL is set, or its HTTP access is revoked."""
    if key is None or pieces_url is None or device.http_revoked:
        return None, None
    return pieces_url, key.issue(device.id, device.http_epoch, expires_at)


def _device(s: Session, device_id: str) -> Device:
    device = s.get(Device, device_id)
    if device is None:
        raise NotFoundError(f"device {device_id}", "is not in the inventory (it registers on connect)")
    return device


def revoke(s: Session, device_id: str, actor: str) -> Device:
    """Refuse the device's HTTP credentials from now on and issue it none (audited)."""
    device = _device(s, device_id)
    before = {"http_access": not device.http_revoked, "http_epoch": device.http_epoch}
    device.http_revoked = True
    audit.record(
        s, actor, "device.http_access", f"device/{device.id}", before, {**before, "http_access": False}
    )
    return device


def allow(s: Session, device_id: str, actor: str) -> Device:
    """Allow HTTP again under a new epoch (tokens issued before stay refused); audited. A device
    that was not revoked keeps its epoch."""
    device = _device(s, device_id)
    before = {"http_access": not device.http_revoked, "http_epoch": device.http_epoch}
    if device.http_revoked:
        device.http_revoked = False
        device.http_epoch += 1
    after = {"http_access": True, "http_epoch": device.http_epoch}
    audit.record(s, actor, "device.http_access", f"device/{device.id}", before, after)
    return device
