"""With 100,000 mailboxes stored, a filtered page of 500 is an index range scan."""

import re
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import create_async_engine

from app.models import mailboxes, subscriptions
from app.operations import search_index
from app.reading import exporting, renewals
from app.reading.api import apply_filters, mailbox_select
from app.reading.queries.events import events_about
from app.reading.queries.mailboxes import MailboxQuery, list_mailboxes
from app.reading.queries.subscriptions import SubscriptionQuery, list_subscriptions
from app.recording.merge import DERIVE_ORDER

FILL = """
INSERT INTO subscriptions (subscription_id, domain, source, status)
SELECT 'sub' || d, 'd' || d || '.com', 'prewarmed', 'active' FROM generate_series(0, 999) d;
INSERT INTO mailboxes (mailbox_id, subscription_id, domain, email, provider, source, user_id)
SELECT 'mbx' || i, 'sub' || (i % 1000), 'd' || (i % 1000) || '.com', 'u' || i || '@x.com',
       CASE WHEN i % 2 = 0 THEN 'GOOGLE' ELSE 'MICROSOFT' END, 'prewarmed', 'usr' || (i % 50)
FROM generate_series(1, 100000) i;
ANALYZE;
"""


@pytest.mark.parametrize(
    "filters",
    [
        {},
        {"domain": "d5.com"},
        {"provider": "GOOGLE"},
        {"subscription_id": "sub7"},
        {"user_id": "usr3"},
        {"email": "u42@x.com"},
    ],
)
async def test_filtered_page_of_500_does_not_scan_the_table(database_url, filters):
    engine = create_async_engine(database_url)
    async with engine.begin() as conn:
        for statement in filter(str.strip, FILL.split(";")):
            await conn.execute(text(statement))
        stmt = apply_filters(mailbox_select(), mailboxes, filters)
        stmt = stmt.where(mailboxes.c.id > 1000).order_by(mailboxes.c.id).limit(501)
        sql = stmt.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True})
        plan = "\n".join((await conn.execute(text(f"EXPLAIN {sql}"))).scalars())
    await engine.dispose()
    print(f"\n{filters}:\n{plan}")
    assert "Seq Scan on mailboxes" not in plan
    assert "Index" in plan


ORDERS = """
INSERT INTO orders (order_id, kind, status)
SELECT 'ord' || o, 'mailbox', 'succeeded' FROM generate_series(0, 99999) o;
INSERT INTO order_domains (order_id, domain, status, subscription_id, quantity)
SELECT 'ord' || o, 'd' || o || '.com', 'succeeded', 'sub' || o, 1
FROM generate_series(0, 99999) o;
ANALYZE;
"""


async def test_an_order_delivery_with_100000_order_domains_stored_reads_only_its_own(
    database_url,
):
    engine = create_async_engine(database_url)
    async with engine.begin() as conn:
        for statement in filter(str.strip, ORDERS.split(";")):
            await conn.execute(text(statement))
        driver = (await conn.get_raw_connection()).driver_connection
        assert driver is not None
        rows = await driver.fetch("EXPLAIN " + DERIVE_ORDER, "ord7", ["sub7", "sub8"])
        plan = "\n".join(row[0] for row in rows)
    await engine.dispose()
    print(f"\n{plan}")
    assert "Seq Scan on order_domains" not in plan


MORE_SUBSCRIPTIONS = """
INSERT INTO subscriptions (subscription_id, domain, user_email, source, status)
SELECT 'S' || i, 'x' || i || '.net', 'buyer' || i || '@agency.com', 'standard', 'active'
FROM generate_series(1, 100000) i;
"""


class Recorder:
    """A Reader that keeps the statement a page would run and answers no rows."""

    def __init__(self) -> None:
        self.statements: list[Any] = []

    async def execute(self, stmt: Any, *, search: bool = False) -> Any:
        self.statements.append(stmt)
        return Result()


class Result:
    def all(self) -> list[Any]:
        return []


async def page_sql(lister: Any, query: Any) -> str:
    """The SQL of the first statement `lister` reads for `query`, exactly as the API runs it."""
    recorder = Recorder()
    await lister(recorder, query)
    [stmt] = recorder.statements
    return str(stmt.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))


async def export_choice(conn: Any, query: MailboxQuery) -> None:
    """The mailboxes an export with `q` chooses (apply_filters' default: matching)."""
    await exporting.cannot_export(conn, {"q": query.q}, limit=exporting.SKIPPED_NAMED)


@pytest.mark.parametrize(
    ("lister", "searched", "table", "typed", "index"),
    [
        (list_mailboxes, MailboxQuery, mailboxes, "U4242@X", "ix_mailbox_search_text"),
        (list_mailboxes, MailboxQuery, mailboxes, "bx9999", "ix_mailbox_search_text"),
        (
            list_subscriptions,
            SubscriptionQuery,
            subscriptions,
            "X77777.NET",
            "ix_subscription_search_text",
        ),
        (export_choice, MailboxQuery, mailboxes, "U4242@X", "ix_mailbox_search_text"),
        # nearly every row holds it: the page walks the ids, probing each row's copy
        (list_mailboxes, MailboxQuery, mailboxes, "@x.com", "pk_mailbox_search"),
        (list_subscriptions, SubscriptionQuery, subscriptions, "@agency", "pk_subscription_search"),
    ],
)
async def test_a_search_among_100000_rows_reads_the_trigram_index(
    database_url, lister, searched, table, typed, index
):
    """`q` is a case-insensitive substring: without its trigram index (on the search
    indexer's copy, migration 0026) each search would read every row."""
    engine = create_async_engine(database_url)
    async with engine.begin() as conn:
        for statement in filter(str.strip, (MORE_SUBSCRIPTIONS + FILL).split(";")):
            await conn.execute(text(statement))
        driver = (await conn.get_raw_connection()).driver_connection
        assert driver is not None
        upto = await driver.fetchval("SELECT clock_timestamp()")
        for name in search_index.SIDES:
            await search_index.index_table(driver, name, upto)
        await driver.execute("ANALYZE")
        sql = await page_sql(lister, searched(q=typed, limit=50, order="newest"))
        plan = "\n".join((await conn.execute(text(f"EXPLAIN {sql}"))).scalars())
    await engine.dispose()
    print(f"\n{typed}:\n{plan}")
    assert index in plan
    assert f"Seq Scan on {table.name}" not in plan
    assert "Seq Scan on mailbox_search" not in plan
    assert "Seq Scan on subscription_search" not in plan


QUEUE_ORDER = "ix_subscriptions_renews_at"


@pytest.mark.parametrize(
    ("filters", "index"),
    [
        ({}, QUEUE_ORDER),
        ({"due": "this_week"}, QUEUE_ORDER),
        ({"due": "overdue", "risk": "renewal_failed"}, QUEUE_ORDER),
        ({"user_id": "U7"}, "ix_subscriptions_user_id_id"),
        ({"user_email": "Buyer7@Agency.example"}, "ix_subscriptions_lower_user_email_id"),
    ],
    ids=[
        "whole list",
        "this week",
        "overdue with a risk",
        "a customer",
        "an email",
    ],
)
async def test_a_page_of_renewals_among_100000_subscriptions_reads_only_its_rows(
    database_url, filters, index
):
    """Monthly billing puts nearly every subscription on the renewals list: a page must
    come from an index in its order, not from sorting them all, whatever the filters; a
    customer's from their own range of their index, not from a walk of the whole list's
    order (which for a customer with none on the list reads all of it)."""
    plan = await renewals_plan(database_url, renewals.PAGE, filters, limit=51)
    assert index in plan and "Seq Scan on subscriptions" not in plan
    assert (QUEUE_ORDER in plan) is (index == QUEUE_ORDER)
    assert (f"Index Scan using {QUEUE_ORDER} on subscriptions" in plan) is (index == QUEUE_ORDER)


@pytest.mark.parametrize("email", ["buyer7@agency.com", "BUYER7@agency.com"])
async def test_a_page_of_subscriptions_by_email_reads_the_index_of_emails(database_url, email):
    """The list's exact `userEmail` is read from the emails in lower case (migration 0031)."""
    engine = create_async_engine(database_url)
    async with engine.begin() as conn:
        await conn.execute(text(MORE_SUBSCRIPTIONS))
        await conn.execute(text("ANALYZE subscriptions"))
        sql = await page_sql(list_subscriptions, SubscriptionQuery(user_email=email, limit=50))
        plan = "\n".join((await conn.execute(text(f"EXPLAIN {sql}"))).scalars())
    await engine.dispose()
    print(f"\n{plan}")
    assert "ix_subscriptions_lower_user_email_id" in plan
    assert "Seq Scan on subscriptions" not in plan


@pytest.mark.parametrize(
    "filters",
    [{}, {"due": "this_week"}, {"user_id": "U7"}, {"user_email": "Buyer7@Agency.example"}],
    ids=["whole list", "this week", "a customer", "an email"],
)
async def test_a_statement_of_the_renewals_csv_reads_only_its_rows(database_url, filters):
    """The download's 2,000 rows a statement come from an index too, a customer's from
    their own rows."""
    plan = await renewals_plan(
        database_url, renewals.CSV_PAGE_ROWS, filters, limit=renewals.CSV_PAGE
    )
    assert "Seq Scan on subscriptions" not in plan
    assert "on subscriptions" in plan


async def renewals_plan(database_url, statements, filters, *, limit):
    """EXPLAIN of a renewals statement among 100,000 subscriptions, a hundred customers'."""
    engine = create_async_engine(database_url)
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO subscriptions (subscription_id, domain, status, expiry_date, user_id,"
                " user_email) SELECT 'S' || n, 'd' || n || '.com', 'active',"
                " now() + (n % 36 - 5) * interval '1 day', 'U' || n % 100,"
                " 'buyer' || n % 100 || '@agency.example'"
                " FROM generate_series(1, 100000) n"
            )
        )
        await conn.execute(text("ANALYZE"))
        driver = (await conn.get_raw_connection()).driver_connection
        assert driver is not None
        given = dict.fromkeys(
            ["due", "risk", "user_id", "user_email", "renews_from", "renews_before"]
        )
        given |= filters | {"days": 30, "after_at": datetime(1, 1, 1, tzinfo=UTC)}
        given |= {"after_id": 0, "limit": limit}
        chosen = statements[renewals.rows_of(given)]
        compiled = chosen.compile(dialect=postgresql.asyncpg.dialect())
        args = [given[name] for name in compiled.positiontup or []]
        rows = await driver.fetch(f"EXPLAIN {compiled}", *args)
        plan = "\n".join(row[0] for row in rows)
    await engine.dispose()
    print(f"\n{plan}")
    return plan


# 60,000 events: mailbox.created (an order of 6, a subscription of 30), mailbox.updated,
# subscription.* (migration 0030's three indexes of the IDs an event names)
EVENTS = """
INSERT INTO events (event_id, event, status, content_hash, deliveries, conflict, signature,
                    payload)
SELECT 'EV' || n, e, 'processed', sha256(n::text::bytea), 1, false, 'valid',
       jsonb_build_object('event', e, 'data', CASE e
           WHEN 'mailbox.created' THEN jsonb_build_object('orderId', 'ORD' || n / 6,
               'subscriptionId', 'SUB' || n / 30, 'mailboxDetails',
               jsonb_build_object('mailboxId', 'MBX' || n))
           WHEN 'mailbox.updated' THEN jsonb_build_object('mailboxId', 'MBX' || n - 1)
           ELSE jsonb_build_object('subscriptionId', 'SUB' || n / 30) END)
FROM (SELECT n, (ARRAY['mailbox.created', 'mailbox.created', 'mailbox.created',
                       'mailbox.updated', 'subscription.renewal.success'])[1 + n % 5] AS e
      FROM generate_series(1, 60000) n) g;
ANALYZE events;
"""


class Captured:
    statement: Any = None

    async def execute(self, stmt: Any) -> list[Any]:
        self.statement = stmt
        return []


@pytest.mark.parametrize(
    ("ids", "indexes"),
    [
        ({"order": ["ORD7001"]}, {"ix_events_about_order"}),
        (
            {"subscription": ["SUB1401"], "order": ["ORD7005", "ORD7006"]},
            {"ix_events_about_subscription", "ix_events_about_order"},
        ),
        (
            {"mailbox": [("MBX42002", "SUB1400")], "order": ["ORD7000"]},
            {"ix_events_about_mailbox", "ix_events_about_subscription", "ix_events_about_order"},
        ),
    ],
)
async def test_a_detail_page_reads_its_events_through_the_about_indexes(database_url, ids, indexes):
    engine = create_async_engine(database_url)
    async with engine.begin() as conn:
        for statement in filter(str.strip, EVENTS.split(";")):
            await conn.execute(text(statement))
        captured: Any = Captured()
        await events_about(captured, **ids)
        sql = captured.statement.compile(
            dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}
        )
        plan = "\n".join((await conn.execute(text(f"EXPLAIN {sql}"))).scalars())
    await engine.dispose()
    print(f"\n{ids}:\n{plan}")
    assert "Seq Scan on events" not in plan
    assert set(re.findall(r"ix_events_about_\w+", plan)) == indexes
