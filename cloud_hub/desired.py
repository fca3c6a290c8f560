"""A device's desired state: recorded in the database, then published retained on its topic.

The row changes in the caller's transaction and the MQTT message (QoS 1, retained) goes out at
once, before that transaction commits. If the commit fails, nothing in the database says the
device was told, so the controller's next tick sends the same message again (retained, same
content: repeating it is harmless); a device whose desired row disagrees with its deployment is
told again too. ``version=None`` clears the retained message (the device keeps what it runs).

Every desired state is signed with the hub's fleet key (:class:`FleetKey`), names its device and
carries the device's next sequence number, counted in the ``devices`` row by one atomic UPDATE
(replicas never hand out the same number twice; never below the hub's clock in milliseconds, so
a restored database cannot go back), and an expiry (:mod:`edgeglm.desired_signing`). A caller
that tells many devices at once (a wave, a revert) takes all their numbers in one such UPDATE
first (:func:`next_sequences`, in the same transaction) and hands each to ``publish_desired``:
one statement per wave instead of one per device, and no flush of the ORM between devices.

:func:`refresh_desired` (the rollout controller calls it) signs a device's desired state again,
unchanged but for a new sequence and expiry, once it is past half its life or was signed by a
fleet key other than the hub's current one: boxes never see their desired state expire, and after
a fleet key rotation every retained desired state is signed by the new key before the old one is
revoked (a box offline through the rotation reads the new one when it comes back).

When the hub has a pieces URL (``--pieces-url``), each desired state also offers the bytes over
HTTP: the URL and a token for the device that expires with it (:mod:`cloud_hub.device_credentials`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import case, or_, select, update
from sqlalchemy.orm import Session

from cloud_hub import device_credentials
from cloud_hub.device_credentials import CredentialKey
from cloud_hub.models import Bundle, Device, Model, Release
from edgeglm.desired_signing import DESIRED_TTL_S, sign_desired
from edgeglm.errors import ConfigError, NotFoundError
from edgeglm.keys import create_keypair, key_id, load_private_key
from edgeglm.protocol import Desired, desired_topic

__all__ = ["FleetKey", "next_sequences", "publish_desired", "refresh_desired"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FleetKey:
    """The hub's fleet key: it signs desired states (the release key signs bundles); and where
    those states tell boxes to fetch bytes over HTTP (``pieces_url``, None: MQTT only)."""

    private: Ed25519PrivateKey
    ttl_s: float = DESIRED_TTL_S
    pieces_url: str | None = None

    @property
    def key_id(self) -> str:
        return key_id(self.private.public_key())

    @cached_property
    def credentials(self) -> CredentialKey:
        """Issues and checks devices' HTTP credentials (a key derived from this one)."""
        return CredentialKey(self.private)

    @classmethod
    def load_or_create(cls, path: Path, *, pieces_url: str | None = None) -> FleetKey:
        """The key at ``path``; made there (0600, with its ``.pub`` beside) if there is none yet."""
        if not path.exists():
            _, public, kid = create_keypair(path.parent, path.stem)
            log.warning("created the fleet key %s (id %s): give boxes %s as fleet_keys", path, kid, public)
        return cls(load_private_key(path), pieces_url=pieces_url)


def next_sequences(s: Session, device_ids: Sequence[str], *, now: float) -> dict[str, int]:
    """Each device's next desired-state sequence number, counted in its row (an atomic UPDATE
    per up to 5,000 devices, RETURNING the numbers): the next number, and never below the hub's
    clock in milliseconds, so a database restored from an older backup still hands out numbers
    above those the boxes have accepted. A device id not in the inventory is left out. The
    session's other changes are not flushed first: the statement writes the counter only."""
    now_ms = int(now * 1000)
    ids = sorted(set(device_ids))  # one lock order for every replica's statements
    out: dict[str, int] = {}
    for i in range(0, len(ids), 5000):
        with s.no_autoflush:
            # rows locked in id order, as every writer of devices locks them (cloud_hub.ingest):
            # the UPDATE alone would lock them in scan order, and two writers could deadlock
            s.execute(
                select(Device.id)
                .where(Device.id.in_(ids[i : i + 5000]))
                .order_by(Device.id)
                .with_for_update()
            )
            rows = s.execute(
                update(Device)
                .where(Device.id.in_(ids[i : i + 5000]))
                .values(
                    desired_seq=case((Device.desired_seq + 1 > now_ms, Device.desired_seq + 1), else_=now_ms)
                )
                .returning(Device.id, Device.desired_seq)
                .execution_options(synchronize_session=False)
            ).all()
        out.update({device_id: int(seq) for device_id, seq in rows})
    return out


def publish_desired(
    s: Session,
    device: Device,
    model: str,
    version: str | None,
    rollout_id: int | None,
    publish: object,
    digests: dict[str, str] | None = None,
    *,
    fleet: FleetKey | None,
    sequence: int | None = None,
) -> None:
    """``digests`` memoises the bundle digest per profile across calls for the same release;
    ``sequence``: the number :func:`next_sequences` took for this device (else it takes one)."""
    topic = desired_topic(device.id)
    if version is None:
        device.desired_model = device.desired_version = None
        device.desired_rollout_id = device.desired_signed_at = device.desired_key_id = None
        if callable(publish):
            publish(topic, b"", 1, True)
        return
    memo = f"{model}@{version}+{device.profile}"
    digest = digests.get(memo) if digests is not None else None
    if digest is None:
        digest = s.scalar(
            select(Bundle.manifest_digest)
            .join(Release)
            .join(Model)
            .where(Model.name == model, Release.version == version, Bundle.profile == device.profile)
        )
        if digest is None:
            raise NotFoundError(f"bundle {model}@{version}", f"has no build for profile {device.profile!r}")
        if digests is not None:
            digests[memo] = digest
    if fleet is None:
        raise ConfigError("fleet key", "is not loaded: a desired state cannot be signed")
    now = time.time()
    if sequence is None:
        sequence = next_sequences(s, [device.id], now=now)[device.id]
    url, token = device_credentials.offer(fleet.credentials, fleet.pieces_url, device, now + fleet.ttl_s)
    msg = Desired(
        model=model,
        version=version,
        manifest_digest=digest,
        rollout_id=rollout_id,
        profile=device.profile or "",
        issued_at=now,
        device_id=device.id,
        sequence=sequence,
        expires_at=now + fleet.ttl_s,
        pieces_url=url,
        pieces_token=token,
    )
    device.desired_model, device.desired_version = model, version
    device.desired_rollout_id, device.desired_signed_at, device.desired_key_id = rollout_id, now, fleet.key_id
    if callable(publish):
        publish(topic, sign_desired(msg, fleet.private), 1, True)
    log.info(
        "device %s desired %s@%s (rollout %s, sequence %d)", device.id, model, version, rollout_id, sequence
    )


def refresh_desired(s: Session, publish: object, fleet: FleetKey, *, now: float, limit: int = 200) -> int:
    """Sign again (and publish) up to ``limit`` desired states that are past half their life or
    signed by another fleet key; returns how many."""
    if not callable(publish):
        return 0
    due = (
        select(Device)
        .where(
            Device.desired_version.is_not(None),
            Device.desired_model.is_not(None),
            or_(
                Device.desired_signed_at.is_(None),
                Device.desired_signed_at < now - fleet.ttl_s / 2,
                Device.desired_key_id.is_(None),
                Device.desired_key_id != fleet.key_id,
            ),
        )
        .order_by(Device.id)
        .limit(limit)
    )
    digests: dict[str, str] = {}
    devices = list(s.scalars(due))
    sequences = next_sequences(s, [d.id for d in devices], now=now)
    for device in devices:
        assert device.desired_model is not None
        why = "fleet key" if device.desired_key_id != fleet.key_id else "expiry"
        try:
            publish_desired(
                s,
                device,
                device.desired_model,
                device.desired_version,
                device.desired_rollout_id,
                publish,
                digests,
                fleet=fleet,
                sequence=sequences[device.id],
            )
        except NotFoundError as exc:  # the release was deleted: leave it to the operator
            log.warning("cannot sign device %s's desired state again: %s", device.id, exc)
            continue
        log.info("signed device %s's desired state again (%s)", device.id, why)
    return len(devices)
