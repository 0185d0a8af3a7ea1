"""the rows written since the search indexer's mark found by a BRIN index on updated_at,
not a b-tree on (updated_at, id): a new mailbox or subscription enters no b-tree for the
indexer. Rows are appended, and updated_at is each write's transaction start, so a block
range's updated_at spans a short time: a search's rows since the mark, and the indexer's
walk, read the few ranges written since (the indexer summarises each full range as it
walks, search_index.SUMMARIZE; autosummarize is the fallback). An insert into a range not
yet summarised writes nothing to the index. Measured (EXPLAIN (ANALYZE, WAL) per delivery,
docs/benchmark.md): a new mailbox.created 2 WAL records fewer (of 33), a 1,000-mailbox
prewarmup about 1,100 fewer (of 14,000).

Revision ID: 0027
Revises: 0026
Create Date: 2026-12-06 10:00:00

"""

from collections.abc import Sequence

from alembic import op

revision: str = "0027"
down_revision: str | None = "0026"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("mailboxes", "subscriptions")


def upgrade() -> None:
    for table in TABLES:
        op.create_index(
            f"ix_{table}_updated_at",
            table,
            ["updated_at"],
            postgresql_using="brin",
            postgresql_with={"pages_per_range": 16, "autosummarize": "on"},
        )
        op.drop_index(f"ix_{table}_updated_at_id", table_name=table)


def downgrade() -> None:
    for table in TABLES:
        op.create_index(f"ix_{table}_updated_at_id", table, ["updated_at", "id"])
        op.drop_index(f"ix_{table}_updated_at", table_name=table)
