"""search, renewals, detail pages and exports: trigram indexes for `q`, renewals in
their order, events by the IDs they name, exports in the credentials audit

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29 21:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

# As app.models has them, frozen here: the queries use the index only while they match.
MAILBOX_SEARCH = (
    "coalesce(email, '') || ' ' || coalesce(first_name, '') || ' ' || coalesce(last_name, '')"
    " || ' ' || coalesce(domain, '') || ' ' || mailbox_id"
)
SUBSCRIPTION_SEARCH = (
    "coalesce(domain, '') || ' ' || subscription_id || ' ' || coalesce(user_email, '')"
)
# The IDs the dashboard's detail pages find their events by.
EVENT_ABOUT = {
    "order": "{data,orderId}",
    "subscription": "{data,subscriptionId}",
    "mailbox": "{data,mailboxDetails,mailboxId}",
    "updated_mailbox": "{data,mailboxId}",
}

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # pg_trgm is a trusted extension (PostgreSQL 13+): the database's owner may create it.
    op.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    for name, table, expression in (
        ("ix_mailboxes_search", "mailboxes", MAILBOX_SEARCH),
        ("ix_subscriptions_search", "subscriptions", SUBSCRIPTION_SEARCH),
    ):
        op.execute(f"CREATE INDEX {name} ON {table} USING gin (({expression}) gin_trgm_ops)")
    for name, path in EVENT_ABOUT.items():
        expression = f"(payload #>> '{path}')"
        op.execute(
            f"CREATE INDEX ix_events_about_{name} ON events ({expression}, id)"
            f" WHERE {expression} IS NOT NULL"
        )
    op.execute(
        "CREATE INDEX ix_subscriptions_renews_at"
        " ON subscriptions ((coalesce(expiry_date, 'epoch'::timestamptz)), id)"
    )
    op.add_column("credential_reads", sa.Column("export_id", sa.Text(), nullable=True))
    op.create_index(
        "ix_credential_reads_export_id_id",
        "credential_reads",
        ["export_id", "id"],
        postgresql_where=sa.text("export_id IS NOT NULL"),
    )
    op.create_index("ix_orders_updated_at", "orders", ["updated_at"])
    op.create_index("ix_events_last_received_at", "events", ["last_received_at"])
    op.create_index("ix_mailboxes_order_id_id", "mailboxes", ["order_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_subscriptions_renews_at", table_name="subscriptions")
    for name in EVENT_ABOUT:
        op.drop_index(f"ix_events_about_{name}", table_name="events")
    op.drop_index("ix_mailboxes_order_id_id", table_name="mailboxes")
    op.drop_index("ix_events_last_received_at", table_name="events")
    op.drop_index("ix_orders_updated_at", table_name="orders")
    op.drop_index("ix_credential_reads_export_id_id", table_name="credential_reads")
    op.drop_column("credential_reads", "export_id")
    op.drop_index("ix_subscriptions_search", table_name="subscriptions")
    op.drop_index("ix_mailboxes_search", table_name="mailboxes")
