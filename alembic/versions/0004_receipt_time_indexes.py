"""receipt-time indexes for the dashboard's last 24 hours

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24 00:20:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_events_first_received_at", "events", ["first_received_at"])
    op.create_index("ix_rejected_deliveries_received_at", "rejected_deliveries", ["received_at"])


def downgrade() -> None:
    op.drop_index("ix_rejected_deliveries_received_at", table_name="rejected_deliveries")
    op.drop_index("ix_events_first_received_at", table_name="events")
