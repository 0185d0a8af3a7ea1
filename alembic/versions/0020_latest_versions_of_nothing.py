"""latest_versions of two empty objects is {} (it was NULL: a mailbox.updated naming no
field we know failed on field_versions' NOT NULL and was answered 500)

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-05 22:40:00
"""

from collections.abc import Sequence

from alembic import op
from app.recording.merge import apply_functions

revision: str = "0020"
down_revision: str | None = "0019"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MERGE_FUNCTIONS_SHA256 = "a72eab7806dc893f8977eb437557a7c04176e007ff7ccaba2b7bffed9cd613bd"

# The function as 0009 and 0010 left it, for a downgrade.
LATEST_VERSIONS_0010 = """
CREATE OR REPLACE FUNCTION latest_versions(old jsonb, new jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT jsonb_object_agg(key, version) FROM (
        SELECT key, max(value COLLATE "C") AS version
        FROM (SELECT * FROM jsonb_each_text(old) UNION ALL SELECT * FROM jsonb_each_text(new))
            AS edits
        GROUP BY key) AS latest
$$"""


def upgrade() -> None:
    apply_functions(op.execute, MERGE_FUNCTIONS_SHA256)


def downgrade() -> None:
    op.execute(LATEST_VERSIONS_0010)
