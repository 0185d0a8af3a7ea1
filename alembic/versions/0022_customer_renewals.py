"""a customer's renewals in the queue's order: (user_id, renews at, id) and
(lower(user_email), renews at, id), so the renewals of one customer (by userId, or by email
in any case) are one index range in the order a page shows them. The queue's index
(renews at, id) walked every subscription ending before the customer's 51st to find them:
18,000 rows for 51 (122 ms) at 200,000 subscriptions, the whole table (430 ms) for a
customer with none at a risk; the email, with no index on lower(user_email), read the whole
table for the page and again for its sums.

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-06 00:30:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0022"
down_revision: str | None = "0021"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RENEWS_AT = "(coalesce(expiry_date, 'epoch'::timestamptz))"


def upgrade() -> None:
    op.execute(
        "CREATE INDEX ix_subscriptions_user_id_renews_at"
        f" ON subscriptions (user_id, {RENEWS_AT}, id)"
    )
    op.execute(
        "CREATE INDEX ix_subscriptions_user_email_renews_at"
        f" ON subscriptions ((lower(user_email)), {RENEWS_AT}, id)"
    )


def downgrade() -> None:
    op.drop_index("ix_subscriptions_user_email_renews_at", table_name="subscriptions")
    op.drop_index("ix_subscriptions_user_id_renews_at", table_name="subscriptions")
