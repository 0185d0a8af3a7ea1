"""domain registrations and renewal failures: a name may have a row per domainId
(registered again, or first heard of by name alone), so a domain.* event with a new
domainId for a stored name is applied, not refused with a unique violation; a
subscription keeps its own renewal outcomes, so a subscription.renewal.failed is a
renewal_failed risk until a later renewal.success or a later period

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05 16:00:00

"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RENEWAL_COLUMNS = ("renewal_failed_at", "renewal_failed_period_end", "renewal_succeeded_at")


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
    # merge.SUBSCRIPTION_LIFECYCLE; renewal failures heard before this are not known: a
    # replay of the subscription.* events brings them in
    for column in RENEWAL_COLUMNS:
        op.add_column("subscriptions", sa.Column(column, sa.DateTime(timezone=True)))


def downgrade() -> None:
    for column in reversed(RENEWAL_COLUMNS):
        op.drop_column("subscriptions", column)
    op.drop_index("uq_domains_name_without_id", table_name="domains")
    op.drop_index("ix_domains_name", table_name="domains")
    # The old schema holds one row per name: of several, the last written stays.
    op.execute("DELETE FROM domains d USING domains n WHERE n.name = d.name AND n.id > d.id")
    op.create_unique_constraint("uq_domains_name", "domains", ["name"])
