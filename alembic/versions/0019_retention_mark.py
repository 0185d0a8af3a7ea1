"""retention mark: the lowest id a processed event with a stored body may have, so that
the body retention and the key check behind /readyz start there instead of walking the
events whose bodies retention already deleted (millions once it has run a while)

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-05 22:20:00

"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0019"
down_revision: str | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "retention_marks",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_retention_marks")),
    )
    # Past what an earlier retention deleted already: once, here (a scan of events).
    op.execute(
        "INSERT INTO retention_marks (name, id) SELECT 'events', coalesce(min(id), 0) FROM events"
        " WHERE status = 'processed' AND body_encrypted IS NOT NULL"
    )


def downgrade() -> None:
    op.drop_table("retention_marks")
