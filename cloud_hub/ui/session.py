"""The dashboard's sign-in session: a signed cookie that names an API token row, and its CSRF tokens.

A person signs in with an API token; the hub answers a cookie that never holds the token::

    edgeglm_ui = s1:{token row id}:{token hash, 16 hex}:{session id}:{issued}:{expires}:{MAC}
    key = HKDF-SHA256(the fleet key's private bytes, info "edgeglm dashboard session v1")

Every replica holds the same fleet key, so every replica accepts a session any of them made,
without a table of sessions. A session is good while, in this order:

    its MAC matches (else "not valid": forged, altered, or made with another fleet key)
    it has not expired (a bounded lifetime, :data:`SESSION_S` by default, from sign-in)
    its token row exists, is the token it was made for, and is not revoked: the row is read on
        every request, so revoking a token ends its sessions at once; the role is the row's

The cookie is ``Secure; HttpOnly; SameSite=Strict; Path=/ui`` with a ``Max-Age`` of its
lifetime. Every form that changes something carries a synchronizer token bound to the session
(:meth:`SessionKey.csrf`: an HMAC of the session id), checked before the form's fields are used;
the sign-in form, which has no session yet, carries one bound to a short-lived random cookie of
its own (:meth:`SessionKey.login_csrf`). A deploy's confirmation carries :meth:`SessionKey.plan`,
an HMAC of the exact parameters its dry run showed, so a start that skipped the dry run (or
changed a parameter since) is refused. Nothing here logs a cookie or a token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from sqlalchemy.orm import Session

from cloud_hub.auth import Principal, Role
from cloud_hub.models import ApiToken
from edgeglm.errors import AccessError

__all__ = [
    "COOKIE",
    "LOGIN_COOKIE",
    "LOGIN_S",
    "SESSION_S",
    "SessionKey",
    "SignedIn",
    "Ticket",
    "cookie_header",
    "resolve",
]

COOKIE = "edgeglm_ui"
LOGIN_COOKIE = "edgeglm_ui_login"  # the sign-in form's own CSRF nonce, before there is a session
SESSION_S = 8 * 3600
LOGIN_S = 15 * 60
PLAN_S = 15 * 60  # how long a dry run's confirmation stays good
_VERSION = "s1"
_INFO = b"edgeglm dashboard session v1"
_NUMBER = r"(0|[1-9][0-9]{0,11})"
_COOKIE = re.compile(
    rf"^{_VERSION}:{_NUMBER}:([0-9a-f]{{16}}):([A-Za-z0-9_-]{{22}}):{_NUMBER}:{_NUMBER}:([A-Za-z0-9_-]{{43}})$"
)
_NONCE = re.compile(r"^[A-Za-z0-9_-]{22}$")
_SIGN_IN_HINT = "Sign in again with an API token."


def _b64(digest: bytes) -> str:
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


@dataclass(frozen=True)
class Ticket:
    """What a valid cookie says (before the token row is read)."""

    token_id: int
    token_hash16: str
    session_id: str
    issued: int
    expires: int


@dataclass(frozen=True)
class SignedIn:
    """A request's caller: the token's principal (name = the audit actor) and its session."""

    principal: Principal
    ticket: Ticket

    @property
    def name(self) -> str:
        return self.principal.name

    @property
    def role(self) -> Role:
        return self.principal.role


class SessionKey:
    """The HMAC key derived from the fleet key: makes and checks cookies and CSRF tokens."""

    def __init__(self, fleet_private: Ed25519PrivateKey, *, lifetime_s: int = SESSION_S) -> None:
        if lifetime_s <= 0:
            raise ValueError("a session lifetime is positive")
        raw = fleet_private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        self._key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(raw)
        self.lifetime_s = lifetime_s

    def _mac(self, purpose: str, message: str) -> str:
        return _b64(hmac.new(self._key, f"{purpose}\n{message}".encode(), hashlib.sha256).digest())

    # ------------------------------------------------------------------------------ cookie
    def issue(self, token: ApiToken, *, now: float) -> str:
        """A new session's cookie value for ``token`` (a fresh session id each time)."""
        issued = int(now)
        sid = secrets.token_urlsafe(16)
        body = f"{_VERSION}:{token.id}:{token.token_hash[:16]}:{sid}:{issued}:{issued + self.lifetime_s}"
        return f"{body}:{self._mac('session', body)}"

    def check(self, value: str | None, *, now: float) -> Ticket:
        """The ticket of a cookie this key made that has not expired; else :class:`AccessError`."""
        found = _COOKIE.fullmatch(value or "")
        if found is None:
            raise AccessError("dashboard session", "missing or malformed", hint=_SIGN_IN_HINT)
        body = value.rpartition(":")[0]  # type: ignore[union-attr]  # matched, so a str
        if not hmac.compare_digest(found[6], self._mac("session", body)):
            raise AccessError("dashboard session", "not valid", hint=_SIGN_IN_HINT)
        ticket = Ticket(int(found[1]), found[2], found[3], int(found[4]), int(found[5]))
        if ticket.expires <= now:
            raise AccessError(
                "dashboard session", f"expired {now - ticket.expires:.0f} s ago", hint=_SIGN_IN_HINT
            )
        return ticket

    # ------------------------------------------------------------------------ CSRF tokens
    def csrf(self, ticket: Ticket) -> str:
        """The synchronizer token of a session: every POST form of it carries this."""
        return self._mac("csrf", ticket.session_id)

    def csrf_ok(self, ticket: Ticket, given: str | None) -> bool:
        return bool(given) and hmac.compare_digest(str(given), self.csrf(ticket))

    @staticmethod
    def login_nonce(current: str | None = None) -> str:
        """``current`` when it is a well-formed nonce, else a new random one."""
        return current if current and _NONCE.fullmatch(current) else secrets.token_urlsafe(16)

    def login_csrf(self, nonce: str) -> str:
        return self._mac("login", nonce)

    def login_csrf_ok(self, nonce: str | None, given: str | None) -> bool:
        if not nonce or not given or not _NONCE.fullmatch(nonce):
            return False
        return hmac.compare_digest(str(given), self.login_csrf(nonce))

    # -------------------------------------------------------------------- deploy confirmation
    def plan(self, ticket: Ticket, canonical: str, issued: int) -> str:
        """Binds a dry run's exact parameters (``canonical``) to this session and time."""
        return self._mac("plan", f"{ticket.session_id}\n{issued}\n{canonical}")

    def plan_ok(self, ticket: Ticket, canonical: str, issued: int, given: str | None, *, now: float) -> bool:
        if not given or not 0 <= now - issued <= PLAN_S:
            return False
        return hmac.compare_digest(str(given), self.plan(ticket, canonical, issued))


def resolve(s: Session, ticket: Ticket) -> SignedIn:
    """The caller of a valid ticket, from its token row as it is now (revoked: refused at once)."""
    row = s.get(ApiToken, ticket.token_id)
    if row is None or not hmac.compare_digest(row.token_hash[:16], ticket.token_hash16):
        raise AccessError("dashboard session", "not valid", hint=_SIGN_IN_HINT)
    if row.revoked_at is not None:
        raise AccessError("dashboard session", f"its token {row.name!r} is revoked", hint=_SIGN_IN_HINT)
    return SignedIn(Principal(row.name, Role[row.role]), ticket)


def cookie_header(name: str, value: str, max_age: int) -> str:
    """A ``Set-Cookie`` value: Secure, HttpOnly, SameSite=Strict, for /ui only (0: delete it)."""
    return f"{name}={value}; Max-Age={max_age}; Path=/ui; Secure; HttpOnly; SameSite=Strict"
