"""fewer index entries per delivery: a new subscription and a new mailbox no longer enter
indexes whose reads another index (or the primary key's walk) serves as well

Measured (EXPLAIN (ANALYZE, BUFFERS, WAL) of the mailbox.created statement, one sender, and
pgbench of it in turns with 4f460bf; docs/benchmark.md): every index added since 4f460bf
together cost the statement 2,590 of its 7,380 WAL bytes and about 0.15 ms of 0.45 ms; the
trigram search indexes 1,800 bytes of them, each b-tree 70 to 105 bytes. What goes:

- subscriptions (expiry_date): `expiresBefore` reads (renews at, id), whose first column is
  the expiry date where there is one (queries/subscriptions.py adds that condition);
- subscriptions and mailboxes (provider, id) and (source, id): two values each (GOOGLE or
  MICROSOFT; standard or prewarmed), so a page of one walks the primary key and keeps about
  every other row; the index saved nothing a page reads;
- subscriptions (status, id) and events (status, id): indexed only where the status is not
  the usual one (a failed subscription, an ignored event); a page of the usual one walks
  the primary key, nearly every row of which it keeps;
- subscriptions (subscription_status, id): only rows that have one (a lifecycle event's);
  a subscription made by an order has none, and a filter on a status implies it;
- mailboxes (order_id, id) and (order_id, subscription_id): one (order_id, id) that
  includes subscription_id, which serves an order's keyset page and an order domain's
  mailbox count alike (index only).

Revision ID: 0024
Revises: 0023
Create Date: 2026-12-06 04:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0024"
down_revision: str | None = "0023"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_subscriptions_expiry_date", table_name="subscriptions")
    for table in ("subscriptions", "mailboxes"):
        op.drop_index(f"ix_{table}_provider_id", table_name=table)
        op.drop_index(f"ix_{table}_source_id", table_name=table)
    op.drop_index("ix_subscriptions_status_id", table_name="subscriptions")
    op.create_index(
        "ix_subscriptions_status_id",
        "subscriptions",
        ["status", "id"],
        postgresql_where=sa.text("status <> 'active'"),
    )
    op.drop_index("ix_subscriptions_subscription_status_id", table_name="subscriptions")
    op.create_index(
        "ix_subscriptions_subscription_status_id",
        "subscriptions",
        ["subscription_status", "id"],
        postgresql_where=sa.text("subscription_status IS NOT NULL"),
    )
    op.drop_index("ix_events_status_id", table_name="events")
    op.create_index(
        "ix_events_status_id",
        "events",
        ["status", "id"],
        postgresql_where=sa.text("status <> 'processed'"),
    )
    op.drop_index("ix_mailboxes_order_id_subscription_id", table_name="mailboxes")
    op.drop_index("ix_mailboxes_order_id_id", table_name="mailboxes")
    op.create_index(
        "ix_mailboxes_order_id_id",
        "mailboxes",
        ["order_id", "id"],
        postgresql_include=["subscription_id"],
    )


def downgrade() -> None:
    op.drop_index("ix_mailboxes_order_id_id", table_name="mailboxes")
    op.create_index("ix_mailboxes_order_id_id", "mailboxes", ["order_id", "id"])
    op.create_index(
        "ix_mailboxes_order_id_subscription_id", "mailboxes", ["order_id", "subscription_id"]
    )
    op.drop_index("ix_events_status_id", table_name="events")
    op.create_index("ix_events_status_id", "events", ["status", "id"])
    op.drop_index("ix_subscriptions_subscription_status_id", table_name="subscriptions")
    op.create_index(
        "ix_subscriptions_subscription_status_id", "subscriptions", ["subscription_status", "id"]
    )
    op.drop_index("ix_subscriptions_status_id", table_name="subscriptions")
    op.create_index("ix_subscriptions_status_id", "subscriptions", ["status", "id"])
    for table in ("mailboxes", "subscriptions"):
        op.create_index(f"ix_{table}_source_id", table, ["source", "id"])
        op.create_index(f"ix_{table}_provider_id", table, ["provider", "id"])
    op.create_index("ix_subscriptions_expiry_date", "subscriptions", ["expiry_date"])
