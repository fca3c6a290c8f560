"""The hub's HTTP API on a real database (SQLite and PostgreSQL): registry, roles, audit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text

from cloud_hub.models import ApiToken, AuditEntry, Device
from edgeglm.bundle import load_manifest
from edgeglm.bundle_files import FolderSource
from tests.hub_storage import rot

pytestmark = pytest.mark.integration


def _begin(hub: Any, folder: Path, role: str = "operator", **params: Any) -> Any:
    raw = (folder / "manifest.json").read_bytes()
    return hub.client.post(
        "/api/v1/uploads",
        content=raw,
        params=params,
        headers={**hub.as_(role), "Content-Type": "application/json"},
    )


def _send(hub: Any, folder: Path, upload: dict[str, Any], limit: int | None = None) -> int:
    manifest, _ = load_manifest(folder, None)
    source = FolderSource.of(folder, manifest)
    sent = 0
    for pid, _size in upload["missing"][:limit]:
        r = hub.client.put(
            f"/api/v1/uploads/{upload['upload_id']}/pieces/{pid}",
            content=source.read(pid),
            headers=hub.as_("operator"),
        )
        assert r.status_code == 200, r.text
        sent += 1
    return sent


def _publish(hub: Any, folder: Path) -> dict[str, Any]:
    r = _begin(hub, folder)
    assert r.status_code == 201, r.text
    _send(hub, folder, r.json())
    c = hub.client.post(f"/api/v1/uploads/{r.json()['upload_id']}/commit", headers=hub.as_("operator"))
    assert c.status_code == 200, c.text
    return c.json()


def _audit(hub: Any) -> list[AuditEntry]:
    with hub.ctx.db.session() as s:
        return list(s.scalars(select(AuditEntry).order_by(AuditEntry.id)))


def test_migrations_build_every_table_and_the_audit_log_is_append_only(hub_db_url: str) -> None:
    from cloud_hub.db import head_revision, migrate, open_db

    head = head_revision()
    assert migrate(hub_db_url) == (head, head)  # a second run changes nothing
    db = open_db(hub_db_url)
    try:
        tables = set(db.tables())
        for table in [
            "models",
            "releases",
            "bundles",
            "chunks",
            "uploads",
            "devices",
            "rollouts",
            "rollout_waves",
            "device_deployments",
            "audit_log",
            "api_tokens",
            "leases",
        ]:
            assert table in tables
        with db.session() as s:
            s.add(AuditEntry(actor="t", action="x.y", target="t/1", trace_id="abc"))
        for statement in ("UPDATE audit_log SET actor = 'someone else'", "DELETE FROM audit_log"):
            with pytest.raises(Exception, match="append-only"), db.session() as s:
                s.execute(text(statement))
        with db.session() as s:
            assert s.scalar(select(AuditEntry.actor)) == "t"
    finally:
        db.dispose()


def test_a_database_behind_the_code_is_refused_with_a_hint(tmp_path: Path) -> None:
    from cloud_hub.db import open_db
    from edgeglm.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        open_db(f"sqlite:///{tmp_path / 'empty.db'}")
    assert "edgectl hub migrate" in err.value.hint


def test_publish_registers_a_release_and_every_write_has_its_audit_row(hub: Any, publisher: Any) -> None:
    folder = publisher.bundle("1.0.0")
    r = _begin(hub, folder, **{})
    body = r.json()
    assert r.status_code == 201, r.text
    assert body["state"] == "open"
    manifest, _ = load_manifest(folder, None)
    assert len(body["missing"]) == len(manifest.piece_ids()) > 5
    done = hub.client.post(f"/api/v1/uploads/{body['upload_id']}/commit", headers=hub.as_("operator"))
    assert done.status_code == 409 and "still missing" in done.json()["error"]["why"]

    _send(hub, folder, body)
    c = hub.client.post(
        f"/api/v1/uploads/{body['upload_id']}/commit",
        headers={**hub.as_("operator"), "X-Trace-Id": "trace-42"},
    )
    assert c.status_code == 200, c.text
    assert c.headers["X-Trace-Id"] == "trace-42"
    assert c.json()["bundle"]["quality_passed"] is True

    listed = hub.client.get("/api/v1/releases", headers=hub.as_("viewer")).json()
    assert [(x["model"], x["version"], x["profiles"]) for x in listed] == [
        ("glm-tiny", "1.0.0", ["cpu-x86-int4"])
    ]
    raw = hub.client.get(
        "/api/v1/releases/glm-tiny/1.0.0/bundles/cpu-x86-int4/manifest", headers=hub.as_("viewer")
    ).content
    assert raw == (folder / "manifest.json").read_bytes()  # stored verbatim: the signature still checks
    for pid in manifest.piece_ids():
        assert hub.ctx.store.has(pid)

    entries = _audit(hub)
    assert [e.action for e in entries] == ["upload.begin", "release.publish"]
    publish = entries[-1]
    assert (publish.actor, publish.target, publish.trace_id) == (
        "operator-token",
        "release/glm-tiny@1.0.0/cpu-x86-int4",
        "trace-42",
    )
    assert publish.after["quality_passed"] is True

    again = _begin(hub, folder)  # the same manifest again: nothing to do, nothing written
    assert again.status_code == 201 and again.json()["state"] == "committed" and again.json()["missing"] == []
    assert len(_audit(hub)) == 2


def test_publishing_again_repairs_a_piece_the_store_lost(hub: Any, publisher: Any) -> None:
    """A stored piece rots; reading it removes it (the store verifies). Publishing the same bundle
    again sends only that piece; the release itself does not change."""
    from edgeglm.errors import IntegrityError

    folder = publisher.bundle("1.0.0")
    first = _begin(hub, folder).json()
    _send(hub, folder, first)
    assert hub.client.post(
        f"/api/v1/uploads/{first['upload_id']}/commit", headers=hub.as_("operator")
    ).is_success
    manifest, _ = load_manifest(folder, None)
    pid = sorted(manifest.piece_ids())[0]
    rot(hub.ctx.store, pid)  # the folder store on SQLite, the database store on PostgreSQL
    with pytest.raises(IntegrityError):
        hub.ctx.store.get(pid)
    assert not hub.ctx.store.has(pid)

    repair = _begin(hub, folder).json()
    assert repair["state"] == "open" and [m[0] for m in repair["missing"]] == [pid]
    assert _send(hub, folder, repair) > 0
    done = hub.client.post(f"/api/v1/uploads/{repair['upload_id']}/commit", headers=hub.as_("operator"))
    assert done.status_code == 200, done.text
    assert hub.ctx.store.get(pid) == FolderSource.of(folder, manifest).read(pid)
    assert [e.action for e in _audit(hub)] == [
        "upload.begin",
        "release.publish",
        "upload.repair",
        "release.repair",
    ]
    listed = hub.client.get("/api/v1/releases", headers=hub.as_("viewer")).json()
    assert len(listed) == 1 and listed[0]["version"] == "1.0.0"


def test_an_interrupted_publish_resumes_with_only_the_missing_pieces(hub: Any, publisher: Any) -> None:
    folder = publisher.bundle("1.1.0", size=400_000)
    first = _begin(hub, folder).json()
    total = len(first["missing"])
    _send(hub, folder, first, limit=total // 2)
    second = _begin(hub, folder).json()
    assert second["upload_id"] == first["upload_id"]
    assert len(second["missing"]) == total - total // 2
    _send(hub, folder, second)
    assert (
        hub.client.post(
            f"/api/v1/uploads/{first['upload_id']}/commit", headers=hub.as_("operator")
        ).status_code
        == 200
    )


def test_a_new_version_sends_only_the_pieces_the_hub_lacks(hub: Any, publisher: Any) -> None:
    one = publisher.bundle("2.0.0", seed=1)
    _publish(hub, one)
    two = publisher.bundle("2.0.1", seed=1)  # same files, new version: every piece is held already
    r = _begin(hub, two).json()
    assert r["missing"] == [] and r["state"] == "open"
    assert (
        hub.client.post(f"/api/v1/uploads/{r['upload_id']}/commit", headers=hub.as_("operator")).status_code
        == 200
    )


@pytest.mark.parametrize(
    ("case", "status", "needle"),
    [
        ("wrong bytes", 422, "hash to"),
        ("piece of another bundle", 404, "not part of upload"),
        ("oversized body", 413, "limit"),
    ],
)
def test_bad_pieces_are_refused_and_lose_nothing(
    hub: Any, publisher: Any, case: str, status: int, needle: str
) -> None:
    folder = publisher.bundle("3.0.0")
    up = _begin(hub, folder).json()
    pid, size = up["missing"][0]
    url = f"/api/v1/uploads/{up['upload_id']}/pieces/{pid}"
    if case == "wrong bytes":
        r = hub.client.put(url, content=b"x" * size, headers=hub.as_("operator"))
    elif case == "piece of another bundle":
        r = hub.client.put(
            f"/api/v1/uploads/{up['upload_id']}/pieces/{'ab' * 32}", content=b"x", headers=hub.as_("operator")
        )
    else:
        hub.ctx.max_piece_bytes = 1000
        r = hub.client.put(url, content=b"x" * 5000, headers=hub.as_("operator"))
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["why"]
    assert not hub.ctx.store.has(pid)
    hub.ctx.max_piece_bytes = 64 << 20
    _send(hub, folder, _begin(hub, folder).json())  # the upload itself is intact
    assert (
        hub.client.post(f"/api/v1/uploads/{up['upload_id']}/commit", headers=hub.as_("operator")).status_code
        == 200
    )


def test_untrusted_tampered_and_conflicting_manifests_are_refused(
    hub: Any, publisher: Any, tmp_path: Path
) -> None:
    from edgeglm.bundle_files import seal_folder
    from edgeglm.keys import create_keypair, load_private_key

    other, _, _ = create_keypair(tmp_path / "other", "stranger")
    stranger = publisher.bundle("4.0.0", seed=4)
    seal_folder(
        stranger,
        load_private_key(other),
        model="glm-tiny",
        version="4.0.0",
        profile="cpu-x86-int4",
        quality={"passed": True},
    )
    r = _begin(hub, stranger)
    assert r.status_code == 422 and r.json()["error"]["type"] == "SignatureError"

    tampered = publisher.bundle("4.0.1", seed=5)
    raw = (tampered / "manifest.json").read_text().replace('"4.0.1"', '"4.0.2"')
    r = hub.client.post(
        "/api/v1/uploads", content=raw, headers={**hub.as_("operator"), "Content-Type": "application/json"}
    )
    assert r.status_code == 422 and "does not match" in r.json()["error"]["why"]

    r = hub.client.post("/api/v1/uploads", content=b'{"model": ', headers=hub.as_("operator"))
    assert r.status_code == 422 and r.json()["error"]["type"] == "IntegrityError"

    _publish(hub, publisher.bundle("4.1.0", seed=6))
    r = _begin(hub, publisher.bundle("4.1.0", seed=7))  # same version, other content
    assert r.status_code == 409 and "never changes" in r.json()["error"]["why"]
    assert [e.action for e in _audit(hub)] == ["upload.begin", "release.publish"]


def test_a_failed_quality_gate_needs_force_and_force_needs_admin(hub: Any, publisher: Any) -> None:
    bad = publisher.bundle("5.0.0", passed=False)
    r = _begin(hub, bad)
    assert r.status_code == 422 and "quality gate" in r.json()["error"]["why"]
    assert "greedy_prefix_agreement" in r.json()["error"]["why"]
    unvalidated = publisher.bundle("5.0.1", passed=None)
    assert "no quality report" in _begin(hub, unvalidated).json()["error"]["why"]

    assert _begin(hub, bad, force="true").status_code == 403  # operator
    r = _begin(hub, bad, role="admin", force="true")
    assert r.status_code == 201
    _send(hub, bad, r.json())
    c = hub.client.post(f"/api/v1/uploads/{r.json()['upload_id']}/commit", headers=hub.as_("admin"))
    assert c.json()["bundle"]["forced"] is True and c.json()["bundle"]["quality_passed"] is False
    assert _audit(hub)[-1].after["forced"] is True


@pytest.mark.parametrize(
    ("method", "path", "body", "needs"),
    [
        ("GET", "/api/v1/releases", None, "viewer"),
        ("GET", "/api/v1/devices", None, "viewer"),
        ("GET", "/api/v1/audit", None, "viewer"),
        ("POST", "/api/v1/uploads", b"{}", "operator"),
        ("PUT", "/api/v1/devices/box-1/pin", {"version": "1.0.0"}, "operator"),
        ("DELETE", "/api/v1/devices/box-1/pin", None, "operator"),
        ("PATCH", "/api/v1/devices/box-1/labels", {"set": {"site": "p7"}}, "operator"),
        ("GET", "/api/v1/tokens", None, "admin"),
        ("POST", "/api/v1/tokens", {"name": "x", "role": "viewer"}, "admin"),
    ],
)
def test_roles_are_enforced_per_route(hub: Any, method: str, path: str, body: Any, needs: str) -> None:
    with hub.ctx.db.session() as s:
        s.add(Device(id="box-1", profile="cpu-x86-int4"))
    order = ["viewer", "operator", "admin"]
    kwargs: dict[str, Any] = {"content": body} if isinstance(body, bytes) else {"json": body} if body else {}
    assert hub.client.request(method, path, **kwargs).status_code == 401
    assert (
        hub.client.request(
            method, path, headers={"Authorization": "Bearer egh_" + "x" * 43}, **kwargs
        ).status_code
        == 401
    )
    for role in order:
        r = hub.client.request(method, path, headers=hub.as_(role), **kwargs)
        if order.index(role) < order.index(needs):
            assert r.status_code == 403, (role, r.text)
            assert r.json()["error"]["type"] == "PermissionDenied"
        else:
            assert r.status_code not in (401, 403), (role, r.text)


def test_tokens_are_stored_hashed_and_revocation_is_immediate(hub: Any) -> None:
    r = hub.client.post("/api/v1/tokens", json={"name": "ci-bot", "role": "viewer"}, headers=hub.as_("admin"))
    assert r.status_code == 201
    secret = r.json()["token"]
    with hub.ctx.db.session() as s:
        row = s.scalar(select(ApiToken).where(ApiToken.name == "ci-bot"))
        assert row is not None and secret not in (row.token_hash, row.prefix) and len(row.token_hash) == 64
    listed = hub.client.get("/api/v1/tokens", headers=hub.as_("admin")).text
    assert secret not in listed
    bearer = {"Authorization": f"Bearer {secret}"}
    assert hub.client.get("/api/v1/whoami", headers=bearer).json() == {"name": "ci-bot", "role": "viewer"}
    assert hub.client.delete("/api/v1/tokens/ci-bot", headers=hub.as_("admin")).status_code == 200
    assert hub.client.get("/api/v1/whoami", headers=bearer).status_code == 401
    assert [e.action for e in _audit(hub)] == ["token.create", "token.revoke"]


def test_pin_unpin_and_labels_are_audited_with_before_and_after(hub: Any) -> None:
    from cloud_hub.models import Model, Release

    with hub.ctx.db.session() as s:
        s.add_all([Device(id="box-1", profile="cpu-x86-int4"), Device(id="box-2", profile="cpu-x86-int4")])
        s.add(model := Model(name="glm-tiny"))
        s.flush()  # a pin names a published version: 1.2.3 is one (rows only: no audit entry)
        s.add(Release(model_id=model.id, version="1.2.3", major=1, minor=2, patch=3, created_by="test"))
    op = hub.as_("operator")
    assert (
        hub.client.put("/api/v1/devices/box-1/pin", json={"version": "1.2.3"}, headers=op).json()[
            "pinned_version"
        ]
        == "1.2.3"
    )
    assert (
        hub.client.put("/api/v1/devices/box-1/pin", json={"version": "latest"}, headers=op).status_code == 422
    )
    assert hub.client.delete("/api/v1/devices/box-1/pin", headers=op).json()["pinned_version"] is None
    r = hub.client.patch(
        "/api/v1/devices/box-2/labels", json={"set": {"site": "plant-7", "line": "3"}}, headers=op
    )
    assert r.json()["labels"] == {"site": "plant-7", "line": "3"}
    r = hub.client.patch("/api/v1/devices/box-2/labels", json={"remove": ["line"]}, headers=op)
    assert r.json()["labels"] == {"site": "plant-7"}
    assert (
        hub.client.patch("/api/v1/devices/box-2/labels", json={"set": {"id": "x"}}, headers=op).status_code
        == 400
    )
    assert (
        hub.client.put("/api/v1/devices/nobody/pin", json={"version": "1.0.0"}, headers=op).status_code == 404
    )

    sel = hub.client.get(
        "/api/v1/devices", params={"selector": "site=plant-7"}, headers=hub.as_("viewer")
    ).json()
    assert [d["id"] for d in sel] == ["box-2"]
    entries = _audit(hub)
    assert [(e.action, e.target) for e in entries] == [
        ("device.pin", "device/box-1"),
        ("device.unpin", "device/box-1"),
        ("device.label", "device/box-2"),
        ("device.label", "device/box-2"),
    ]
    assert (entries[0].before, entries[0].after) == ({"pinned": None}, {"pinned": "1.2.3"})
    assert entries[3].before == {"labels": {"site": "plant-7", "line": "3"}}
    listed = hub.client.get(
        "/api/v1/audit", params={"target": "device/box-2"}, headers=hub.as_("viewer")
    ).json()
    assert len(listed) == 2 and all(e["actor"] == "operator-token" for e in listed)
    with hub.ctx.db.session() as s:  # refused writes left no audit row behind
        assert s.scalar(select(func.count()).select_from(AuditEntry)) == 4


def _error_view(r: Any, status: int, kind: str) -> dict[str, Any]:
    """The answer is the documented ErrorView, with ``status`` and error ``kind``, traced."""
    from edgeglm.hub_api import ErrorView

    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    error = ErrorView.model_validate(r.json()).error
    assert set(r.json()) == {"error"}
    assert error.type == kind and error.what and error.why and error.hint
    assert error.trace_id == r.headers["X-Trace-Id"]
    assert "--help" not in error.hint, "the command line's hint means nothing to an HTTP caller"
    return r.json()["error"]


def test_every_error_path_answers_the_one_error_shape(hub: Any) -> None:
    """Unknown paths, wrong methods, bodies that do not parse or validate, parameters the domain
    refuses, the guard's refusals and a bug: one shape (no FastAPI ``{"detail": ...}``)."""
    from cloud_hub.api import HTTP_HINT

    admin = hub.as_("admin")
    missing = _error_view(hub.client.get("/no/such/path"), 404, "NotFoundError")
    assert missing["what"] == "GET /no/such/path"
    assert "/openapi.json" in missing["hint"]
    _error_view(hub.client.get("/api/v1/no-such-route"), 401, "AccessError")  # the token comes first
    _error_view(hub.client.get("/api/v1/no-such-route", headers=admin), 404, "NotFoundError")

    wrong = hub.client.post("/healthz")
    assert _error_view(wrong, 405, "UsageError")["why"] == "this route takes GET"
    assert wrong.headers["Allow"] == "GET"
    wrong = hub.client.delete("/api/v1/devices", headers=admin)
    _error_view(wrong, 405, "UsageError")
    assert wrong.headers["Allow"] == "GET"

    json = {**admin, "Content-Type": "application/json"}
    broken = hub.client.post("/api/v1/rollouts", content=b'{"release": ', headers=json)
    error = _error_view(broken, 422, "UsageError")
    assert (error["what"], error["hint"]) == ("request body", HTTP_HINT)
    assert error["why"].startswith("is not valid JSON")
    invalid = hub.client.put("/api/v1/devices/box-1/pin", json={"version": 5}, headers=admin)
    assert _error_view(invalid, 422, "UsageError")["what"] == "body.version"
    selector = hub.client.get("/api/v1/devices", params={"selector": "no-equals"}, headers=admin)
    assert _error_view(selector, 400, "UsageError")["hint"] == HTTP_HINT  # the domain's UsageError
    too_big = hub.client.post("/api/v1/rollouts", content=b"x" * (65 * 1024), headers=json)
    _error_view(too_big, 413, "UsageError")  # the guard's refusal

    def boom() -> None:
        raise RuntimeError("a bug")

    from fastapi.testclient import TestClient

    hub.client.app.add_api_route("/boom", boom)
    answer = TestClient(hub.client.app, raise_server_exceptions=False).get(
        "/boom", headers={"X-Trace-Id": "trace-me-1"}
    )
    bug = _error_view(answer, 500, "EdgeError")
    assert bug["trace_id"] == "trace-me-1" and "trace-me-1" in bug["hint"]
    assert "a bug" not in answer.text  # the log has it, not the caller
