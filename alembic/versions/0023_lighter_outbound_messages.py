"""lighter outbound messages: a forwarded event writes its message row in the delivery's
own statement, and each of the row's five index entries was paid by every delivery with a
destination. Two go:

- the unique index on `webhook_id`: an id is now unique by construction, not by an index
  checked on every insert: 'msg_', 16 hex digits of its own sequence (outbound_webhook_ids)
  and 20 hex digits of a random UUID (74 random bits: the UUID's version and variant bits
  fall in those 20 digits), 36 hex digits where the ids before had 32, so a new id can equal
  no earlier one. Nothing reads a message by its webhook_id.
- `(destination, id)` and `(destination, status, created_at)` become one
  `(destination, status, id)`: a destination's messages of one status newest first, its
  backlog and dead-letter counts (index only), its oldest pending message (the lowest id),
  its dead letters to replay; all of a destination's messages newest first is the three
  statuses' ranges merged (app/outbound/queries.py).

On a scratch copy of the table (100,000 rows, one message an INSERT, EXPLAIN (ANALYZE,
WAL), 2,000 inserts a side alternating, a CHECKPOINT every 1,000): execution median 109-117
-> 97-98 us, WAL median 847 -> 679 bytes (docs/benchmark.md).

Revision ID: 0023
Revises: 0022
Create Date: 2026-12-06 03:45:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0023"
down_revision: str | None = "0022"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NUMBERED = (
    "'msg_' || lpad(to_hex(nextval('outbound_webhook_ids')), 16, '0')"
    " || substr(replace(gen_random_uuid()::text, '-', ''), 1, 20)"
)
ORDERED = (
    "'msg_' || lpad(to_hex((extract(epoch FROM clock_timestamp()) * 1000000)::bigint), 14, '0')"
    " || substr(replace(gen_random_uuid()::text, '-', ''), 1, 18)"
)


def upgrade() -> None:
    op.execute("CREATE SEQUENCE outbound_webhook_ids AS bigint")
    op.execute(f"ALTER TABLE outbound_messages ALTER COLUMN webhook_id SET DEFAULT {NUMBERED}")
    op.drop_constraint("uq_outbound_messages_webhook_id", "outbound_messages", type_="unique")
    op.create_index(
        "ix_outbound_messages_destination_status_id",
        "outbound_messages",
        ["destination", "status", "id"],
    )
    op.drop_index("ix_outbound_messages_destination_id", table_name="outbound_messages")
    op.drop_index(
        "ix_outbound_messages_destination_status_created_at", table_name="outbound_messages"
    )


def downgrade() -> None:
    op.create_index(
        "ix_outbound_messages_destination_status_created_at",
        "outbound_messages",
        ["destination", "status", "created_at"],
    )
    op.create_index(
        "ix_outbound_messages_destination_id", "outbound_messages", ["destination", "id"]
    )
    op.drop_index("ix_outbound_messages_destination_status_id", table_name="outbound_messages")
    op.create_unique_constraint(
        "uq_outbound_messages_webhook_id", "outbound_messages", ["webhook_id"]
    )
    op.execute(f"ALTER TABLE outbound_messages ALTER COLUMN webhook_id SET DEFAULT {ORDERED}")
    op.execute("DROP SEQUENCE outbound_webhook_ids")
