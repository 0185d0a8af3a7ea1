"""One ops token cannot slow every reader: searches need what the trigram index needs, have
a length cap, are limited per token, and read statements run with custom plans and a
timeout of their own."""

import asyncio
import re
import time
from typing import Any

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from app.main import create_app
from tests.conftest import CREDENTIALS_TOKEN, OPS_TOKEN, app_client, make_settings

READ_TIMEOUT_MS = 10_000  # the read pool's statement timeout (app/main.py)
OPS_TOKENS = [OPS_TOKEN, "ops-token-second-0123456789"]
CREDS = {"Authorization": f"Bearer {CREDENTIALS_TOKEN}"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


IN_A_ROW = "needs at least 3 letters or digits in a row"


@pytest.mark.parametrize(
    ("q", "said"),
    [
        ("ja", "at least 3 characters"),
        ("a.b.c", IN_A_ROW),
        ("jo hn", IN_A_ROW),
        ("x" * 101, "at most 100 characters"),
        ("__%%__", IN_A_ROW),
    ],
)
@pytest.mark.parametrize("path", ["/api/v1/mailboxes", "/api/v1/subscriptions"])
async def test_a_search_the_index_cannot_serve_is_a_clear_422(client, path, q, said):
    answer = await client.get(path, params={"q": q}, headers=bearer(OPS_TOKEN))
    assert answer.status_code == 422
    (detail,) = answer.json()["detail"]
    assert detail["loc"] == ["query", "q"] and q not in answer.text
    assert detail["msg"].endswith(said)


@pytest.mark.parametrize("q", ["jan", "okafor%_1", "été"])
async def test_three_letters_or_digits_in_a_row_can_be_searched(client, q):
    answer = await client.get("/api/v1/mailboxes", params={"q": q}, headers=bearer(OPS_TOKEN))
    assert answer.status_code == 200


def patterns(schema: Any) -> list[str]:
    if isinstance(schema, dict):
        own = [schema["pattern"]] if "pattern" in schema else []
        return own + [p for value in schema.values() for p in patterns(value)]
    return [p for value in schema for p in patterns(value)] if isinstance(schema, list) else []


@pytest.mark.parametrize("q", ["¤xÑh", "¤¤¤", "张伟明", "Zoë", "ab_c", "×××", "Ωμέγα"])
async def test_the_served_schema_states_the_search_rule_the_service_applies(client, q):
    """The OpenAPI document's pattern for `q` accepts exactly what the service accepts, in
    any regex dialect: without `\\w`, which ECMA 262 reads as ASCII and Python as Unicode
    (schemathesis found the two disagreeing on `xÑh`)."""
    document = (await client.get("/openapi.json")).json()
    (parameter,) = [
        p for p in document["paths"]["/api/v1/mailboxes"]["get"]["parameters"] if p["name"] == "q"
    ]
    (pattern,) = patterns(parameter["schema"])
    assert "\\w" not in pattern.lower()
    answer = await client.get("/api/v1/mailboxes", params={"q": q}, headers=bearer(OPS_TOKEN))
    assert (answer.status_code == 200) == bool(re.search(pattern, q)), answer.text


async def until_waiting(db: asyncpg.Connection, count: int) -> None:
    """Until `count` statements wait for the lock on mailboxes (bounded: a minute)."""
    waiting = "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'mailboxes'::regclass"
    deadline = time.monotonic() + 60
    while await db.fetchval(waiting) < count:
        assert time.monotonic() < deadline, f"{count} searches never waited together"
        await asyncio.sleep(0.02)


async def test_a_token_gets_429_past_its_concurrent_searches_and_others_do_not(database_url, db):
    settings = make_settings(database_url, ops_api_tokens=",".join(OPS_TOKENS))
    async with app_client(settings) as client:
        await db.execute("BEGIN; LOCK TABLE mailboxes IN ACCESS EXCLUSIVE MODE")

        def search(token: str) -> "asyncio.Task[object]":
            request = client.get("/api/v1/mailboxes", params={"q": "okafor"}, headers=bearer(token))
            return asyncio.ensure_future(request)

        held = [search(OPS_TOKENS[0]), search(OPS_TOKENS[0])]
        await until_waiting(db, 2)
        refused = await client.get(
            "/api/v1/mailboxes", params={"q": "okafor"}, headers=bearer(OPS_TOKENS[0])
        )
        other = search(OPS_TOKENS[1])  # another token's search still reaches the database
        await until_waiting(db, 3)
        listing = await client.get("/api/v1/rejected", headers=bearer(OPS_TOKENS[0]))
        await db.execute("ROLLBACK")
        answers = await asyncio.gather(*held, other)
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert refused.json() == {"error": "too_many_searches"}
    assert listing.status_code == 200  # only searches are counted
    assert [a.status_code for a in answers] == [200, 200, 200]  # type: ignore[attr-defined]


@pytest.mark.parametrize("pooler", [False, True])
async def test_every_read_runs_with_custom_plans_and_the_read_timeout(database_url, pooler):
    """A generic plan (kept after five runs of one prepared search) walked every mailbox
    for `q=zzzz`; through a pooler the settings are made per transaction."""
    pooled = make_url(database_url).update_query_dict({"prepared_statement_cache_size": "0"})
    url = pooled.render_as_string(hide_password=False) if pooler else database_url
    app = create_app(make_settings(url))
    async with app.router.lifespan_context(app):
        async with app.state.read_engine.connect() as conn:
            plans = await conn.exec_driver_sql("SELECT current_setting('plan_cache_mode')")
            timeout = await conn.exec_driver_sql(
                "SELECT setting FROM pg_settings WHERE name = 'statement_timeout'"
            )
            assert plans.scalar() == "force_custom_plan"
            assert int(timeout.scalar()) == READ_TIMEOUT_MS
        async with app.state.engine.connect() as conn:  # deliveries keep their plans
            plans = await conn.exec_driver_sql("SELECT current_setting('plan_cache_mode')")
            assert plans.scalar() == "auto"


@pytest.mark.parametrize(
    ("path", "other"),
    [("/api/v1/mailboxes", "limit=5"), ("/api/v1/exports/mailboxes", "format=csv")],
)
async def test_a_parameter_given_twice_is_refused_not_settled_by_the_last(client, path, other):
    """`q=ab&q=abc` would pass if only the last value were weighed; each key is named."""
    key = other.split("=")[0]
    both = await client.get(f"{path}?{other}&q=ab&q=abcd&{other}", headers=CREDS)
    assert both.status_code == 422
    assert [d["loc"] for d in both.json()["detail"]] == sorted([["query", key], ["query", "q"]])
    once = await client.get(f"{path}?{other}&q=abcd", headers=CREDS)
    assert once.status_code == 200
