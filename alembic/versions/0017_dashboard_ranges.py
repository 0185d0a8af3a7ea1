"""the dashboard at scale (1M mailboxes, 5M events, EXPLAIN ANALYZE on the scale bench's
data): orders placed within a range (the orders page's `from`/`to`) read an index on
created_at instead of walking every order newest first (one day: 430 ms, 0.6 ms with it);
the overview's failed signatures of 24 h read a partial index holding only those instead of
every event of the day (151 ms, 0.03 ms); incomplete orders read each order's domains'
outcomes from an index alone (220 ms, 113 ms on the loaded box)

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-05 21:20:00

"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FAILED_SIGNATURE = "signature IN ('invalid', 'stale')"


def upgrade() -> None:
    op.create_index("ix_orders_created_at", "orders", ["created_at"])
    op.create_index(
        "ix_events_failed_signature_at",
        "events",
        ["first_received_at"],
        postgresql_where=sa.text(FAILED_SIGNATURE),
    )
    op.create_index(
        "ix_order_domains_order_id_outcome",
        "order_domains",
        ["order_id"],
        postgresql_include=["subscription_id", "status", "quantity"],
    )


def downgrade() -> None:
    op.drop_index("ix_order_domains_order_id_outcome", table_name="order_domains")
    op.drop_index("ix_events_failed_signature_at", table_name="events")
    op.drop_index("ix_orders_created_at", table_name="orders")
