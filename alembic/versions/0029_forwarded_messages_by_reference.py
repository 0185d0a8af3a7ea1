"""forwarded messages by reference: a forwarded CMR event's message names its stored event
(`event_id`, the events row's id) instead of holding a copy of its data (`payload` is NULL);
the dispatcher builds the data when it sends, from the event's stored, redacted copy
(app/recording/forwarding.py), so an erasure of that copy reaches what is still to be sent.
Derived events keep their computed `payload`. No foreign key: events rows are never deleted,
and the check would cost every forwarded delivery an index probe of events.

Revision ID: 0029
Revises: 0028
Create Date: 2026-12-06 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0029"
down_revision: str | None = "0028"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("outbound_messages", sa.Column("event_id", sa.BigInteger(), nullable=True))
    op.alter_column("outbound_messages", "payload", nullable=True)
    # NOT VALID, then validated: the scan takes no lock that stops writes
    op.execute(
        "ALTER TABLE outbound_messages ADD CONSTRAINT ck_outbound_messages_data"
        " CHECK (payload IS NOT NULL OR event_id IS NOT NULL) NOT VALID"
    )
    op.execute("ALTER TABLE outbound_messages VALIDATE CONSTRAINT ck_outbound_messages_data")


# Downgrading: a referenced message gets a copy again, its event's stored data without the
# fields the copy hides at its top level (the dispatcher's own build cannot be made in SQL:
# a hidden field deeper in stays as "[REDACTED]", never a credential's value).
COPY_DATA = """
UPDATE outbound_messages m SET payload = jsonb_build_object('eventId', e.event_id,
    'eventTime', to_char(e.event_time AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))
    || coalesce((SELECT jsonb_object_agg(key, value) FROM jsonb_each(e.payload -> 'data')
        WHERE value NOT IN ('null', '"[REDACTED]"')), '{}')
FROM events e WHERE m.payload IS NULL AND e.id = m.event_id
"""


def downgrade() -> None:
    op.execute(COPY_DATA)
    op.drop_constraint(op.f("ck_outbound_messages_data"), "outbound_messages", type_="check")
    op.alter_column("outbound_messages", "payload", nullable=False)
    op.drop_column("outbound_messages", "event_id")
