"""`q` reads the search indexer's copies (migration 0026), yet answers as the rows are now:
a row just written is found at once, a renamed one by its new text and never by its old,
whether or not the indexer has run since; the indexer copies only the texts that changed
and never marks as copied a row whose transaction has not committed."""

import asyncio
import csv
import io
from typing import Any

import asyncpg
import pytest

from app.db import make_engine
from app.models import MAILBOX_SEARCH, SUBSCRIPTION_SEARCH
from app.operations import search_index
from app.simulation import traffic
from tests.conftest import CREDENTIALS_TOKEN, app_client, asyncpg_dsn, deliver, make_settings
from tests.state import OPS
from tests.test_keyed_hashes import migrate, migrated_only_to


async def found(client: Any, what: str, q: str) -> set[str]:
    key = {"mailboxes": "mailboxId", "subscriptions": "subscriptionId"}[what]
    answer = await client.get(f"/api/v1/{what}", params={"q": q}, headers=OPS)
    assert answer.status_code == 200, answer.text
    return {item[key] for item in answer.json()["items"]}


async def exported(client: Any, q: str) -> set[str]:
    """The mailboxes a CSV export chooses by `q` (a statement reading every match)."""
    answer = await client.get(
        "/api/v1/exports/mailboxes",
        params={"format": "csv", "q": q},
        headers={"Authorization": f"Bearer {CREDENTIALS_TOKEN}"},
    )
    assert answer.status_code == 200, answer.text
    return {row["mailboxId"] for row in csv.DictReader(io.StringIO(answer.text.lstrip("\ufeff")))}


async def holding(db: Any, what: str, q: str) -> set[str]:
    """What `q` found before migration 0026: the rows whose own text holds it."""
    key, expression = {
        "mailboxes": ("mailbox_id", MAILBOX_SEARCH),
        "subscriptions": ("subscription_id", SUBSCRIPTION_SEARCH),
    }[what]
    pattern = f"%{q}%"
    rows = await db.fetch(f"SELECT {key} FROM {what} WHERE ({expression}) ILIKE $1", pattern)
    return {row[key] for row in rows}


async def index(db: Any) -> int:
    """One walk as serve's, with no margin: a row committed is copied, whatever the clock."""
    return await search_index.index_once(db, margin=0)


async def copies(db: Any, side: str) -> dict[int, str]:
    return {row["id"]: row["text"] for row in await db.fetch(f"SELECT id, text FROM {side}")}


async def test_a_new_mailbox_is_found_at_once_and_a_renamed_one_by_its_new_name_only(client, db):
    created = traffic.mailbox_created(details={"firstName": "Quillon", "lastName": "Marsh"})
    mailbox_id = created["data"]["mailboxDetails"]["mailboxId"]
    assert (await deliver(client, created)).status_code == 200
    # not copied yet: found all the same
    assert await db.fetchval("SELECT count(*) FROM mailbox_search") == 0
    assert await found(client, "mailboxes", "quillon") == {mailbox_id}
    assert await index(db) == 2  # the mailbox's text and its subscription's
    assert await found(client, "mailboxes", "QUILLON") == {mailbox_id}

    renamed = traffic.mailbox_updated(mailbox_id, {"firstName": "Brannoch"})
    assert (await deliver(client, renamed)).status_code == 200
    for indexed in (False, True):  # the copy still says Quillon, then it says Brannoch
        assert await found(client, "mailboxes", "brannoch") == {mailbox_id}
        assert await found(client, "mailboxes", "quillon") == set()
        for q in ("brannoch", "quillon", "marsh", mailbox_id[2:9]):
            assert await found(client, "mailboxes", q) == await holding(db, "mailboxes", q)
        if not indexed:
            assert await index(db) == 1  # only the renamed mailbox's text changed
    assert "Brannoch" in (await copies(db, "mailbox_search")).popitem()[1]


async def test_an_export_chooses_by_q_as_the_rows_are_now_copied_or_not(client, db):
    """An export reads every match at once (not a page's legs): the copies that hold `q`,
    and the rows written since the indexer's mark, each by its own text as it is now."""
    names = ["Exportwren", "Exportwren", "Plainfield", "Plainfield", "Exportwren", "Plainfield"]
    boxes = [traffic.mailbox_created(details={"lastName": name}) for name in names]
    ids = [box["data"]["mailboxDetails"]["mailboxId"] for box in boxes]
    for box in boxes[:4]:
        assert (await deliver(client, box)).status_code == 200
    assert await index(db) > 0  # the first four copied as they are
    renames = [(ids[1], "Fallowby"), (ids[2], "Exportwren")]
    for box in [*boxes[4:], *(traffic.mailbox_updated(m, {"lastName": n}) for m, n in renames)]:
        assert (await deliver(client, box)).status_code == 200
    # copied and unchanged; renamed to it since; new since: each found, and nothing else
    expected = {ids[0], ids[2], ids[4]}
    for q in ("exportwren", "EXPORTWREN"):
        assert await exported(client, q) == expected == await found(client, "mailboxes", q)
    assert await exported(client, "plainfield") == {ids[3], ids[5]}
    assert (
        await exported(client, "fallowby") == {ids[1]} == await holding(db, "mailboxes", "fallowby")
    )


async def test_a_subscriptions_new_owner_finds_it_and_its_old_one_no_longer(client, db):
    order = traffic.mailbox_order_success(userEmail="first.owner@oldco.example")
    subscription_id = order["data"]["subscriptionId"]
    assert (await deliver(client, order)).status_code == 200
    assert await found(client, "subscriptions", "oldco") == {subscription_id}
    await index(db)
    again = traffic.mailbox_order_success(
        subscriptionId=subscription_id,
        domainName=order["data"]["domainName"],
        userEmail="second.owner@newco.example",
    )
    assert (await deliver(client, again)).status_code == 200
    for _ in range(2):  # before the indexer runs again, and after
        assert await found(client, "subscriptions", "newco") == {subscription_id}
        assert await found(client, "subscriptions", "oldco") == set()
        assert await holding(db, "subscriptions", "oldco") == set()
        await index(db)


async def test_the_indexer_copies_each_text_as_it_is_and_only_once(client, db):
    boxes = [traffic.mailbox_created() for _ in range(7)]
    for box in boxes:
        assert (await deliver(client, box)).status_code == 200
    for batch in (1, 3, 100):  # one walk in batches of any size copies every row
        await db.execute("TRUNCATE mailbox_search, subscription_search")
        await db.execute("UPDATE search_marks SET indexed_before = '2000-01-01Z'")
        upto = await db.fetchval("SELECT clock_timestamp()")
        assert await search_index.index_table(db, "mailboxes", upto, batch) == 7
        expected = await db.fetch(f"SELECT id, {MAILBOX_SEARCH} AS text FROM mailboxes")
        assert await copies(db, "mailbox_search") == {r["id"]: r["text"] for r in expected}
        assert await db.fetchval(search_index.MARK, "mailboxes") == upto
    # nothing changed since: a walk from the start again writes nothing
    await db.execute("UPDATE search_marks SET indexed_before = '2000-01-01Z'")
    assert await search_index.index_table(db, "mailboxes", upto, 3) == 0


async def written_at(db: Any, table: str, key: str, value: str) -> Any:
    return await db.fetchval(f"SELECT search_written_at FROM {table} WHERE {key} = $1", value)


async def test_only_a_write_of_a_searched_column_makes_a_row_searched_as_recent(client, db):
    """A write that changes no searched text (a further mailbox of a known subscription,
    a new profile picture) leaves search_written_at as it was: the indexer does not walk
    the row again, a search does not read it as recent, and the upsert changes no indexed
    column, so it can be a HOT update (migration 0028). A write of a searched column
    (a new owner's email, a new first name) moves it."""
    created = traffic.mailbox_created()
    data = created["data"]
    mailbox_id = data["mailboxDetails"]["mailboxId"]
    assert (await deliver(client, created)).status_code == 200
    sub = await written_at(db, "subscriptions", "subscription_id", data["subscriptionId"])
    box = await written_at(db, "mailboxes", "mailbox_id", mailbox_id)

    further = traffic.mailbox_created(subscriptionId=data["subscriptionId"], domain=data["domain"])
    picture = traffic.mailbox_updated(mailbox_id, {"profilePicture": "https://cdn.example/p.png"})
    for unsearched in (further, picture):
        assert (await deliver(client, unsearched)).status_code == 200
    assert await written_at(db, "subscriptions", "subscription_id", data["subscriptionId"]) == sub
    assert await written_at(db, "mailboxes", "mailbox_id", mailbox_id) == box
    assert await db.fetchval(  # the further mailbox.created did write the subscription
        "SELECT updated_at > $1 FROM subscriptions WHERE subscription_id = $2",
        sub,
        data["subscriptionId"],
    )

    owner = traffic.mailbox_order_success(
        subscriptionId=data["subscriptionId"],
        domainName=data["domain"],
        userEmail="next.owner@elsewhere.example",
    )
    renamed = traffic.mailbox_updated(mailbox_id, {"firstName": "Oswin"})
    for searched in (owner, renamed):
        assert (await deliver(client, searched)).status_code == 200
    assert await written_at(db, "subscriptions", "subscription_id", data["subscriptionId"]) > sub
    assert await written_at(db, "mailboxes", "mailbox_id", mailbox_id) > box
    assert await found(client, "subscriptions", "elsewhere") == {data["subscriptionId"]}
    assert await found(client, "mailboxes", "oswin") == {mailbox_id}


async def test_a_write_not_yet_committed_is_never_marked_copied(client, db, database_url):
    """The mark stops before the start of a transaction in progress: its rows, committed
    after the walk with a search_written_at before it, are still read by a search and copied by
    the next walk."""
    box = traffic.mailbox_created()
    mailbox_id = box["data"]["mailboxDetails"]["mailboxId"]
    assert (await deliver(client, box)).status_code == 200
    await index(db)
    writer = await asyncpg.connect(database_url.replace("+asyncpg", ""))
    try:
        async with writer.transaction():
            await writer.execute(
                "UPDATE mailboxes SET first_name = 'Late', search_written_at = now()"
                " WHERE mailbox_id = $1",
                mailbox_id,
            )
            started = await writer.fetchval("SELECT now()")
            assert await index(db) == 0  # the late write is not visible yet
            assert await db.fetchval(search_index.MARK, "mailboxes") <= started
    finally:
        await writer.close()
    assert await found(client, "mailboxes", "late") == {mailbox_id}
    assert await index(db) == 1
    assert "Late" in (await copies(db, "mailbox_search")).popitem()[1]


async def test_serve_copies_new_mailboxes_in_the_background(database_url, db):
    settings = make_settings(database_url, search_index_interval_seconds=0.05)
    box = traffic.mailbox_created()
    async with app_client(settings) as client:
        assert (await deliver(client, box)).status_code == 200
        for _ in range(400):  # 20 s at most, on a busy box
            if await db.fetchval("SELECT count(*) FROM mailbox_search") == 1:
                break
            await asyncio.sleep(0.05)
        text = await db.fetchval("SELECT text FROM mailbox_search")
    assert box["data"]["mailboxDetails"]["email"] in text


@pytest.mark.parametrize("holder", ["another worker", "nobody"])
async def test_one_indexer_at_a_time(database_url, db, holder):
    """Workers and replicas take turns by an advisory lock: while one holds it, the others'
    walks copy nothing."""
    await db.execute("INSERT INTO subscriptions (subscription_id, status) VALUES ('S-1', 'x')")
    other = await asyncpg.connect(database_url.replace("+asyncpg", ""))
    engine = make_engine(database_url, pool_size=1)
    try:
        if holder == "another worker":
            await other.execute("SELECT pg_advisory_lock($1)", search_index.INDEXER_LOCK)
        await asyncio.wait_for(search_index.walk(engine, margin=0), 10)
        copied = await db.fetchval("SELECT count(*) FROM subscription_search")
        assert copied == (0 if holder == "another worker" else 1)
    finally:
        await engine.dispose()
        await other.close()


@pytest.mark.parametrize("order", ["oldest", "newest"])
async def test_a_search_walk_returns_copied_and_recent_rows_once_each_in_order(client, db, order):
    """A page merges the copies' matches and the rows written since the mark: a walk with
    the cursor returns each match once, in id order, wherever it came from (a copied row
    written again since is in both, and comes once)."""
    boxes = [traffic.mailbox_created(details={"lastName": f"Pagewalk{n}"}) for n in range(5)]
    for box in boxes[:3]:
        assert (await deliver(client, box)).status_code == 200
    await index(db)  # three copied, two written since the mark
    first = boxes[0]["data"]["mailboxDetails"]["mailboxId"]
    edited = traffic.mailbox_updated(first, {"firstName": "Walkedit"})
    for box in [*boxes[3:], edited]:  # the first also written since, its copy still holding q
        assert (await deliver(client, box)).status_code == 200
    walked, cursor = [], None
    while True:
        params = {"q": "pagewalk", "limit": 2, "order": order} | (
            {"cursor": cursor} if cursor else {}
        )
        page = (await client.get("/api/v1/mailboxes", params=params, headers=OPS)).json()
        walked += [item["mailboxId"] for item in page["items"]]
        if not (cursor := page["nextCursor"]):
            break
    expected = [box["data"]["mailboxDetails"]["mailboxId"] for box in boxes]
    assert walked == (expected if order == "oldest" else expected[::-1])


class Stop(BaseException):
    """Ends index_forever's loop after the walks a test scripted."""


async def test_an_indexer_that_keeps_failing_logs_once_and_once_more_when_it_works(
    monkeypatch, caplog
):
    """The database away for an hour must not log a warning a second: the first failure is
    logged, the tries after it are not, and the walk that works again says so."""
    outcomes = iter([OSError, OSError, OSError, None, OSError, None])

    async def scripted_walk(engine: Any) -> None:
        outcome = next(outcomes, Stop)
        if outcome is not None:
            raise outcome()

    monkeypatch.setattr(search_index, "walk", scripted_walk)
    caplog.set_level("INFO", logger="coldmail.search_index")
    with pytest.raises(Stop):
        await search_index.index_forever(None, every=0)  # type: ignore[arg-type]
    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    failed = ("WARNING", "search indexing failed: OSError; trying again")
    back = ("INFO", "search indexing works again")
    assert said == [failed, back, failed, back]


async def test_a_search_right_after_migration_0028_reads_rows_written_since_the_mark_by_index(
    server_url: str,
) -> None:
    """20,000 mailboxes indexed before the upgrade: the search's "written since the mark" leg
    reads the BRIN index at once, not the whole table (the column's statistics are taken)."""
    async with migrated_only_to(server_url, "0027") as url:
        conn = await asyncpg.connect(asyncpg_dsn(url))
        try:
            await conn.execute(
                "INSERT INTO mailboxes (mailbox_id, email) "
                "SELECT 'mb_' || g, 'user' || g || '@example.com' FROM generate_series(1, 20000) g"
            )
            await conn.execute("UPDATE search_marks SET indexed_before = now()")
            await conn.execute("ANALYZE mailboxes")
            await asyncio.to_thread(migrate, url, "0028")
            plan = await conn.fetchval(
                "EXPLAIN (FORMAT JSON) SELECT id FROM mailboxes"
                " WHERE search_written_at >= search_mark('mailboxes')"
            )
        finally:
            await conn.close()
    assert "ix_mailboxes_search_written_at" in plan, plan
