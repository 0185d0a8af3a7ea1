"""What a delivery's one statement costs the database, pinned: the issue-31 regression came
from costs added one at a time (an index here, a check there) that no single before/after
run could see on a noisy box. Each index on these tables is maintained by every delivery
that writes a row: adding one is a decision to take with bench/run.py --baseline figures."""

import os
import time

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
        "ix_events_about_order",
        "ix_events_about_subscription",
        "ix_events_about_mailbox",
        "ix_events_about_updated_mailbox",
        "ix_events_failed_signature_at",  # partial: a delivery with a good signature adds no entry
    },
    "subscriptions": {
        "pk_subscriptions",
        "uq_subscriptions_subscription_id",
        *(f"ix_subscriptions_{c}_id" for c in ("domain", "user_id", "user_email")),
        "ix_subscriptions_status_id",  # partial: an active subscription adds no entry
        "ix_subscriptions_subscription_status_id",  # partial: only a lifecycle status
        "ix_subscriptions_search_written_at",  # BRIN: no entry per row (0028)
        "ix_subscriptions_renews_at",
        # a customer's renewals (migration 0022: docs/benchmark.md says what they cost)
        "ix_subscriptions_user_id_renews_at",
        "ix_subscriptions_user_email_renews_at",
    },
    "mailboxes": {
        "pk_mailboxes",
        "uq_mailboxes_mailbox_id",
        *(f"ix_mailboxes_{c}_id" for c in ("subscription_id", "domain", "email", "user_id")),
        "ix_mailboxes_order_id_id",  # includes subscription_id: an order domain's count too
        "ix_mailboxes_search_written_at",  # BRIN
    },
}


def mailbox_created_statement(*, telling: bool = False) -> tuple[str, list[object]]:
    """The service's own statement for a new mailbox.created delivery, as record.py runs it
    (`telling`: with an outbox that may tell of it)."""
    vault, hasher = Vault([generate_key()]), Hasher(os.urandom(32))
    raw = orjson.dumps(traffic.mailbox_created())
    envelope = payloads.parse_envelope(raw, hasher)
    model = payloads.parse_handled(envelope, [])
    assert model is not None
    delivery = Delivery(envelope, raw, SignatureCheck("valid", None, time.time()), hasher=hasher)
    version = record.delivery_version(delivery)
    changes = effects.of(model, vault=vault, when=delivery.event_time, version=version)
    # built here, not taken from the cache an earlier test filled: mutmut runs a mutant of
    # merge.Upsert.sql with only the tests it saw call it
    record.delivery_statement.cache_clear()
    return record.delivery_write(delivery, changes, vault, telling=telling)


async def test_a_delivery_runs_no_trigger(db):
    """A trigger (a foreign key's check is one) runs a query per row written: the mailbox's
    check on its subscription was a third of the statement's time (migration 0012)."""
    sql, args = mailbox_created_statement()
    async with db.transaction():
        plan = await db.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", *args)
        stored = await db.fetchval("SELECT count(*) FROM mailboxes")
    assert stored == 1  # the statement did write the mailbox
    assert orjson.loads(plan)[0].get("Triggers", []) == []


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


@pytest.mark.parametrize("index", sorted(PARTIAL))
async def test_the_status_indexes_hold_only_the_unusual_rows(db, index):
    definition = await db.fetchval("SELECT indexdef FROM pg_indexes WHERE indexname = $1", index)
    assert definition.endswith(PARTIAL[index])
