"""The hub under attack, as a real ``edgectl hub serve`` process (issue 22): credentials and body
sizes checked before a body is read, control characters in parameters refused, the last admin
token kept, a failed-gate release deployed only by an admin with force, and an audit log that
no statement rewrites (SQLite and PostgreSQL; on PostgreSQL also as the role the hub serves as)."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from click.testing import CliRunner

from edgectl import root
from tests.integration.conftest import PG_ADMIN, Publisher
from tests.integration.hub_process import start_hub

pytestmark = [pytest.mark.integration, pytest.mark.security]

ROLES = ("viewer", "operator", "admin")


@dataclass
class Served:
    """A hub process on a migrated database, one token per role."""

    proc: subprocess.Popen[bytes]
    url: str
    db_url: str
    tokens: dict[str, str]
    publisher: Publisher

    def as_(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")


def _serve(db_url: str, data: Path, publisher: Publisher, *, serve_url: str | None = None) -> Served:
    from cloud_hub.auth import Role, create_token
    from cloud_hub.db import open_db

    db = open_db(db_url)
    tokens = {}
    with db.session() as s:
        for role in ROLES:
            _, tokens[role] = create_token(s, f"{role}-1", Role[role], "test-setup")
    db.dispose()
    proc, url = start_hub(
        "--db", serve_url or db_url, "--data", str(data), "--trust", str(publisher.public_path)
    )
    return Served(proc, url, db_url, tokens, publisher)


@pytest.fixture
def served(hub_db_url: str, tmp_path: Path, publisher: Publisher) -> Iterator[Served]:
    hub = _serve(hub_db_url, tmp_path / "hub", publisher)
    try:
        yield hub
    finally:
        hub.proc.terminate()
        hub.proc.wait(20)


@pytest.fixture(scope="module")
def sqlite_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One hub on SQLite for the tests where the database plays no part."""
    from cloud_hub.db import migrate
    from edgeglm.keys import create_keypair, load_private_key

    root_dir = tmp_path_factory.mktemp("hub")
    priv, pub, kid = create_keypair(root_dir / "keys", "release")
    publisher = Publisher(root_dir / "bundles", load_private_key(priv), pub, kid)
    url = f"sqlite:///{root_dir / 'hub.db'}"
    migrate(url)
    hub = _serve(url, root_dir / "data", publisher)
    try:
        yield hub
    finally:
        hub.proc.terminate()
        hub.proc.wait(20)


def _exchange(port: int, head: str, body_bytes: int = 0, chunked: bool = False) -> tuple[int, bytes]:
    """Send ``head`` and then up to ``body_bytes`` of body (1 MiB a write, or chunks of it) while
    another thread waits for the answer; answers (status, first bytes of the answer). The sending
    stops when the hub closes the connection."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    answer: list[bytes] = []

    def read() -> None:  # until the hub closes the connection (a refusal says Connection: close)
        data = b""
        try:
            while part := sock.recv(65536):
                data += part
        except OSError as exc:
            data = data or f"recv failed: {exc}".encode()
        answer.append(data)

    reader = threading.Thread(target=read, name="answer-reader")
    reader.start()
    try:
        sock.sendall(head.encode())
        block = b"a" * (1 << 20)
        sent = 0
        while sent < body_bytes and reader.is_alive():
            sock.sendall(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
            sent += len(block)
    except OSError:
        pass  # the hub answered and closed: what a refusal does
    reader.join(30)
    sock.close()
    assert answer and answer[0].startswith(b"HTTP/1.1 "), answer
    return int(answer[0].split()[1]), answer[0]


def _error(answer: bytes) -> dict[str, Any]:
    error: dict[str, Any] = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    return error


# ----------------------------------------------------------------------- finding 2: before the body
def test_an_anonymous_200_mib_body_is_refused_401_before_it_is_read(sqlite_hub: Served) -> None:
    before = sqlite_hub.rss_mib()
    status, answer = _exchange(
        sqlite_hub.port,
        "PATCH /api/v1/devices/x/labels HTTP/1.1\r\nHost: hub\r\nContent-Type: application/json\r\n"
        f"Content-Length: {200 << 20}\r\n\r\n",
        body_bytes=200 << 20,
    )
    assert status == 401, answer
    assert _error(answer)["type"] == "AccessError" and b"x-trace-id" in answer.lower()
    assert sqlite_hub.rss_mib() - before < 20, "the hub read the body it refused"
    with httpx.Client(base_url=sqlite_hub.url) as c:
        r = c.post("/api/v1/rollouts", content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 401, r.text
        r = c.post(
            "/api/v1/rollouts",
            content=b"{not json",
            headers={**sqlite_hub.as_("viewer"), "Content-Type": "application/json"},
        )
        assert r.status_code == 403 and r.json()["error"]["type"] == "PermissionDenied", r.text
        r = c.post("/api/v1/rollouts", content=b"{not json", headers=sqlite_hub.as_("operator"))
        assert r.status_code == 422, r.text  # a caller allowed to send it learns what is wrong


def test_a_body_over_the_routes_limit_is_refused_413_as_declared_or_as_it_streams(
    sqlite_hub: Served,
) -> None:
    bearer = f"Authorization: Bearer {sqlite_hub.tokens['operator']}\r\n"
    before = sqlite_hub.rss_mib()
    status, answer = _exchange(
        sqlite_hub.port,
        f"PATCH /api/v1/devices/x/labels HTTP/1.1\r\nHost: hub\r\n{bearer}"
        f"Content-Type: application/json\r\nContent-Length: {200 << 20}\r\n\r\n",
        body_bytes=200 << 20,
    )
    assert status == 413 and "65536-byte limit" in _error(answer)["why"], answer
    status, answer = _exchange(  # no Content-Length: chunks, stopped once past the limit
        sqlite_hub.port,
        f"PATCH /api/v1/devices/x/labels HTTP/1.1\r\nHost: hub\r\n{bearer}"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
        body_bytes=200 << 20,
        chunked=True,
    )
    assert status == 413 and "streams past" in _error(answer)["why"], answer
    status, answer = _exchange(  # a piece's size is known: the hub wants it declared
        sqlite_hub.port,
        f"PUT /api/v1/uploads/{'0' * 32}/pieces/{'ab' * 32} HTTP/1.1\r\nHost: hub\r\n{bearer}"
        "Transfer-Encoding: chunked\r\n\r\n",
        body_bytes=8 << 20,
        chunked=True,
    )
    assert status == 411, answer
    status, answer = _exchange(
        sqlite_hub.port,
        f"PUT /api/v1/uploads/{'0' * 32}/pieces/{'ab' * 32} HTTP/1.1\r\nHost: hub\r\n{bearer}"
        f"Content-Length: {(64 << 20) + 1}\r\n\r\n",
        body_bytes=64 << 20,
    )
    assert status == 413, answer
    assert sqlite_hub.rss_mib() - before < 20
    assert httpx.get(sqlite_hub.url + "/api/v1/whoami", headers=sqlite_hub.as_("viewer")).status_code == 200


# ----------------------------------------------------------------------- NUL and control characters
def test_control_characters_in_parameters_are_refused_400(served: Served) -> None:
    with httpx.Client(base_url=served.url, headers=served.as_("viewer")) as c:
        assert c.get("/api/v1/audit", params={"actor": "admin-1"}).status_code == 200
        for path, params in [
            ("/api/v1/audit", {"actor": "\x00"}),  # was 503 on PostgreSQL
            ("/api/v1/audit", {"target": "device/a\x00b"}),
            ("/api/v1/audit", {"action": "token.create\n"}),
            ("/api/v1/devices", {"selector": "site=p\x1b7"}),
            ("/api/v1/releases", {"model\x00": "x"}),
            ("/api/v1/devices/box%00-1", None),
            ("/api/v1/rollouts/1%0a", None),
        ]:
            r = c.get(path, params=params)
            assert r.status_code == 400, (path, params, r.text)
            assert (
                r.json()["error"]["type"] == "UsageError" and "control character" in r.json()["error"]["why"]
            )
        assert c.get("/healthz").status_code == 200


# ----------------------------------------------------------------------- the last admin token
def test_the_last_active_admin_token_cannot_be_revoked(served: Served) -> None:
    with httpx.Client(base_url=served.url, headers=served.as_("admin")) as c:
        r = c.delete("/api/v1/tokens/admin-1")
        assert r.status_code == 409, r.text
        assert "last active admin" in r.json()["error"]["why"] and "--role admin" in r.json()["error"]["hint"]
        env = {"EDGEGLM_TOKEN": "", "EDGEGLM_HUB_URL": ""}
        cli = CliRunner().invoke(root, ["hub", "token", "revoke", "admin-1", "--db", served.db_url], env=env)
        assert cli.exit_code == 1 and "last active admin" in cli.output, cli.output
        assert c.get("/api/v1/whoami").status_code == 200  # still valid

        assert c.post("/api/v1/tokens", json={"name": "admin-2", "role": "admin"}).status_code == 201
        assert c.delete("/api/v1/tokens/admin-1").status_code == 200
        assert c.get("/api/v1/whoami").status_code == 401
    cli = CliRunner().invoke(root, ["hub", "token", "revoke", "admin-2", "--db", served.db_url], env=env)
    assert cli.exit_code == 1 and "last active admin" in cli.output, cli.output
    assert (
        CliRunner().invoke(root, ["hub", "token", "revoke", "operator-1", "--db", served.db_url]).exit_code
        == 0
    )


# ----------------------------------------------------------------------- finding 4: gated deploys
def _publish_forced(hub: Served, folder: Path) -> None:
    """An admin publishes a bundle that failed its quality gate, with force."""
    from edgeglm.bundle import load_manifest
    from edgeglm.bundle_files import FolderSource

    with httpx.Client(base_url=hub.url, headers=hub.as_("admin"), timeout=30) as c:
        raw = (folder / "manifest.json").read_bytes()
        up = c.post("/api/v1/uploads", params={"force": "true"}, content=raw).json()
        source = FolderSource.of(folder, load_manifest(folder, None)[0])
        for pid, _size in up["missing"]:
            assert c.put(
                f"/api/v1/uploads/{up['upload_id']}/pieces/{pid}", content=source.read(pid)
            ).is_success
        done = c.post(f"/api/v1/uploads/{up['upload_id']}/commit")
        assert done.status_code == 200 and done.json()["bundle"]["quality_passed"] is False, done.text


def test_a_failed_gate_release_is_deployed_only_by_an_admin_with_force(sqlite_hub: Served) -> None:
    from cloud_hub.db import open_db
    from cloud_hub.models import AuditEntry, Device

    _publish_forced(sqlite_hub, sqlite_hub.publisher.bundle("9.0.0", model="gated", passed=False))
    db = open_db(sqlite_hub.db_url)
    with db.session() as s:
        s.add(Device(id="gated-box-1", profile="cpu-x86-int4", labels={"gate": "t"}))
    body = {"release": "gated@9.0.0", "selector": {"gate": "t"}, "waves": ["100"]}
    with httpx.Client(base_url=sqlite_hub.url) as c:
        dry = c.post("/api/v1/rollouts", json={**body, "dry_run": True}, headers=sqlite_hub.as_("operator"))
        assert dry.status_code == 201 and dry.json()["quality_failed"] == ["cpu-x86-int4"], dry.text

        r = c.post("/api/v1/rollouts", json=body, headers=sqlite_hub.as_("operator"))
        assert r.status_code == 403 and "quality gate" in r.json()["error"]["why"], r.text
        r = c.post("/api/v1/rollouts", json={**body, "force": True}, headers=sqlite_hub.as_("operator"))
        assert r.status_code == 403, r.text
        r = c.post("/api/v1/rollouts", json=body, headers=sqlite_hub.as_("admin"))
        assert r.status_code == 409 and "--force" in r.json()["error"]["hint"], r.text

    env = {"EDGEGLM_TOKEN": sqlite_hub.tokens["admin"], "EDGEGLM_HUB_URL": sqlite_hub.url}
    args = ["deploy", "gated@9.0.0", "--fleet", "gate=t", "--waves", "100", "-o", "json"]
    dry_cli = CliRunner().invoke(root, [*args, "--dry-run", "-o", "table"], env=env)
    assert dry_cli.exit_code == 0 and "quality gate: FAILED for cpu-x86-int4" in dry_cli.output, (
        dry_cli.output
    )
    cli = CliRunner().invoke(root, [*args, "--force"], env=env)
    assert cli.exit_code == 0, cli.output
    rollout = json.loads(cli.output)["id"]
    with db.session() as s:
        entry = s.query(AuditEntry).filter_by(action="rollout.start", target=f"rollout/{rollout}").one()
        assert entry.actor == "admin-1"
        assert entry.after is not None and entry.after["forced"] is True
        assert entry.after["quality_failed"] == ["cpu-x86-int4"]
    db.dispose()


# ----------------------------------------------------------------------- finding 5: the audit log
def test_no_statement_rewrites_the_audit_log(served: Served) -> None:
    import sqlalchemy as sa

    with httpx.Client(base_url=served.url, headers=served.as_("admin")) as c:
        assert c.post("/api/v1/tokens", json={"name": "bot-1", "role": "viewer"}).status_code == 201
    engine = sa.create_engine(served.db_url)
    postgres = engine.dialect.name == "postgresql"
    attacks = [
        "UPDATE audit_log SET actor = 'someone else'",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log"
        if postgres
        else "INSERT OR REPLACE INTO audit_log"
        " (id, at, actor, action, target, trace_id) SELECT id, at, 'someone else', action, target,"
        " trace_id FROM audit_log",
    ]
    if not postgres:
        attacks.append(
            "INSERT INTO audit_log (id, at, actor, action, target, trace_id)"
            " SELECT id, at, 'someone else', action, target, trace_id FROM audit_log WHERE true"
            " ON CONFLICT (id) DO UPDATE SET actor = excluded.actor"
        )
    try:
        for statement in attacks:
            with pytest.raises(sa.exc.DBAPIError, match="append-only"), engine.begin() as conn:
                conn.execute(sa.text(statement))
    finally:
        engine.dispose()
    with httpx.Client(base_url=served.url, headers=served.as_("viewer")) as c:
        entries = c.get("/api/v1/audit").json()
    assert [(e["actor"], e["action"]) for e in entries] == [("admin-1", "token.create")]


@pytest.mark.parametrize("hub_db_url", ["postgresql"], indirect=True)
def test_the_hub_serves_as_a_role_that_cannot_alter_the_audit_log(
    hub_db_url: str, tmp_path: Path, publisher: Publisher
) -> None:
    """``edgectl hub grant-role`` (docs/hub-production.md): the hub works as that role, which
    cannot truncate, change or delete audit rows, nor drop or disable the triggers."""
    role = f"hub_{uuid.uuid4().hex[:10]}"
    admin = psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", autocommit=True)
    admin.execute(f'CREATE ROLE "{role}" LOGIN')
    role_url = hub_db_url.replace("postgres@", f"{role}@", 1)
    hub = None
    try:
        cli = CliRunner().invoke(root, ["hub", "grant-role", role, "--db", hub_db_url])
        assert cli.exit_code == 0, cli.output
        hub = _serve(hub_db_url, tmp_path / "hub", publisher, serve_url=role_url)
        with httpx.Client(base_url=hub.url, headers=hub.as_("admin")) as c:
            assert c.post("/api/v1/tokens", json={"name": "bot-1", "role": "viewer"}).status_code == 201
            assert c.delete("/api/v1/tokens/bot-1").status_code == 200
            assert [e["action"] for e in c.get("/api/v1/audit").json()] == ["token.revoke", "token.create"]
        schema = hub_db_url.rsplit("%3D", 1)[1]
        with psycopg.connect(
            f"host=127.0.0.1 port=5432 user={role} dbname=test options=-csearch_path={schema}",
            autocommit=True,
        ) as conn:
            for statement in [
                "TRUNCATE audit_log",
                "UPDATE audit_log SET actor = 'someone else'",
                "DELETE FROM audit_log",
                "DROP TRIGGER audit_log_no_change ON audit_log",
                "ALTER TABLE audit_log DISABLE TRIGGER ALL",
                "CREATE OR REPLACE FUNCTION audit_log_append_only() RETURNS trigger"
                " LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$",
                "UPDATE alembic_version SET version_num = '0001'",
            ]:
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(statement)
            assert conn.execute("SELECT count(*) FROM audit_log").fetchone() == (2,)
        refused = CliRunner().invoke(root, ["hub", "grant-role", "postgres", "--db", hub_db_url])
        assert refused.exit_code == 2 and "owns the tables" in refused.output, refused.output
        for strong, how in ((f"{role}_su", "SUPERUSER"), (f"{role}_in", "IN ROLE postgres")):
            admin.execute(f'CREATE ROLE "{strong}" LOGIN {how}')
            try:
                refused = CliRunner().invoke(root, ["hub", "grant-role", strong, "--db", hub_db_url])
            finally:
                admin.execute(f'DROP ROLE "{strong}"')
            assert refused.exit_code == 2 and "could still drop" in refused.output, refused.output
    finally:
        if hub is not None:
            hub.proc.terminate()
            hub.proc.wait(20)
        admin.execute(f'DROP OWNED BY "{role}"')
        admin.execute(f'DROP ROLE "{role}"')
        admin.close()


def test_grant_role_is_refused_on_sqlite(tmp_path: Path) -> None:
    from cloud_hub.db import migrate

    url = f"sqlite:///{tmp_path / 'hub.db'}"
    migrate(url)
    cli = CliRunner().invoke(root, ["hub", "grant-role", "hub", "--db", url])
    assert cli.exit_code == 2 and "only PostgreSQL has roles" in cli.output, cli.output


assert PG_ADMIN.startswith("postgresql+psycopg://postgres@")  # test_..._role swaps the user


def test_the_documented_grants_are_what_grant_role_runs() -> None:
    from cloud_hub.db import hub_role_grants

    doc = (Path(__file__).parents[2] / "docs" / "hub-production.md").read_text()
    block = doc.split("```sql", 1)[1].split("```", 1)[0]
    documented = [line.split(";")[0] for line in block.strip().splitlines()]
    assert documented == hub_role_grants("hub", "public")
