"""domain registrations: a name may have a row per domainId (registered again, or first
heard of by name alone), so a domain.* event with a new domainId for a stored name is
applied, not refused with a unique violation

Revision ID: 0011
Revises: 0009
Create Date: 2026-12-05 16:00:00

Another branch adds 0010 at the same time: whoever merges second sets down_revision to it.
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0011"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # One row per domainId (uq_domains_domain_id stays); one per name only among the rows
    # of events that carried no domainId (merge.DOMAIN_BY_NAME's ON CONFLICT).
    op.drop_constraint("uq_domains_name", "domains", type_="unique")
    op.create_index("ix_domains_name", "domains", ["name"])
    op.create_index(
        "uq_domains_name_without_id",
        "domains",
        ["name"],
        unique=True,
        postgresql_where=sa.text("domain_id IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("uq_domains_name_without_id", table_name="domains")
    op.drop_index("ix_domains_name", table_name="domains")
    # The old schema holds one row per name: of several, the last written stays.
    op.execute("DELETE FROM domains d USING domains n WHERE n.name = d.name AND n.id > d.id")
    op.create_unique_constraint("uq_domains_name", "domains", ["name"])
