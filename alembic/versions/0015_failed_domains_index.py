"""failed domains and incomplete orders: the dashboard's failed-domains view reads order
domains that failed (or once failed: the reason stays when a later success wins) latest
first, by one partial index on their time; its incomplete orders count each order domain's
mailboxes by (order_id, subscription_id) from one index

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-05 18:50:00

"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FAILED = "status = 'failed' OR reason IS NOT NULL"


def upgrade() -> None:
    op.create_index(
        "ix_order_domains_failed_updated_at",
        "order_domains",
        ["updated_at"],
        postgresql_where=sa.text(FAILED),
    )
    op.create_index(
        "ix_mailboxes_order_id_subscription_id", "mailboxes", ["order_id", "subscription_id"]
    )


def downgrade() -> None:
    op.drop_index("ix_mailboxes_order_id_subscription_id", table_name="mailboxes")
    op.drop_index("ix_order_domains_failed_updated_at", table_name="order_domains")
