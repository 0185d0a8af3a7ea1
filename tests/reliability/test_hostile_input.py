"""Whatever a sender or an attacker posts: never a 5xx, always the contract's status, and
nothing stored but the rejected-delivery record."""

import math
from typing import Any
from urllib.parse import quote

import asyncpg
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from app.reading import resources
from app.simulation import traffic
from tests.conftest import CREDENTIALS_TOKEN, WEBHOOK_TOKEN, deliver, sender_signature

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats() | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)
handled = st.sampled_from(
    [
        traffic.mailbox_order_success,
        traffic.mailbox_order_failed,
        traffic.mailbox_created,
        lambda: traffic.mailbox_updated("mbx", {"firstName": "A"}),
        lambda: traffic.prewarmup_success(domains=1, per_domain=1),
        lambda: traffic.prewarmup_failed(order_id="o", failures={"a.com": "r"}),
    ]
)


def mutate(payload: dict[str, Any], path: list[str], value: Any, drop: bool) -> dict[str, Any]:
    """Replace or drop one field somewhere in a valid payload."""
    node = payload
    for key in path[:-1]:
        child = node.get(key) if isinstance(node, dict) else None
        if not isinstance(child, dict):
            break
        node = child
    keys = list(node)
    key = path[-1] if path[-1] in node else keys[hash(path[-1]) % len(keys)]
    if drop:
        node.pop(key)
    else:
        node[key] = value
    return payload


async def counts(db: asyncpg.Connection) -> tuple[int, int]:
    events = await db.fetchval("select count(*) from events")
    rejected = await db.fetchval("select count(*) from rejected_deliveries")
    return events, rejected


async def check(client, db, body: bytes, **kwargs: Any) -> int:
    before = await counts(db)
    response = await deliver(client, body, **kwargs)
    events, rejected = await counts(db)
    status = response.status_code
    assert status in {200, 400, 401, 413, 422}, (status, response.text)
    assert response.headers["content-type"] == "application/json"
    if status == 200:
        assert (events, rejected) in {(before[0] + 1, before[1]), (before[0], before[1])}
    elif status in (400, 422):
        assert (events, rejected) == (before[0], before[1] + 1)
    else:
        assert (events, rejected) == before
    return status


@FUZZ
@given(value=json_values)
async def test_any_json_value(client, db, value):
    await check(client, db, orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS))


@FUZZ
@given(
    make=handled,
    path=st.lists(
        st.sampled_from(
            [
                "data",
                "mailboxDetails",
                "price",
                "orderId",
                "subscriptionId",
                "event",
                "eventId",
                "updatedFields",
                "failedOrders",
                "workspaceType",
                "expiryDate",
                "x",
            ]
        ),
        min_size=1,
        max_size=3,
    ),
    value=json_values,
    drop=st.booleans(),
)
async def test_mutated_valid_payloads(client, db, make, path, value, drop):
    status = await check(
        client, db, orjson.dumps(mutate(make(), path, value, drop), option=orjson.OPT_NON_STR_KEYS)
    )
    assert status != 401


@FUZZ
@given(body=st.binary(max_size=300))
async def test_arbitrary_bytes(client, db, body):
    assert await check(client, db, body) in {200, 400, 422}


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"event": "a.b", "eventId": "x", "data": ' + b'{"a":' * 5000 + b"1" + b"}" * 5001,
        b'{"event": "mailbox.created", "eventId": "x", "data": {"price": NaN}}',
        b'{"event": "mailbox.created", "eventId": "x", "data": {"price": 1e400}}',
        b'{"event": "a", "event": "b", "eventId": "x"}',
        b'{"event": "mailbox.created", "eventId": "\xed\xa0\x80"}',
        b'{"event": "mailbox.created", "eventId": "\\ud800", "data": {}}',
        b'{"event": "mailbox.created", "eventId": "' + b"x" * 10_000 + b'"}',
        orjson.dumps(traffic.mailbox_created(domain="d" * 4_000_000)),
        b'{"event": "mailbox.created", "eventId": "y", "data": {"price": 1' + b"0" * 30 + b"}}",
        b'{"event": "a.b", "eventId": "big", "data": {"n": 1' + b"0" * 30 + b"}}",
    ],
    ids=[
        "deep-array",
        "deep-object",
        "nan",
        "huge-float",
        "duplicate-keys",
        "bad-utf8",
        "lone-surrogate",
        "long-event-id",
        "huge-string",
        "huge-price",
        "big-int",
    ],
)
async def test_pathological_bodies(client, db, body):
    await check(client, db, body)


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", ""]
)
async def test_wrong_content_types_are_judged_by_the_body(client, db, content_type):
    payload = orjson.dumps(traffic.mailbox_created())
    assert await check(client, db, payload, headers={"content-type": content_type}) == 200
    assert await check(client, db, b"a=b&c=d", headers={"content-type": content_type}) == 400


# --- the read API, driven from its own OpenAPI document -----------------------------------

junk = st.one_of(
    st.text(max_size=30),
    st.integers(-(10**6), 10**6).map(str),
    st.sampled_from(
        ["", "0", "-1", "501", "true", "2026-01-01", "GOOGLE", "%00", "'; drop table mailboxes; --"]
    ),
)


@FUZZ
@given(data=st.data())
async def test_read_api_answers_every_parameter_with_its_documented_schema(client, data):
    spec = (await client.get("/openapi.json")).json()
    path = data.draw(st.sampled_from(sorted(p for p in spec["paths"] if p.startswith("/api"))))
    operation = spec["paths"][path]["get"]
    params = {}
    for parameter in operation.get("parameters", []):
        if parameter["in"] == "query" and data.draw(st.booleans()):
            params[parameter["name"]] = data.draw(junk)
    if data.draw(st.booleans()):
        params[data.draw(st.text(min_size=1, max_size=8))] = data.draw(junk)
    url = path
    for parameter in operation.get("parameters", []):
        if parameter["in"] == "path":
            value = quote(data.draw(junk), safe="") or "x"
            url = url.replace("{" + parameter["name"] + "}", value)
    response = await client.get(
        url, params=params, headers={"Authorization": f"Bearer {CREDENTIALS_TOKEN}"}
    )
    assert response.status_code in {200, 404, 422}, (url, params, response.text)
    body = response.json()
    if response.status_code == 422:
        assert body["error"] == "invalid_request"
        assert all(set(d) == {"loc", "msg", "type"} for d in body["detail"])
    elif response.status_code == 404:
        assert body == {"error": "not_found"}
    else:
        schema_name = operation["responses"]["200"]["content"]["application/json"]["schema"]
        model = response_model(schema_name)
        model.validate_python(body, by_alias=True, by_name=False)


def response_model(schema: dict[str, Any]) -> TypeAdapter[Any]:
    name = schema["$ref"].rsplit("/", 1)[1]
    if name.startswith("Page_"):
        item = getattr(resources, name.removeprefix("Page_").removesuffix("_"))
        return TypeAdapter(resources.Page[item])  # type: ignore[valid-type]
    return TypeAdapter(getattr(resources, name))


async def test_signature_replayed_on_another_body_or_too_late_is_refused(client, db):
    original = orjson.dumps(traffic.mailbox_created())
    headers = sender_signature(original)
    forged = orjson.dumps(traffic.mailbox_created())
    other_body = await client.post(
        "/webhooks/cmr", content=forged, headers=headers, params={"token": WEBHOOK_TOKEN}
    )
    late = sender_signature(original, timestamp=int(math.floor(1_600_000_000)))
    too_late = await client.post(
        "/webhooks/cmr", content=original, headers=late, params={"token": WEBHOOK_TOKEN}
    )
    assert other_body.status_code == too_late.status_code == 401
    assert await counts(db) == (0, 0)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/nowhere"),
        ("GET", "/api/v1/events/"),
        ("DELETE", "/api/v1/stats"),
        ("GET", "/webhooks/cmr"),
    ],
)
async def test_unknown_routes_and_methods_answer_in_the_error_shape(client, method, path):
    response = await client.request(method, path)
    assert response.status_code in {404, 405}
    assert response.json()["error"] in {"not_found", "method_not_allowed"}


async def test_every_secret_comparison_is_constant_time(client, monkeypatch):
    import hmac  # noqa: PLC0415

    calls: list[int] = []
    original = hmac.compare_digest

    def counting(a: Any, b: Any) -> bool:
        calls.append(1)
        return original(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    await deliver(client, traffic.mailbox_created())
    webhook_calls = len(calls)
    await client.get("/api/v1/stats", headers={"Authorization": "Bearer nope"})
    assert webhook_calls >= 2  # the token, then the signature
    assert len(calls) > webhook_calls  # the bearer token
