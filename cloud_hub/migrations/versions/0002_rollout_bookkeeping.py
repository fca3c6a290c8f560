"""Rollout bookkeeping: per-device start / resolve times, last step, row version; gate samples, baseline.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 06:17:12
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("device_deployments", schema=None) as batch_op:
        batch_op.add_column(sa.Column("last_step", sa.String(length=32), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("started_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("row_version", sa.Integer(), nullable=False, server_default="1"))
    with op.batch_alter_table("rollouts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("min_samples", sa.Integer(), nullable=False, server_default="3"))
        batch_op.add_column(sa.Column("baseline", sa.JSON(), nullable=False, server_default="{}"))


def downgrade() -> None:
    with op.batch_alter_table("rollouts", schema=None) as batch_op:
        batch_op.drop_column("baseline")
        batch_op.drop_column("min_samples")
    with op.batch_alter_table("device_deployments", schema=None) as batch_op:
        batch_op.drop_column("row_version")
        batch_op.drop_column("resolved_at")
        batch_op.drop_column("started_at")
        batch_op.drop_column("last_step")
