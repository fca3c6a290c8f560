"""The fleet's root of trust (edgeglm.trust_root): every root version the hub was given; and what
each device's desired state was last signed with, so the hub can sign it again before it expires
or after the fleet key is rotated.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 15:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "trust_roots",
        sa.Column("version", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("document", sa.Text(), nullable=False),
        sa.Column("added_by", sa.String(128), nullable=False),
        sa.Column("added_at", sa.DateTime(timezone=True), nullable=False),
    )
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.add_column(sa.Column("desired_rollout_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("desired_signed_at", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("desired_key_id", sa.String(16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_column("desired_key_id")
        batch_op.drop_column("desired_signed_at")
        batch_op.drop_column("desired_rollout_id")
    op.drop_table("trust_roots")
