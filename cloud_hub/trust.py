"""The fleet's root of trust on the hub: every root version it was given, the chain it publishes.

The root key stays offline (``edgectl keys root sign``); an admin hands the hub each new signed
root (``edgectl keys root push`` -> ``POST /api/v1/trust/roots``). The first root is taken as given
(the admin vouches for it, as for the boxes' provisioned copy); each later one must be the next
version, signed by the previous version's root keys and its own (:func:`edgeglm.trust_root.advance`).
The hub then publishes the whole chain, retained, on ``edgeglm/v1/fleet/root`` and checks bundles
it is asked to publish against the newest root's release keys (``--trust`` keys only while no root
is stored). It warns when its own fleet key is not in the newest root: boxes would refuse what it
signs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import select
from sqlalchemy.orm import Session

from cloud_hub import audit
from cloud_hub.models import TrustRoot
from edgeglm.errors import ConflictError
from edgeglm.protocol import root_topic
from edgeglm.trust_root import Root, advance, chain_payload, parse_root

__all__ = ["add_root", "chain", "latest_root", "publish_chain", "release_keys", "summary"]

log = logging.getLogger(__name__)


def chain(s: Session) -> list[bytes]:
    """Every root version held, oldest first, exactly as signed."""
    return [doc.encode() for doc in s.scalars(select(TrustRoot.document).order_by(TrustRoot.version))]


def latest_root(s: Session) -> Root | None:
    doc = s.scalar(select(TrustRoot.document).order_by(TrustRoot.version.desc()).limit(1))
    return None if doc is None else parse_root(doc.encode())


def add_root(s: Session, raw: bytes, actor: str, *, fleet_key_id: str | None) -> Root:
    """Store ``raw`` as the next root version (the first: as given); audited."""
    current = latest_root(s)
    if current is None:
        root = parse_root(raw)
    else:
        candidate = parse_root(raw)
        if candidate.version != current.version + 1:
            raise ConflictError(
                f"root version {candidate.version}",
                f"the hub holds version {current.version}: the next must be {current.version + 1}",
            )
        root = advance(current, [raw])
    s.add(TrustRoot(version=root.version, document=raw.decode(), added_by=actor))
    audit.record(
        s,
        actor,
        "trust.root",
        f"root/{root.version}",
        before=None if current is None else summary(current),
        after=summary(root),
    )
    if fleet_key_id is not None and fleet_key_id not in root.role("fleet"):
        log.warning(
            "root version %d does not list this hub's fleet key %s: boxes will refuse its desired states",
            root.version,
            fleet_key_id,
        )
    return root


def release_keys(s: Session, fallback: Mapping[str, Ed25519PublicKey]) -> Mapping[str, Ed25519PublicKey]:
    """The keys a bundle must be signed by: the newest root's release keys, else ``fallback``."""
    root = latest_root(s)
    return fallback if root is None else root.role("release")


def publish_chain(s: Session, publish: object) -> int:
    """Publish the chain retained (nothing while no root is held); returns its length."""
    raws = chain(s)
    if raws and callable(publish):
        publish(root_topic(), chain_payload(raws), 1, True)
    return len(raws)


def summary(root: Root) -> dict[str, object]:
    """What a root says (key ids by role), for the API and the audit log."""
    return {
        "version": root.version,
        "expires_at": root.expires_at,
        "root": sorted(root.role("root")),
        "release": sorted(root.role("release")),
        "fleet": sorted(root.role("fleet")),
    }
