"""the detail pages' events by ID from three indexes where there were four, none of them
with a jsonb path a mailbox.created must build twice

Every execution of a delivery opens each index of events, builds its predicate and, for a
row that enters, its key expressions anew: a jsonb path is a few thousand instructions to
build and run (issue 31; callgrind of the mailbox.created statement, docs/benchmark.md).

- (orderId, id) and (subscriptionId, id) lose their `IS NOT NULL` predicates: an event
  without the ID enters with a NULL key, which no read asks for (the ID is evaluated once,
  not twice);
- (data.mailboxDetails.mailboxId, id) and (data.mailboxId, id) become one, on the mailbox
  an event is about (data.mailboxId, else data.mailboxDetails.mailboxId, as the service
  reads it), holding only events without a subscriptionId (mailbox.updated, the warmup
  events): a mailbox.created always names its subscription, and the mailbox page finds it
  among that subscription's events, through (subscriptionId, id).

Locks: the new indexes are built beside the old ones under a SHARE lock on events (reads
go on, deliveries wait), then the old ones dropped under an ACCESS EXCLUSIVE lock held
from there to the commit, a moment. On 1,000,000 events (load 7) the three builds took
2.4, 1.6 and 0.6 s, `alembic upgrade` 8.8 s in all and the downgrade 8.7 s. Not
CONCURRENTLY: the migrations run in one transaction, as every index migration here does.

`created_xid`'s default on the tables the read API pages through becomes txid_current():
the same 64-bit value (epoch and xid) as pg_current_xact_id()::text::bigint, without the
xid8's text output and bigint input for each row written (10,900 instructions a
mailbox.created, three rows). A catalog change: ACCESS EXCLUSIVE for a moment, no rewrite
(existing rows keep their value), whatever the table's size.

Revision ID: 0030
Revises: 0029
Create Date: 2026-12-06 17:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0030"
down_revision: str | None = "0029"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# As app.models has them, frozen here: the queries use the indexes only while they match.
ORDER = "(payload #>> '{data,orderId}')"
SUBSCRIPTION = "(payload #>> '{data,subscriptionId}')"
MAILBOX = "coalesce(payload #>> '{data,mailboxId}', payload #>> '{data,mailboxDetails,mailboxId}')"
# 0008's: one index a path, each where the path is present
BEFORE = {
    "order": "(payload #>> '{data,orderId}')",
    "subscription": "(payload #>> '{data,subscriptionId}')",
    "mailbox": "(payload #>> '{data,mailboxDetails,mailboxId}')",
    "updated_mailbox": "(payload #>> '{data,mailboxId}')",
}
# the tables whose rows have a created_xid (models.Listed)
LISTED = (
    "credential_reads",
    "events",
    "mailboxes",
    "orders",
    "rejected_deliveries",
    "subscriptions",
)
XID_BEFORE = "pg_current_xact_id()::text::bigint"


def set_xid_default(default: str) -> None:
    for table in LISTED:
        op.execute(f"ALTER TABLE {table} ALTER COLUMN created_xid SET DEFAULT {default}")


def upgrade() -> None:
    set_xid_default("txid_current()")
    # built beside the old ones first, so the ACCESS EXCLUSIVE lock that dropping them
    # takes is held only from the drops to the commit
    replaced = {
        "order": f"{ORDER}, id",
        "subscription": f"{SUBSCRIPTION}, id",
        "mailbox": f"({MAILBOX}), id) WHERE ({SUBSCRIPTION} IS NULL",
    }
    for name, columns in replaced.items():
        op.execute(f"CREATE INDEX ix_events_about_{name}_0030 ON events ({columns})")
    for name in BEFORE:
        op.execute(f"DROP INDEX ix_events_about_{name}")
    for name in replaced:
        op.execute(f"ALTER INDEX ix_events_about_{name}_0030 RENAME TO ix_events_about_{name}")


def downgrade() -> None:
    set_xid_default(XID_BEFORE)
    for name, expression in BEFORE.items():
        op.execute(
            f"CREATE INDEX ix_events_about_{name}_0008 ON events ({expression}, id)"
            f" WHERE {expression} IS NOT NULL"
        )
    for name in ("order", "subscription", "mailbox"):
        op.execute(f"DROP INDEX ix_events_about_{name}")
    for name in BEFORE:
        op.execute(f"ALTER INDEX ix_events_about_{name}_0008 RENAME TO ix_events_about_{name}")
