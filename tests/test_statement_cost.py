"""What a delivery's one statement costs the database, pinned: the issue-31 regression came
from costs added one at a time (an index here, a check there) that no single before/after
run could see on a noisy box. Each index on these tables is maintained by every delivery
that writes a row: adding one is a decision to take with bench/run.py --baseline figures."""

import os
import time
from typing import Any

import orjson
import pytest

from app.crypto import Vault, generate_key
from app.hashing import Hasher
from app.receiving import payloads
from app.receiving.delivery import Delivery
from app.receiving.signing import SignatureCheck
from app.recording import effects, record
from app.simulation import traffic

# Every index a mailbox.created delivery maintains (event_keys, events, subscriptions,
# mailboxes): the unique keys, the read API's keyset filters, the detail pages' lookups,
# and the rows written since the search indexer's mark (docs/benchmark.md says what each
# costs). No trigram index: `q`'s are on side tables the search indexer keeps (0026).
INDEXES = {
    "event_keys": {"pk_event_keys"},
    "events": {
        "pk_events",
        "uq_events_event_id_content_hash",
        "ix_events_event_type_id",
        "ix_events_status_id",  # partial: a processed event adds no entry
        "ix_events_conflict_id",
        "ix_events_first_received_at",
        "ix_events_last_received_at",
        # the detail pages' events by ID (migration 0030): one jsonb path each
        "ix_events_about_order",
        "ix_events_about_subscription",
        "ix_events_about_mailbox",  # partial: a mailbox.created names a subscription
        "ix_events_failed_signature_at",  # partial: a delivery with a good signature adds no entry
    },
    "subscriptions": {
        "pk_subscriptions",
        "uq_subscriptions_subscription_id",
        *(f"ix_subscriptions_{c}_id" for c in ("domain", "user_id")),
        # a customer's by email: the list's exact one, the renewals' in any case (0030)
        "ix_subscriptions_lower_user_email_id",
        "ix_subscriptions_status_id",  # partial: an active subscription adds no entry
        "ix_subscriptions_subscription_status_id",  # partial: only a lifecycle status
        "ix_subscriptions_search_written_at",  # BRIN: no entry per row (0028)
        "ix_subscriptions_renews_at",
    },
    "mailboxes": {
        "pk_mailboxes",
        "uq_mailboxes_mailbox_id",
        *(f"ix_mailboxes_{c}_id" for c in ("subscription_id", "domain", "email", "user_id")),
        "ix_mailboxes_order_id_id",  # includes subscription_id: an order domain's count too
        "ix_mailboxes_search_written_at",  # BRIN
    },
}


def mailbox_created_statement(
    *, telling: bool = False, grouped: bool = False, payload: dict[str, Any] | None = None
) -> tuple[str, list[object]]:
    """The service's own statement for a new mailbox.created delivery, as record.py runs it
    (`telling`: with an outbox that may tell of it; `grouped`: in a group commit)."""
    vault, hasher = Vault([generate_key()]), Hasher(os.urandom(32))
    raw = orjson.dumps(payload or traffic.mailbox_created())
    envelope = payloads.parse_envelope(raw, hasher)
    model = payloads.parse_handled(envelope, [])
    assert model is not None
    delivery = Delivery(envelope, raw, SignatureCheck("valid", None, time.time()), hasher=hasher)
    version = record.delivery_version(delivery)
    changes = effects.of(model, vault=vault, when=delivery.event_time, version=version)
    # built here, not taken from the cache an earlier test filled: mutmut runs a mutant of
    # merge.Upsert.sql with only the tests it saw call it
    record.delivery_statement.cache_clear()
    only = record.insert_only(changes, telling=telling) if grouped else None
    return record.delivery_write(delivery, changes, vault, telling=telling, insert_only=only)


async def test_a_delivery_runs_no_trigger(db):
    """A trigger (a foreign key's check is one) runs a query per row written: the mailbox's
    check on its subscription was a third of the statement's time (migration 0012)."""
    sql, args = mailbox_created_statement()
    async with db.transaction():
        plan = await db.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", *args)
        stored = await db.fetchval("SELECT count(*) FROM mailboxes")
    assert stored == 1  # the statement did write the mailbox
    assert orjson.loads(plan)[0].get("Triggers", []) == []


async def test_the_rows_a_delivery_writes_carry_its_transaction_id(db):
    """created_xid is the writing transaction as pg_snapshot counts it (paging.py reads it
    so): txid_current() is pg_current_xact_id() without the text round trip (0030)."""
    sql, args = mailbox_created_statement()
    mine = (
        "SELECT (SELECT count(*) FROM events WHERE created_xid = x)"
        " + (SELECT count(*) FROM subscriptions WHERE created_xid = x)"
        " + (SELECT count(*) FROM mailboxes WHERE created_xid = x)"
        " FROM (SELECT pg_current_xact_id()::text::bigint AS x) AS now"
    )
    async with db.transaction():
        before = await db.fetchval(mine)
        await db.execute(sql, *args)
        after = await db.fetchval(mine)
    assert (before, after) == (0, 3)


@pytest.mark.parametrize("telling", [False, True])
async def test_whether_a_mailbox_completes_anything_is_read_only_for_an_outbox(db, telling):
    """may_complete is read only by an outbox that may tell of the delivery: without one,
    the statement neither returns `completes` nor reads order_domains (a tenth of its CPU,
    issue 31: docs/benchmark.md)."""
    sql, args = mailbox_created_statement(telling=telling)
    explained = db.transaction()
    await explained.start()
    plan = await db.fetchval(f"EXPLAIN (ANALYZE, VERBOSE, FORMAT JSON) {sql}", *args)
    await explained.rollback()
    row = await db.fetchrow(sql, *args)
    assert ("order_domains" in plan) is telling
    assert ("completes" in sql) is telling
    # told: its order has no domain that succeeded; not told: true, and no one reads it
    assert row["inserted"] and row["may_complete"] is not telling


@pytest.mark.parametrize(
    ("telling", "grouped"), [(False, False), (True, False), (False, True), (True, True)]
)
def test_only_a_group_that_tells_nothing_inserts_the_mailbox_without_its_merge(telling, grouped):
    """PostgreSQL builds a DO UPDATE's SET projections at each execution's start, used or not
    (95,000 instructions for the mailbox's: docs/benchmark.md). The live group statement
    only inserts the mailbox (its merge follows when it was stored: batches._merged); alone,
    or when an outbox reads what the upsert completes, the statement merges it itself."""
    sql, _ = mailbox_created_statement(telling=telling, grouped=grouped)
    insert_only = grouped and not telling
    assert ("ON CONFLICT (mailbox_id) DO NOTHING" in sql) is insert_only
    assert ("ON CONFLICT (mailbox_id) DO UPDATE" in sql) is not insert_only
    assert "ON CONFLICT (subscription_id) DO UPDATE" in sql  # the subscription's is kept
    assert ("AS fresh" in sql) is insert_only


async def test_the_group_statement_says_whether_it_inserted_the_mailbox(db):
    """`fresh`: the mailbox was new; a second creation of it inserts nothing and changes
    nothing, its merge left to the group (batches._merged)."""
    created = traffic.mailbox_created()
    again = traffic.mailbox_created()
    again["data"]["mailboxDetails"]["mailboxId"] = created["data"]["mailboxDetails"]["mailboxId"]
    email = "select email from mailboxes"
    for payload, fresh in ((created, True), (again, False)):
        sql, args = mailbox_created_statement(grouped=True, payload=payload)
        row = await db.fetchrow(sql, *args)
        assert (row["inserted"], row["fresh"]) == (True, fresh)
    assert await db.fetchval(email) == created["data"]["mailboxDetails"]["email"]


@pytest.mark.parametrize("table", sorted(INDEXES))
async def test_the_indexes_each_delivery_maintains_are_these(db, table):
    names = await db.fetch("SELECT indexname FROM pg_indexes WHERE tablename = $1", table)
    assert {row["indexname"] for row in names} == INDEXES[table]


async def test_the_last_delivery_index_holds_only_duplicates(db):
    definition = await db.fetchval(
        "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_events_last_received_at'"
    )
    assert definition.endswith("WHERE (deliveries > 1)")


# The partial indexes (migration 0024): the rows a mailbox.created delivery writes (a
# processed event, an active subscription with no lifecycle status) enter none of them.
PARTIAL = {
    "ix_events_status_id": "WHERE ((status)::text <> 'processed'::text)",
    "ix_subscriptions_status_id": "WHERE ((status)::text <> 'active'::text)",
    "ix_subscriptions_subscription_status_id": "WHERE (subscription_status IS NOT NULL)",
}


# The detail pages' indexes (migration 0030): building a jsonb path is what an expression
# index costs each delivery, so the two a mailbox.created enters build theirs once (no
# predicate), and the mailbox's holds only events without a subscriptionId.
ABOUT = {
    "ix_events_about_order": "(((payload #>> '{data,orderId}'::text[])), id)",
    "ix_events_about_subscription": "(((payload #>> '{data,subscriptionId}'::text[])), id)",
    "ix_events_about_mailbox": "WHERE ((payload #>> '{data,subscriptionId}'::text[]) IS NULL)",
}


@pytest.mark.parametrize("index", sorted(PARTIAL | ABOUT))
async def test_the_partial_and_about_indexes_are_defined_as_their_costs_need(db, index):
    definition = await db.fetchval("SELECT indexdef FROM pg_indexes WHERE indexname = $1", index)
    assert definition.endswith((PARTIAL | ABOUT)[index])
