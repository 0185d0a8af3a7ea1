-- The merge rules' SQL functions: the one source the running database is built from.
-- app/recording/merge.py says which policy each column follows; the policies that are more
-- than a coalesce are these functions. All are plain SQL, IMMUTABLE, so PostgreSQL inlines
-- them into the upserts. `old` is the stored row, `new` the event's (EXCLUDED in an upsert).
--
-- A released migration applied this file as it was then: a change here needs a new
-- migration that applies it again (copy alembic/versions/0010_merge_functions_from_file.py,
-- with the file's new SHA-256); tests/test_migrations.py refuses a change without one.
-- Each statement ends with a line of its own: two dollar signs and a semicolon.

CREATE OR REPLACE FUNCTION lifecycle_rank(state text) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    -- within one period, the further state wins
    SELECT array_position(ARRAY['ACTIVE','RENEWING','PAST_DUE','EXPIRED','CANCELLED'], state)
$$;

CREATE OR REPLACE FUNCTION domain_rank(state text) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT array_position(ARRAY['ACTIVE','RENEWAL_FAILED','GRACE_PERIOD','EXPIRED','FAILED'],
        state)
$$;

CREATE OR REPLACE FUNCTION period_wins(old subscriptions, new subscriptions) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    -- subscription.*, the period (periodStart, periodEnd): does the event (new) beat what
    -- is stored (old)? A cancelled subscription still shows the latest period known.
    SELECT CASE
        WHEN old.lifecycle_version IS NULL THEN true  -- no lifecycle event stored yet
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
$$;

CREATE OR REPLACE FUNCTION lifecycle_wins(old subscriptions, new subscriptions) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    -- subscription.*, the state (status, autoRenew, quantity): the period's rule, except
    -- that CANCELLED is final: only another CANCELLED replaces it
    SELECT CASE
        WHEN old.lifecycle_version IS NOT NULL
            AND coalesce(old.subscription_status = 'CANCELLED', false)
                <> coalesce(new.subscription_status = 'CANCELLED', false)
            THEN coalesce(new.subscription_status = 'CANCELLED', false)
        ELSE period_wins(old, new)
    END
$$;

CREATE OR REPLACE FUNCTION domain_wins(old domains, new domains) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    -- domain.*: the lifecycle's rule with the expiry date, and no final state
    SELECT CASE
        WHEN old.version IS NULL THEN true
        WHEN old.expiry_date <> new.expiry_date THEN new.expiry_date > old.expiry_date
        WHEN old.expiry_date = new.expiry_date
            AND domain_rank(old.status) <> domain_rank(new.status)
            THEN domain_rank(new.status) > domain_rank(old.status)
        ELSE new.version COLLATE "C" > old.version COLLATE "C"
    END
$$;

CREATE OR REPLACE FUNCTION winner_first(wins boolean, new anyelement, old anyelement)
RETURNS anyelement LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    -- the winner's value; what the winner leaves out, the other's
    SELECT CASE WHEN wins THEN coalesce(new, old) ELSE coalesce(old, new) END
$$;

CREATE OR REPLACE FUNCTION unless_edited(versions jsonb, field text, new anyelement,
    old anyelement) RETURNS anyelement LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    -- mailbox snapshots: the snapshot's value, but a field an edit has set keeps it
    SELECT CASE WHEN versions ? field THEN old ELSE coalesce(new, old) END
$$;

CREATE OR REPLACE FUNCTION edit_wins(old jsonb, new jsonb, field text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    -- mailbox edits: the later edit of a field (its version in field_versions) wins
    SELECT (new ->> field) COLLATE "C" > coalesce(old ->> field, '') COLLATE "C"
$$;

CREATE OR REPLACE FUNCTION latest_versions(old jsonb, new jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    -- field_versions: per field, the greatest edit version seen ({} when no field is)
    SELECT coalesce(jsonb_object_agg(key, version), '{}') FROM (
        SELECT key, max(value COLLATE "C") AS version
        FROM (SELECT * FROM jsonb_each_text(old) UNION ALL SELECT * FROM jsonb_each_text(new))
            AS edits
        GROUP BY key) AS latest
$$;
