"""the rows the search indexer may not have copied found by `search_written_at`, set only
when a write changes a searched column (models.SEARCH_COLUMNS), through a BRIN index, in
place of the (updated_at, id) b-trees of 0026. A new mailbox or subscription enters no
b-tree for the indexer (an insert into the block range still filling writes nothing to a
BRIN index; the indexer summarises full ranges as it walks), and an upsert that changes no
indexed column (a further mailbox.created's subscription, DERIVE_ORDER's quantities) can be
a HOT update again, which updated_at in an index had ruled out. Rows are appended and the
time is their transaction's start, so a block range spans a short time: a search's rows
since the mark, and the indexer's walk, read the few ranges written since.

The events' payload (the redacted envelope, JSON) is compressed with lz4 where the server
has it, not pglz: a 1,000-mailbox prewarmup's 420 KB took 4 to 5 ms of the database's CPU
to compress with pglz, about 1 with lz4, for a 6 % larger value (65,705 -> 61,597 bytes).
Rows stored before stay as they are; both read alike.

Existing rows get -infinity (their texts are copied: the indexer's mark is past them),
but those written since the mark, which get their updated_at; writers wait meanwhile.

Revision ID: 0028
Revises: 0027
Create Date: 2026-12-06 10:00:00

"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0028"
down_revision: str | None = "0027"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("mailboxes", "subscriptions")
HAS_LZ4 = "SELECT 'lz4' = ANY(enumvals) FROM pg_settings WHERE name = 'default_toast_compression'"


def upgrade() -> None:
    for table in TABLES:
        # the table's writers wait from here to the commit: no row escapes the copy below
        op.execute(f"LOCK TABLE {table} IN SHARE MODE")
        op.add_column(
            table,
            sa.Column(
                "search_written_at",
                sa.DateTime(timezone=True),
                server_default=sa.text("'-infinity'"),
                nullable=False,
            ),
        )
        op.execute(
            f"UPDATE {table} SET search_written_at = updated_at WHERE updated_at >="
            f" (SELECT indexed_before FROM search_marks WHERE name = '{table}')"
        )
        op.alter_column(table, "search_written_at", server_default=sa.text("now()"))
        op.create_index(
            f"ix_{table}_search_written_at",
            table,
            ["search_written_at"],
            postgresql_using="brin",
            postgresql_with={"pages_per_range": 16, "autosummarize": "on"},
        )
        op.drop_index(f"ix_{table}_updated_at_id", table_name=table)
        # the new column has no statistics: without them the planner takes "written since
        # the mark" for a third of the table and reads all of it for every search (2-3 s at
        # 1M mailboxes) until autovacuum happens to analyze it
        op.execute(f"ANALYZE {table} (search_written_at)")
    if op.get_bind().execute(sa.text(HAS_LZ4)).scalar():
        op.execute("ALTER TABLE events ALTER COLUMN payload SET COMPRESSION lz4")


def downgrade() -> None:
    op.execute("ALTER TABLE events ALTER COLUMN payload SET COMPRESSION DEFAULT")
    for table in TABLES:
        op.create_index(f"ix_{table}_updated_at_id", table, ["updated_at", "id"])
        op.drop_index(f"ix_{table}_search_written_at", table_name=table)
        op.drop_column(table, "search_written_at")
