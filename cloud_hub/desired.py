"""A device's desired state: recorded in the database, then published retained on its topic.

The row changes in the caller's transaction and the MQTT message (QoS 1, retained) goes out at
once, before that transaction commits. If the commit fails, nothing in the database says the
device was told, so the controller's next tick sends the same message again (retained, same
content: repeating it is harmless); a device whose desired row disagrees with its deployment is
told again too. ``version=None`` clears the retained message (the device keeps what it runs).
"""

from __future__ import annotations

import logging
import time

from sqlalchemy import select
from sqlalchemy.orm import Session

from cloud_hub.models import Bundle, Device, Model, Release
from edgeglm.errors import NotFoundError
from edgeglm.protocol import Desired, desired_topic, encode

__all__ = ["publish_desired"]

log = logging.getLogger(__name__)


def publish_desired(
    s: Session,
    device: Device,
    model: str,
    version: str | None,
    rollout_id: int | None,
    publish: object,
    digests: dict[str, str] | None = None,
) -> None:
    """``digests`` memoises the bundle digest per profile across calls for the same release."""
    topic = desired_topic(device.id)
    if version is None:
        device.desired_model = device.desired_version = None
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
    msg = Desired(
        model=model,
        version=version,
        manifest_digest=digest,
        rollout_id=rollout_id,
        profile=device.profile or "",
        issued_at=time.time(),
    )
    device.desired_model, device.desired_version = model, version
    if callable(publish):
        publish(topic, encode(msg), 1, True)
    log.info("device %s desired %s@%s (rollout %s)", device.id, model, version, rollout_id)
