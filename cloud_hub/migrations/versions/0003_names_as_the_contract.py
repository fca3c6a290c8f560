"""Model and profile names at most 64 characters, as ``edgeglm.contracts.Name`` says everywhere else.

The wire never carried a longer name, so a release published with one could never be deployed.
Such a row stops the upgrade with a message naming it (it cannot be shortened for the operator:
its manifest is signed with the name); delete or re-publish it under a shorter name, then upgrade.
SQLite does not enforce a VARCHAR length: there the check runs and the tables stay as they are.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06 10:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

NAME_MAX = 64  # edgeglm.contracts.NAME_MAX when this revision was written
_COLUMNS = {
    "models": ("name",),
    "bundles": ("profile",),
    "uploads": ("model", "profile"),
    "devices": ("profile", "current_model", "desired_model"),
}


def _refuse_long_names() -> None:
    bind = op.get_bind()
    found = []
    for table, columns in _COLUMNS.items():
        for column in columns:
            rows = bind.execute(
                sa.text(f"SELECT {column} FROM {table} WHERE length({column}) > :n LIMIT 3"),
                {"n": NAME_MAX},
            ).scalars()
            found += [f"{table}.{column} = {value[:80]!r}..." for value in rows]
    if found:
        raise RuntimeError(
            f"names longer than {NAME_MAX} characters cannot be carried on the wire and block this "
            f"upgrade: {'; '.join(found)}. Delete those rows (or re-publish under a shorter name), "
            "then run the upgrade again."
        )


def upgrade() -> None:
    _refuse_long_names()
    if op.get_bind().dialect.name == "sqlite":
        return
    for table, columns in _COLUMNS.items():
        for column in columns:
            op.alter_column(
                table, column, type_=sa.String(length=NAME_MAX), existing_type=sa.String(length=128)
            )


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        return
    for table, columns in _COLUMNS.items():
        for column in columns:
            op.alter_column(
                table, column, type_=sa.String(length=128), existing_type=sa.String(length=NAME_MAX)
            )
