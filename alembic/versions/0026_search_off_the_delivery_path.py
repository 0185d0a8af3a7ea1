"""search off the delivery path: the trigram indexes of `q` move from mailboxes and
subscriptions to side tables (mailbox_search, subscription_search) kept by the search
indexer (app/operations/search_index.py); the hot tables get (updated_at, id), by which the
indexer and a search find the rows written since the indexer's mark; statistics on the
search expressions keep the planner's estimates the dropped indexes gave. A new mailbox.created
delivery wrote 926 + 878 WAL bytes of trigram entries; (updated_at, id) costs it about
70 bytes per table (docs/benchmark.md).

Revision ID: 0026
Revises: 0025
Create Date: 2026-12-06 08:00:00

"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0026"
down_revision: str | None = "0025"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# As app.models has them, frozen here.
MAILBOX_SEARCH = (
    "coalesce(email, '') || ' ' || coalesce(first_name, '') || ' ' || coalesce(last_name, '')"
    " || ' ' || coalesce(domain, '') || ' ' || mailbox_id"
)
SUBSCRIPTION_SEARCH = (
    "coalesce(domain, '') || ' ' || subscription_id || ' ' || coalesce(user_email, '')"
)
SIDES = (
    ("mailboxes", "mailbox_search", MAILBOX_SEARCH),
    ("subscriptions", "subscription_search", SUBSCRIPTION_SEARCH),
)
# A search's bound on the rows written since the mark: STABLE, so the planner reads it when
# it estimates how many rows that is (a subquery's value it would guess as a third).
MARK_FUNCTION = """CREATE FUNCTION search_mark(source text) RETURNS timestamptz
LANGUAGE sql STABLE AS $$SELECT indexed_before FROM search_marks WHERE name = source$$"""
# As search_index.SAFE_MARK: no row written after the copy has an earlier updated_at.
SAFE_MARK = """SELECT least(now(), min(xact_start)) - interval '1 second' FROM pg_stat_activity
WHERE datname = current_database() AND backend_type = 'client backend'
    AND pid <> pg_backend_pid() AND xact_start IS NOT NULL"""


def upgrade() -> None:
    op.create_table(
        "search_marks",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("indexed_before", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_search_marks")),
    )
    op.execute(MARK_FUNCTION)
    for table, side, expression in SIDES:
        # the table's writers wait from here to the commit: the copy below sees every row
        op.execute(f"LOCK TABLE {table} IN SHARE MODE")
        op.execute(f"INSERT INTO search_marks SELECT '{table}', ({SAFE_MARK})")
        op.create_table(
            side,
            sa.Column("id", sa.BigInteger(), nullable=False),
            sa.Column("text", sa.Text(), nullable=False),
            sa.PrimaryKeyConstraint("id", name=op.f(f"pk_{side}")),
        )
        op.execute(f"INSERT INTO {side} (id, text) SELECT id, {expression} FROM {table}")
        op.execute(f"CREATE INDEX ix_{side}_text ON {side} USING gin (text gin_trgm_ops)")
        op.create_index(f"ix_{table}_updated_at_id", table, ["updated_at", "id"])
        op.drop_index(f"ix_{table}_search", table_name=table)
        # what the index's expression gave the planner: how many rows a `q` keeps
        op.execute(f"CREATE STATISTICS st_{table}_search ON ({expression}) FROM {table}")
        op.execute(f"ANALYZE {side}")
        op.execute(f"ANALYZE {table}")


def downgrade() -> None:
    for table, side, expression in SIDES:
        op.execute(f"DROP STATISTICS st_{table}_search")
        op.execute(
            f"CREATE INDEX ix_{table}_search ON {table} USING gin (({expression}) gin_trgm_ops)"
        )
        op.drop_index(f"ix_{table}_updated_at_id", table_name=table)
        op.drop_table(side)
    op.execute("DROP FUNCTION search_mark(text)")
    op.drop_table("search_marks")
