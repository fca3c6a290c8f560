"""API tokens and roles: who may call what.

A token is ``egh_`` + 32 random bytes (base64url). The hub stores only its SHA-256 (a token has
256 bits of entropy, so a fast hash is enough and lookups are one indexed equality) and its first
12 characters, to recognise it in listings. The secret is shown once, when it is created.

    viewer    read everything
    operator  viewer + deploy, pause / resume / abort / rollback, pin / unpin / label, publish
    admin     operator + tokens, and releases with a failed quality gate (--force)
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from enum import IntEnum

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from cloud_hub.models import ApiToken, utcnow
from edgeglm.contracts import TOKEN_NAME_PATTERN
from edgeglm.errors import AccessError, ConflictError, NotFoundError, PermissionDenied, UsageError

__all__ = ["Principal", "Role", "authenticate", "create_token", "hash_token", "require", "revoke_token"]

_PREFIX = "egh_"
_TOKEN = re.compile(r"^egh_[A-Za-z0-9_-]{43}$")
_NAME = re.compile(f"^{TOKEN_NAME_PATTERN}$")


class Role(IntEnum):
    viewer = 1
    operator = 2
    admin = 3

    @classmethod
    def parse(cls, value: str) -> Role:
        try:
            return cls[value]
        except KeyError:
            raise UsageError("role", f"{value!r} is not one of viewer, operator, admin") from None


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's name is the actor recorded in the audit log."""

    name: str
    role: Role


def hash_token(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_token(session: Session, name: str, role: Role, created_by: str) -> tuple[ApiToken, str]:
    """A new token row and its secret (the only time the secret exists outside the caller)."""
    if not _NAME.match(name):
        raise UsageError("token name", f"{name[:80]!r}: letters, digits and ._@- only, up to 128")
    if session.scalar(select(ApiToken).where(ApiToken.name == name)) is not None:
        raise ConflictError(f"token {name}", "exists already", hint="Pick another name or revoke it first.")
    secret = _PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(
        name=name, role=role.name, token_hash=hash_token(secret), prefix=secret[:12], created_by=created_by
    )
    session.add(row)
    session.flush()
    return row, secret


def revoke_token(session: Session, name: str) -> ApiToken:
    row = session.scalar(select(ApiToken).where(ApiToken.name == name))
    if row is None:
        raise NotFoundError(f"token {name}", "does not exist")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    return row


def authenticate(session: Session, secret: str | None) -> Principal:
    """The principal of a bearer token, or :class:`AccessError` (never says which part was wrong)."""
    if not secret or not _TOKEN.match(secret):
        raise AccessError("API token", "missing or malformed")
    row = session.scalar(select(ApiToken).where(ApiToken.token_hash == hash_token(secret)))
    if row is None or row.revoked_at is not None:
        raise AccessError("API token", "not valid")
    now = utcnow()
    if row.last_used_at is None or (now - row.last_used_at).total_seconds() > 60:
        session.execute(update(ApiToken).where(ApiToken.id == row.id).values(last_used_at=now))
    return Principal(row.name, Role[row.role])


def require(principal: Principal, role: Role, action: str) -> None:
    if principal.role < role:
        raise PermissionDenied(
            action, f"needs role {role.name}; token {principal.name!r} has {principal.role.name}"
        )
