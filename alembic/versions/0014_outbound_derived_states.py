"""the last state each derived outbound event was written for (app/outbound/derived.py):
a derived event is written once per change of state, not again on a duplicate or a late
older event

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-05 18:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "outbound_states",
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column(
            "changed_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("topic", "subject", name="pk_outbound_states"),
    )


def downgrade() -> None:
    op.drop_table("outbound_states")
