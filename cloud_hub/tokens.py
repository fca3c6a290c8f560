"""API tokens as an admin manages them, over the API or with ``edgectl hub token``.

``create`` and ``revoke`` add the change and its audit row to the caller's transaction, so both
commit or neither does; ``listing`` never shows a secret. The last active admin token cannot be
revoked (nobody could manage tokens over the API any more): ``revoke`` is the one place that
says so, for the API and ``edgectl hub token revoke`` alike. (:mod:`cloud_hub.auth` makes,
hashes and checks the secrets.)
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from cloud_hub import audit
from cloud_hub.auth import Role, create_token, revoke_token
from cloud_hub.models import ApiToken
from edgeglm.errors import ConflictError
from edgeglm.hub_api import NewTokenView, TokenRole, TokenView

__all__ = ["create", "listing", "revoke", "view"]


def view(t: ApiToken) -> TokenView:
    return TokenView(
        name=t.name,
        role=TokenRole(t.role),
        prefix=t.prefix,
        created_at=t.created_at,
        created_by=t.created_by,
        last_used_at=t.last_used_at,
        revoked=t.revoked_at is not None,
    )


def listing(s: Session) -> list[TokenView]:
    return [view(t) for t in s.scalars(select(ApiToken).order_by(ApiToken.name))]


def create(s: Session, name: str, role: TokenRole, actor: str) -> NewTokenView:
    """A new token of ``role``, made by ``actor``; the answer holds its secret (this once)."""
    row, secret = create_token(s, name, Role[role.value], actor)
    audit.record(s, actor, "token.create", f"token/{row.name}", after={"role": row.role})
    return NewTokenView(**dict(view(row)), token=secret)


def revoke(s: Session, name: str, actor: str) -> TokenView:
    """Token ``name`` refused from now on (revoking it again changes nothing but the audit log);
    never the last active admin token."""
    # The active admin rows, locked (PostgreSQL) so that two admins revoking each other at once
    # cannot both pass: the second waits, then counts again.
    admins = s.scalars(
        select(ApiToken.name)
        .where(ApiToken.role == Role.admin.name, ApiToken.revoked_at.is_(None))
        .with_for_update()
    ).all()
    if list(admins) == [name]:
        raise ConflictError(
            f"token {name}",
            "is the last active admin token: revoking it would leave nobody to manage tokens",
            hint="Create another admin token first (edgectl hub token create NAME --role admin).",
        )
    row = revoke_token(s, name)
    audit.record(s, actor, "token.revoke", f"token/{row.name}", {"revoked": False}, {"revoked": True})
    return view(row)
