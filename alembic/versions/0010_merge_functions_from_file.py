"""the merge rules' SQL functions from their one source, app/recording/merge_functions.sql;
a cancelled subscription keeps the latest period known (period_wins)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05 15:00:00

0009 wrote the functions inside itself, and a released migration cannot be edited. From
here on they live in app/recording/merge_functions.sql; a change to that file needs a new
migration like this one, naming the file's new SHA-256 (tests/test_migrations.py checks
that the newest one does). This one applies the file only while it is the file it was
written for: a later version may need columns a later migration adds, and that migration
applies it.
"""

from collections.abc import Sequence

from alembic import op
from app.recording.merge import apply_functions

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MERGE_FUNCTIONS_SHA256 = "e220e448057149a769bc6a55373ed02e78b2b646a9e1206697b9310ea1e6aab8"

# 0009's lifecycle_wins, for a downgrade (period_wins did not exist then).
LIFECYCLE_WINS_0009 = """
CREATE OR REPLACE FUNCTION lifecycle_wins(old subscriptions, new subscriptions)
RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN old.lifecycle_version IS NULL THEN true
        WHEN coalesce(old.subscription_status = 'CANCELLED', false)
            <> coalesce(new.subscription_status = 'CANCELLED', false)
            THEN coalesce(new.subscription_status = 'CANCELLED', false)
        WHEN old.period_end <> new.period_end THEN new.period_end > old.period_end
        WHEN old.period_end = new.period_end
            AND lifecycle_rank(old.subscription_status)
                <> lifecycle_rank(new.subscription_status)
            THEN lifecycle_rank(new.subscription_status)
                > lifecycle_rank(old.subscription_status)
        ELSE new.lifecycle_version COLLATE "C" > old.lifecycle_version COLLATE "C"
    END
$$"""


def upgrade() -> None:
    apply_functions(op.execute, MERGE_FUNCTIONS_SHA256)


def downgrade() -> None:
    op.execute(LIFECYCLE_WINS_0009)
    op.execute("DROP FUNCTION IF EXISTS period_wins(subscriptions, subscriptions)")
