"""The dashboard's session cookie and CSRF tokens (cloud_hub.ui.session): a cookie is good only as
made, with the fleet key it was made with, before its expiry, for a token row that still exists
unrevoked; CSRF and plan tokens are bound to their session."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_hub.auth import hash_token
from cloud_hub.models import ApiToken
from cloud_hub.ui.session import SessionKey, Ticket, cookie_header
from edgeglm.errors import AccessError

NOW = 1_800_000_000.0
SECRET = "egh_" + "A" * 43


def _token(row_id: int = 7) -> ApiToken:
    return ApiToken(
        id=row_id,
        name="ops",
        role="operator",
        token_hash=hash_token(SECRET),
        prefix=SECRET[:12],
        created_by="test",
    )


@pytest.fixture(scope="module")
def key() -> SessionKey:
    return SessionKey(Ed25519PrivateKey.generate(), lifetime_s=3600)


def test_a_cookie_names_its_token_row_and_never_the_token(key: SessionKey) -> None:
    cookie = key.issue(_token(), now=NOW)
    ticket = key.check(cookie, now=NOW + 10)
    assert (ticket.token_id, ticket.issued, ticket.expires) == (7, int(NOW), int(NOW) + 3600)
    assert ticket.token_hash16 == hash_token(SECRET)[:16]
    assert SECRET not in cookie and SECRET[4:20] not in cookie
    assert key.issue(_token(), now=NOW) != cookie  # a fresh session id each sign-in


@pytest.mark.parametrize(
    "forge",
    [
        lambda c: c.replace("s1:7:", "s1:8:"),  # another token row on this MAC
        lambda c: ":".join([*c.split(":")[:5], str(int(c.split(":")[5]) + 10**6), c.split(":")[6]]),  # longer
        lambda c: ":".join([*c.split(":")[:4], "0" + c.split(":")[4], *c.split(":")[5:]]),  # respelled
        lambda c: c[:-1] + ("A" if c[-1] != "A" else "B"),  # a flipped MAC character
        lambda c: c.rpartition(":")[0],  # no MAC
        lambda c: "",
        lambda c: c + "\n",
    ],
)
def test_a_tampered_cookie_is_refused(key: SessionKey, forge) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(AccessError):
        key.check(forge(key.issue(_token(), now=NOW)), now=NOW)


def test_a_cookie_of_another_fleet_key_is_refused(key: SessionKey) -> None:
    other = SessionKey(Ed25519PrivateKey.generate())
    with pytest.raises(AccessError, match="not valid"):
        key.check(other.issue(_token(), now=NOW), now=NOW)


def test_replicas_with_the_same_fleet_key_accept_each_others_cookies() -> None:
    fleet = Ed25519PrivateKey.generate()
    cookie = SessionKey(fleet).issue(_token(), now=NOW)
    assert SessionKey(fleet).check(cookie, now=NOW).token_id == 7


def test_a_cookie_expires_after_its_lifetime(key: SessionKey) -> None:
    cookie = key.issue(_token(), now=NOW)
    key.check(cookie, now=NOW + 3599)
    with pytest.raises(AccessError, match="expired"):
        key.check(cookie, now=NOW + 3600)


def test_csrf_tokens_are_bound_to_their_session(key: SessionKey) -> None:
    a = key.check(key.issue(_token(), now=NOW), now=NOW)
    b = key.check(key.issue(_token(), now=NOW), now=NOW)
    assert key.csrf_ok(a, key.csrf(a))
    assert not key.csrf_ok(a, key.csrf(b))
    assert not key.csrf_ok(a, "")
    assert not key.csrf_ok(a, None)
    nonce = key.login_nonce()
    assert key.login_csrf_ok(nonce, key.login_csrf(nonce))
    assert not key.login_csrf_ok(key.login_nonce(), key.login_csrf(nonce))
    assert not key.login_csrf_ok(None, key.login_csrf(nonce))
    assert key.login_nonce(nonce) == nonce and key.login_nonce("bad nonce") != "bad nonce"


def test_a_plan_token_binds_the_exact_parameters_session_and_time(key: SessionKey) -> None:
    ticket = Ticket(7, "0" * 16, "x" * 22, int(NOW), int(NOW) + 60)
    other = Ticket(7, "0" * 16, "y" * 22, int(NOW), int(NOW) + 60)
    plan = key.plan(ticket, '{"waves": ["5", "100"]}', int(NOW))
    assert key.plan_ok(ticket, '{"waves": ["5", "100"]}', int(NOW), plan, now=NOW + 5)
    assert not key.plan_ok(ticket, '{"waves": ["100"]}', int(NOW), plan, now=NOW + 5)  # changed since
    assert not key.plan_ok(other, '{"waves": ["5", "100"]}', int(NOW), plan, now=NOW + 5)  # another session
    assert not key.plan_ok(ticket, '{"waves": ["5", "100"]}', int(NOW), plan, now=NOW + 3600)  # stale
    assert not key.plan_ok(ticket, '{"waves": ["5", "100"]}', int(NOW), None, now=NOW)  # skipped


def test_the_cookie_is_secure_http_only_strict_and_scoped() -> None:
    header = cookie_header("edgeglm_ui", "v", 60)
    for part in ("Max-Age=60", "Path=/ui", "Secure", "HttpOnly", "SameSite=Strict"):
        assert part in header.split("; ")


def test_resolve_reads_the_row_each_time(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from cloud_hub.db import migrate, open_db
    from cloud_hub.ui.session import resolve

    url = f"sqlite:///{tmp_path / 'hub.db'}"
    migrate(url)
    db = open_db(url)
    key = SessionKey(Ed25519PrivateKey.generate())
    with db.session() as s:
        s.add(_token(1))
    ticket = key.check(key.issue(_token(1), now=NOW), now=NOW)
    with db.session() as s:
        who = resolve(s, ticket)
        assert (who.name, who.role.name) == ("ops", "operator")
        s.get(ApiToken, 1).revoked_at = datetime.now(UTC)  # type: ignore[union-attr]
    with db.session() as s, pytest.raises(AccessError, match="revoked"):
        resolve(s, ticket)
    forged = Ticket(1, "f" * 16, ticket.session_id, ticket.issued, ticket.expires)
    with db.session() as s, pytest.raises(AccessError, match="not valid"):
        resolve(s, forged)
    db.dispose()
