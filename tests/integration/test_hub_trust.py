"""The hub's side of the root of trust (cloud_hub.trust): admins add root versions through the
chain, the hub publishes the chain retained, checks publishes against the newest release keys,
and signs desired states again before they expire or after its fleet key changed."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_hub.desired import FleetKey, refresh_desired
from cloud_hub.models import AuditEntry, Device
from edgeglm.bundle_files import seal_folder
from edgeglm.desired_signing import check_desired
from edgeglm.protocol import desired_topic, root_topic
from edgeglm.trust_root import parse_chain, root_body, sign_root
from tests.integration.test_hub_api import _publish

pytestmark = pytest.mark.integration


def _root(version: int, roots: list[Any], release: list[Any], fleet: list[Any], signers: list[Any]) -> bytes:
    def publics(keys: list[Any]) -> list[Any]:
        return [k.public_key() for k in keys]

    body = root_body(
        version,
        root=publics(roots),
        release=publics(release),
        fleet=publics(fleet),
        expires_at=time.time() + 3600,
    )
    return sign_root(body, signers)


def _post(hub: Any, raw: bytes, role: str = "admin") -> Any:
    return hub.client.post(
        "/api/v1/trust/roots", content=raw, headers={**hub.as_(role), "Content-Type": "application/json"}
    )


def test_roots_are_added_through_the_chain_published_and_decide_which_release_keys_publish(
    hub: Any, publisher: Any
) -> None:
    sent: list[tuple[str, bytes, int, bool]] = []
    hub.ctx.publish = lambda topic, payload, qos, retain: sent.append((topic, payload, qos, retain))
    root_key, new_release = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    fleet = hub.ctx.fleet.private
    assert hub.client.get("/api/v1/trust/root", headers=hub.as_("viewer")).status_code == 404

    v1 = _root(1, [root_key], [publisher.key], [fleet], [root_key])
    assert _post(hub, v1, "operator").status_code == 403  # roles before the body
    r = _post(hub, v1)
    assert r.status_code == 201, r.text
    assert r.json()["release"] == [publisher.key_id] and r.json()["fleet"] == [hub.ctx.fleet.key_id]
    topic, payload, qos, retain = sent[-1]
    assert (topic, qos, retain) == (root_topic(), 1, True) and len(parse_chain(payload)) == 1
    _publish(hub, publisher.bundle("1.0.0"))  # the publisher's key is in the root

    rogue = Ed25519PrivateKey.generate()
    forged = _root(2, [rogue], [rogue], [rogue], [rogue])
    r = _post(hub, forged)
    assert r.status_code == 422 and "not signed by the root keys of version 1" in r.text
    assert _post(hub, _root(3, [root_key], [new_release], [fleet], [root_key])).status_code == 409  # a gap
    assert _post(hub, b'{"version": 2}').status_code == 422
    assert _post(hub, b"x" * (70 * 1024)).status_code in (400, 413)

    v2 = _root(2, [root_key], [new_release], [fleet], [root_key])  # the publisher's key revoked
    assert _post(hub, v2).status_code == 201
    assert len(parse_chain(sent[-1][1])) == 2
    chain = hub.client.get("/api/v1/trust/roots", headers=hub.as_("viewer")).json()["roots"]
    assert [d["version"] for d in chain] == [1, 2]
    assert hub.client.get("/api/v1/trust/root", headers=hub.as_("viewer")).json()["version"] == 2

    old_signed = publisher.bundle("1.1.0")
    r = hub.client.post(
        "/api/v1/uploads",
        content=(old_signed / "manifest.json").read_bytes(),
        headers={**hub.as_("operator"), "Content-Type": "application/json"},
    )
    assert r.status_code == 422 and "not trusted" in r.text, r.text
    quality = {"passed": True, "failures": []}
    seal_folder(
        old_signed, new_release, model="glm-tiny", version="1.1.0", profile="cpu-x86-int4", quality=quality
    )
    _publish(hub, old_signed)  # signed again by the new release key: accepted

    with hub.ctx.db.session() as s:
        actions = [(a.action, a.target) for a in s.query(AuditEntry).order_by(AuditEntry.id)]
    assert ("trust.root", "root/1") in actions and ("trust.root", "root/2") in actions


def test_desired_states_are_signed_again_near_expiry_and_after_a_fleet_key_change(
    hub: Any, publisher: Any, tmp_path: Path
) -> None:
    from cloud_hub.desired import publish_desired

    _publish(hub, publisher.bundle("1.0.0"))
    sent: list[tuple[str, bytes]] = []

    def publish(topic: str, payload: bytes, qos: int, retain: bool) -> None:
        sent.append((topic, payload))

    old = hub.ctx.fleet
    with hub.ctx.db.session() as s:
        for name in ("box-a", "box-b"):
            s.add(Device(id=name, profile="cpu-x86-int4"))
        s.flush()
        for name in ("box-a", "box-b"):
            publish_desired(s, s.get(Device, name), "glm-tiny", "1.0.0", 7, publish, fleet=old)
    assert len(sent) == 2
    with hub.ctx.db.session() as s:  # fresh and signed by the current key: nothing to do
        assert refresh_desired(s, publish, old, now=time.time()) == 0
        assert refresh_desired(s, publish, old, now=time.time() + old.ttl_s * 0.6) == 2  # past half-life
    new = FleetKey(Ed25519PrivateKey.generate())
    with hub.ctx.db.session() as s:
        assert refresh_desired(s, publish, new, now=time.time()) == 2
    with hub.ctx.db.session() as s:
        assert refresh_desired(s, publish, new, now=time.time()) == 0
        d = s.get(Device, "box-a")
        assert d.desired_key_id == new.key_id and d.desired_rollout_id == 7
    topic, payload = sent[-2]
    assert topic == desired_topic("box-a")
    trusted = {new.key_id: new.private.public_key()}
    desired = check_desired(payload, trusted, device_id="box-a", accepted=None, now=time.time())
    assert (desired.version, desired.rollout_id) == ("1.0.0", 7)
    assert json.loads(payload)["signature"]["key_id"] == new.key_id
