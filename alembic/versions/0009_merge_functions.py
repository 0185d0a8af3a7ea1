"""the merge rules' SQL as functions: each policy written once, where a reader can check it

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04 23:00:00

app/recording/merge.py declares which policy each column follows; the policies that are more than a
coalesce are these functions. All are plain SQL, IMMUTABLE, so PostgreSQL inlines them into
the upserts (the plan is what the written-out expressions gave). `old` is the stored row,
`new` the event's (EXCLUDED in an upsert).
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FUNCTIONS = {
    "lifecycle_rank(state text) RETURNS integer": """
        -- within one period, the further state wins
        SELECT array_position(ARRAY['ACTIVE','RENEWING','PAST_DUE','EXPIRED','CANCELLED'], state)
    """,
    "domain_rank(state text) RETURNS integer": """
        SELECT array_position(ARRAY['ACTIVE','RENEWAL_FAILED','GRACE_PERIOD','EXPIRED','FAILED'],
            state)
    """,
    "lifecycle_wins(old subscriptions, new subscriptions) RETURNS boolean": """
        -- subscription.*: does the event (new) beat what is stored (old)?
        SELECT CASE
            WHEN old.lifecycle_version IS NULL THEN true  -- no lifecycle event stored yet
            -- CANCELLED is final: only another CANCELLED replaces it
            WHEN coalesce(old.subscription_status = 'CANCELLED', false)
                <> coalesce(new.subscription_status = 'CANCELLED', false)
                THEN coalesce(new.subscription_status = 'CANCELLED', false)
            -- a later period wins
            WHEN old.period_end <> new.period_end THEN new.period_end > old.period_end
            -- within one period, the further state
            WHEN old.period_end = new.period_end
                AND lifecycle_rank(old.subscription_status)
                    <> lifecycle_rank(new.subscription_status)
                THEN lifecycle_rank(new.subscription_status)
                    > lifecycle_rank(old.subscription_status)
            -- when either has no period, or both say the same: the later event
            ELSE new.lifecycle_version COLLATE "C" > old.lifecycle_version COLLATE "C"
        END
    """,
    "domain_wins(old domains, new domains) RETURNS boolean": """
        -- domain.*: the lifecycle's rule with the expiry date, and no final state
        SELECT CASE
            WHEN old.version IS NULL THEN true
            WHEN old.expiry_date <> new.expiry_date THEN new.expiry_date > old.expiry_date
            WHEN old.expiry_date = new.expiry_date
                AND domain_rank(old.status) <> domain_rank(new.status)
                THEN domain_rank(new.status) > domain_rank(old.status)
            ELSE new.version COLLATE "C" > old.version COLLATE "C"
        END
    """,
    "winner_first(wins boolean, new anyelement, old anyelement) RETURNS anyelement": """
        -- the winner's value; what the winner leaves out, the other's
        SELECT CASE WHEN wins THEN coalesce(new, old) ELSE coalesce(old, new) END
    """,
    "unless_edited(versions jsonb, field text, new anyelement, old anyelement)"
    " RETURNS anyelement": """
        -- mailbox snapshots: the snapshot's value, but a field an edit has set keeps it
        SELECT CASE WHEN versions ? field THEN old ELSE coalesce(new, old) END
    """,
    "edit_wins(old jsonb, new jsonb, field text) RETURNS boolean": """
        -- mailbox edits: the later edit of a field (its version in field_versions) wins
        SELECT (new ->> field) COLLATE "C" > coalesce(old ->> field, '') COLLATE "C"
    """,
    "latest_versions(old jsonb, new jsonb) RETURNS jsonb": """
        -- field_versions: per field, the greatest edit version seen
        SELECT jsonb_object_agg(key, version) FROM (
            SELECT key, max(value COLLATE "C") AS version
            FROM (SELECT * FROM jsonb_each_text(old) UNION ALL SELECT * FROM jsonb_each_text(new))
                AS edits
            GROUP BY key) AS latest
    """,
}


def upgrade() -> None:
    for signature, body in FUNCTIONS.items():
        op.execute(
            f"CREATE FUNCTION {signature} LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $${body}$$"
        )


def downgrade() -> None:
    for signature in reversed(FUNCTIONS):
        op.execute(f"DROP FUNCTION {signature.split(' RETURNS ')[0]}")
