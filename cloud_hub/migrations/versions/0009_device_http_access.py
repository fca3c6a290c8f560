"""Devices: HTTP access to piece bytes (cloud_hub.device_credentials): an epoch and a revoked flag.

Every device starts at epoch 0, allowed: its tokens are issued with the next desired state the hub
signs (only when the hub has a pieces URL).

Revision ID: 0009
Revises: 0008
Create Date: 2027-01-12 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.add_column(sa.Column("http_epoch", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(
            sa.Column("http_revoked", sa.Boolean(), nullable=False, server_default=sa.text("false"))
        )


def downgrade() -> None:
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_column("http_revoked")
        batch_op.drop_column("http_epoch")
