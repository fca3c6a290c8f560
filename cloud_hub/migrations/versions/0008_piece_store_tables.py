"""The database piece store: pieces and their (piece, base) encodings as content-addressed rows,
so every replica of a hub on one database serves every published bundle (cloud_hub.database_storage).

On PostgreSQL the byte columns are stored EXTERNAL: out of line, never compressed again (pieces
of weights hardly compress, and encodings are zstd already).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-12 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "piece_bytes",
        sa.Column("piece_id", sa.String(64), primary_key=True),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "piece_encodings",
        sa.Column("piece_id", sa.String(64), primary_key=True),
        sa.Column("base_id", sa.String(64), primary_key=True),
        sa.Column("encoding", sa.Integer(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE piece_bytes ALTER COLUMN data SET STORAGE EXTERNAL")
        op.execute("ALTER TABLE piece_encodings ALTER COLUMN payload SET STORAGE EXTERNAL")


def downgrade() -> None:
    op.drop_table("piece_encodings")
    op.drop_table("piece_bytes")
