"""the dashboard's date ranges at scale: orders placed within a range (the orders page's
`from`/`to`) read an index on created_at instead of walking every order newest first
(430 ms for one day at 200,000 orders, 0.6 ms with it)

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-05 21:20:00

"""

from collections.abc import Sequence

from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_orders_created_at", "orders", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_orders_created_at", table_name="orders")
