"""order domains by subscription: an order's derived values read them without a scan

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-24 03:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # merge.DERIVE_ORDER sums each subscription's succeeded orders on every order delivery.
    op.create_index("ix_order_domains_subscription_id", "order_domains", ["subscription_id"])


def downgrade() -> None:
    op.drop_index("ix_order_domains_subscription_id", table_name="order_domains")
