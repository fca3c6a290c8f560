"""A hub with realistic state for the schemathesis run (``test_hub_schema.py``), and fresh objects
for the calls that use one up.

Seeded through the hub's own API where it has one (releases, the rollout, the root of trust, the
open upload), and in the database where it has none (devices, which register over MQTT):

    releases   glm-tiny 1.0.0 (what the boxes run) and 1.1.0 (the rollout's target), cpu-x86-int4
    upload     glm-tiny 2.0.0, begun and never finished: one piece sent, the rest missing
    devices    box-1..box-3, labelled site=plant-7 and line=N, running glm-tiny 1.0.0
    rollout    glm-tiny@1.1.0 to site=plant-7 (no controller runs: it stays where the API puts it)
    trust      root version 1, naming the publisher's key for releases and the hub's fleet key
    audit      every one of the above

``Seeded.fresh(kind)`` makes what a state-changing call consumes (a token to revoke, a complete
upload to commit, a running or paused rollout, the next root version) and answers the
schemathesis ``Case`` arguments that call it.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select, update

from cloud_hub.models import Device, DeviceDeployment
from edgeglm.bundle import load_manifest
from edgeglm.bundle_files import FolderSource
from edgeglm.trust_root import root_body, sign_root

MODEL = "glm-tiny"
PROFILE = "cpu-x86-int4"
RUNNING, TARGET, OPEN = "1.0.0", "1.1.0", "2.0.0"
DEVICES = ("box-1", "box-2", "box-3")
SELECTOR = {"site": "plant-7"}


def _ok(r: Any, *codes: int) -> Any:
    assert r.status_code in (codes or (200, 201)), f"seeding: {r.request.method} {r.request.url}: {r.text}"
    return r.json()


@dataclass
class Seeded:
    """What the hub holds after :func:`seed`, and how to make fresh objects on it."""

    hub: Any  # conftest.Hub: client, ctx, tokens
    publisher: Any  # conftest.Publisher
    root_key: Ed25519PrivateKey
    rollout_id: int
    open_upload: str
    open_piece: tuple[str, bytes]  # one piece of the open upload, and its bytes
    committed_upload: str
    _n: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def post(self, path: str, role: str = "operator", **kw: Any) -> Any:
        return self.hub.client.post(path, headers=self.hub.as_(role), **kw)

    # ----------------------------------------------------------------- what one call uses up
    def fresh(self, kind: str) -> dict[str, Any]:
        """The ``Case`` arguments of a call that succeeds on a new object of ``kind``."""
        n = next(self._n)
        if kind == "token":  # DELETE /tokens/{name}
            name = f"spent-{n}"
            _ok(self.post("/api/v1/tokens", "admin", json={"name": name, "role": "viewer"}))
            return {"path_parameters": {"name": name}}
        if kind == "token-name":  # POST /tokens
            return {"body": {"name": f"new-{n}", "role": "operator"}, "media_type": "application/json"}
        if kind == "complete-upload":  # POST /uploads/{id}/commit
            return {"path_parameters": {"upload_id": self.upload(f"3.0.{n}", seed=1000 + n)}}
        if kind == "deploy":  # POST /rollouts, for real
            self.clear_rollouts()
            return {
                "body": {"release": f"{MODEL}@{TARGET}", "selector": SELECTOR},
                "media_type": "application/json",
            }
        if kind in ("pause", "abort", "resume"):  # POST /rollouts/{id}/{action}
            rid = self.new_rollout()
            if kind == "resume":
                _ok(self.post(f"/api/v1/rollouts/{rid}/pause"))
            return {"path_parameters": {"rollout_id": rid, "action": kind}}
        if kind == "root":  # POST /trust/roots
            with self.hub.ctx.db.session() as s:
                from cloud_hub import trust

                latest = trust.latest_root(s)
            return {
                "body": self.root(1 if latest is None else latest.version + 1),
                "media_type": "application/json",
            }
        raise AssertionError(f"no fresh {kind}")

    def upload(self, version: str, *, seed: int, send: int | None = None) -> str:
        """A new bundle ``version`` begun over the API with ``send`` of its pieces (all when None)."""
        folder = self.publisher.bundle(version, seed=seed, size=3_000)
        began = _ok(self.post("/api/v1/uploads", content=(folder / "manifest.json").read_bytes()), 201)
        manifest, _ = load_manifest(folder, None)
        source = FolderSource.of(folder, manifest)
        for pid, _size in began["missing"][:send]:
            _ok(self.post_piece(began["upload_id"], pid, source.read(pid)))
        return str(began["upload_id"])

    def post_piece(self, upload_id: str, pid: str, data: bytes) -> Any:
        return self.hub.client.put(
            f"/api/v1/uploads/{upload_id}/pieces/{pid}", content=data, headers=self.hub.as_("operator")
        )

    def clear_rollouts(self) -> None:
        """No device in an active rollout and none pinned (fuzzed calls pin them): room for a new one."""
        with self.hub.ctx.db.session() as s:
            for (rid,) in s.execute(
                select(DeviceDeployment.rollout_id).where(DeviceDeployment.active).distinct()
            ):
                _ok(self.post(f"/api/v1/rollouts/{rid}/abort"))
            s.execute(update(Device).values(pinned_version=None))

    def new_rollout(self) -> int:
        self.clear_rollouts()
        body = {"release": f"{MODEL}@{TARGET}", "selector": SELECTOR}
        return int(_ok(self.post("/api/v1/rollouts", json=body), 201)["id"])

    def root(self, version: int) -> bytes:
        fleet = self.hub.ctx.fleet.private.public_key()
        body = root_body(
            version,
            root=[self.root_key.public_key()],
            release=[self.publisher.key.public_key()],
            fleet=[fleet],
            expires_at=time.time() + 3600,
        )
        return sign_root(body, [self.root_key])


def seed(hub: Any, publisher: Any) -> Seeded:
    """Fill ``hub`` (the conftest ``hub`` fixture, its publisher trusted) as the module docstring says."""
    with hub.ctx.db.session() as s:
        for i, device in enumerate(DEVICES, 1):
            s.add(
                Device(
                    id=device,
                    profile=PROFILE,
                    labels={**SELECTOR, "line": str(i)},
                    online=i != 3,
                    current_model=MODEL,
                    current_version=RUNNING,
                )
            )
    seeded = Seeded(hub, publisher, Ed25519PrivateKey.generate(), 0, "", ("", b""), "")
    _ok(seeded.post("/api/v1/trust/roots", "admin", content=seeded.root(1)), 201)
    seeded.committed_upload = seeded.upload(RUNNING, seed=1)
    _ok(seeded.post(f"/api/v1/uploads/{seeded.committed_upload}/commit"))
    target = seeded.upload(TARGET, seed=2)
    _ok(seeded.post(f"/api/v1/uploads/{target}/commit"))
    seeded.rollout_id = seeded.new_rollout()
    seeded.open_upload = seeded.upload(OPEN, seed=3, send=0)
    status = _ok(hub.client.get(f"/api/v1/uploads/{seeded.open_upload}", headers=hub.as_("operator")))
    assert len(status["missing"]) >= 2, "the open upload must never be complete"
    folder = next(publisher.root.glob(f"{MODEL}-{OPEN}-*"))
    manifest, _ = load_manifest(folder, None)
    pid = status["missing"][0][0]
    seeded.open_piece = (pid, FolderSource.of(folder, manifest).read(pid))
    return seeded
