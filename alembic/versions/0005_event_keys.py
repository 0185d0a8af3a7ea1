"""one key row per eventId: a delivery is recorded and applied in one statement;
ciphertext stored uncompressed

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "event_keys",
        sa.Column("event_id", sa.Text(), primary_key=True),
        sa.Column("content_hash", sa.LargeBinary(), nullable=False),
        sa.Column("conflict", sa.Boolean(), server_default="false", nullable=False),
    )
    op.execute(
        """INSERT INTO event_keys (event_id, content_hash, conflict)
        SELECT event_id, (array_agg(content_hash ORDER BY id))[1], count(*) > 1
        FROM events GROUP BY event_id"""
    )

    # Fernet ciphertext does not compress: storing it as it is saves the attempt (about
    # 10 ms of a 1,000-mailbox delivery).
    for table in ("events", "rejected_deliveries"):
        op.execute(f"ALTER TABLE {table} ALTER COLUMN body_encrypted SET STORAGE EXTERNAL")


def downgrade() -> None:
    for table in ("events", "rejected_deliveries"):
        op.execute(f"ALTER TABLE {table} ALTER COLUMN body_encrypted SET STORAGE EXTENDED")
    op.drop_table("event_keys")
