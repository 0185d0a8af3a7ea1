"""the failed-domains view's orders that failed as a whole (no domain named): a partial
index holding only failed orders with an order-level reason, with the columns the view
shows, so its half of the view reads that index alone. It walked every failed order's heap
row (6,060 at 200,000 orders, scattered over the table) and looked for domains of each:
21,500 buffers, 60 ms warm and 280 ms on the loaded box, for a list that is nearly always
empty. An order failed as a whole always has a reason: merge.DERIVE_ORDER fails an order
without domains only for its failure_reason (an order's domains are never deleted).

Revision ID: 0025
Revises: 0024
Create Date: 2026-12-06 04:10:00

"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0025"
down_revision: str | None = "0024"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FAILED_WHOLE = "status = 'failed' AND failure_reason IS NOT NULL"
SHOWN = ["order_id", "status", "kind", "user_id", "user_email", "failure_reason"]


def upgrade() -> None:
    op.create_index(
        "ix_orders_failed_whole_updated_at",
        "orders",
        ["updated_at"],
        postgresql_where=sa.text(FAILED_WHOLE),
        postgresql_include=SHOWN,
    )


def downgrade() -> None:
    op.drop_index("ix_orders_failed_whole_updated_at", table_name="orders")
