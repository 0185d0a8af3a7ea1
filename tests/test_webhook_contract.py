"""Every row of the answers table in docs/webhooks.md, through the real app and database."""

import base64
import hashlib
import hmac
import logging
import re
import time

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.datastructures import QueryParams

from app.receiving import route, signing
from app.simulation import traffic as factories
from tests.conftest import SIGNING_KEY, WEBHOOK_TOKEN, app_client, deliver, make_settings


async def test_new_event_is_processed_and_committed(client, db):
    payload = factories.mailbox_created()
    response = await deliver(client, payload)
    assert response.status_code == 200
    assert response.json() == {
        "status": "processed",
        "eventId": payload["eventId"],
        "event": "mailbox.created",
    }
    row = await db.fetchrow("select status, deliveries, signature, signature_form from events")
    assert dict(row) == {
        "status": "processed",
        "deliveries": 1,
        "signature": "valid",
        "signature_form": "timestamp.body:hex",
    }


async def test_identical_replay_is_a_duplicate_with_no_effect(client, db):
    payload = factories.mailbox_created()
    await deliver(client, payload)
    updated_before = await db.fetchval("select updated_at from mailboxes")
    # Same content, different key order and spacing: canonical JSON makes it the same event.
    reordered = orjson.dumps(dict(reversed(list(payload.items()))), option=orjson.OPT_INDENT_2)
    response = await deliver(client, reordered)
    assert response.json()["status"] == "duplicate"
    assert await db.fetchval("select deliveries from events") == 2
    assert await db.fetchval("select count(*) from events") == 1
    assert await db.fetchval("select updated_at from mailboxes") == updated_before


async def test_unhandled_event_type_is_stored_as_ignored(client, db):
    payload = factories.envelope("dns-record.updated", {"domain": "a.com", "userId": "u1"})
    response = await deliver(client, payload)
    assert response.status_code == 200
    assert response.json()["status"] == "ignored"
    assert await db.fetchval("select status from events") == "ignored"
    assert await db.fetchval("select count(*) from subscriptions") == 0


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"eventId": "x", "data": {}}', "'event'"),
        (b'{"event": "mailbox.created", "eventId": 7, "data": {}}', "'eventId'"),
        (b'{"event": "", "eventId": "x"}', "'event'"),
        (b"\xff\xfe{}", "not valid JSON"),
        (b'{"event": "a.b", "eventId": "x", "data": {"n": "\\u0000"}}', "NUL"),
    ],
)
async def test_malformed_body_is_400_invalid_json(client, db, body, fragment):
    response = await deliver(client, body)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_json"
    assert fragment in response.json()["message"]
    assert await db.fetchval("select count(*) from events") == 0
    assert await db.fetchval("select reason from rejected_deliveries") == "invalid_json"


@pytest.mark.parametrize(
    ("token", "signing_key", "headers"),
    [
        (None, SIGNING_KEY, None),
        ("wrong-token", SIGNING_KEY, None),
        (WEBHOOK_TOKEN, None, None),
        (WEBHOOK_TOKEN, "another-key", None),
        (WEBHOOK_TOKEN, SIGNING_KEY, {"cmr-x-timestamp": str(int(time.time()) - 3600)}),
    ],
    ids=["no-token", "wrong-token", "unsigned", "wrong-key", "stale-timestamp"],
)
async def test_failed_authentication_is_401_and_stores_nothing(
    client, db, token, signing_key, headers
):
    response = await deliver(
        client, factories.mailbox_created(), token=token, signing_key=signing_key, headers=headers
    )
    assert response.status_code == 401
    assert response.json() == {"error": "unauthorized"}
    assert await db.fetchval("select count(*) from events") == 0
    assert await db.fetchval("select count(*) from rejected_deliveries") == 0


async def test_token_may_come_in_a_header(client):
    payload = orjson.dumps(factories.mailbox_created())
    headers = signing.sign(SIGNING_KEY, payload) | {"x-webhook-token": WEBHOOK_TOKEN}
    response = await client.post("/webhooks/cmr", content=payload, headers=headers)
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("query", "answered"),
    [
        ("token={t}", 200),
        ("a=1&&token={t}&b", 200),
        ("token=wrong&token={t}", 200),  # the last one counts
        ("token={t}&token=wrong", 401),
        ("%74oken={t}", 200),  # the name percent-encoded
        ("token={t}%20", 401),
        ("token=&x=1", 401),
    ],
)
async def test_the_query_token_is_read_as_any_query_parameter(client, query, answered):
    payload = orjson.dumps(factories.mailbox_created())
    headers = signing.sign(SIGNING_KEY, payload)
    url = "/webhooks/cmr?" + query.format(t=WEBHOOK_TOKEN)
    response = await client.post(url, content=payload, headers=headers)
    assert response.status_code == answered


@pytest.mark.parametrize(
    "query",
    [
        b"", b"token", b"token=", b"token=a&token=b", b"token=a&token=", b"%74oken=x",
        b"to+ken=y", b"tok%2Ben=y", b"token=a+b%20c", b"token=%C3%A9", b"token=%E9",
        b"token=\xe9", b"a=1&&token=z&b", b"token=a=b", b"x=1", b"token=%zz", b"=token",
        b"TOKEN=1", b"token%3Dx=1", b"token;x=1", b"x=1;token=2",
    ],
)  # fmt: skip
def test_the_query_token_is_what_starlette_parses(query):
    """route.query_token against Starlette's own parser (what request.query_params gives)."""
    assert route.query_token(query) == QueryParams(query).get("token")


async def test_body_over_the_limit_is_413(client, db, settings):
    big = orjson.dumps(factories.envelope("domain.x", {"pad": "x" * settings.max_body_bytes}))
    response = await deliver(client, big)
    assert response.status_code == 413
    assert response.json() == {"error": "payload_too_large"}
    assert await db.fetchval("select count(*) from rejected_deliveries") == 0


async def test_schema_violation_is_422_kept_encrypted_and_not_echoed(client, db):
    secret = factories.canary("pw")
    payload = factories.mailbox_created(
        provider="MICROSOFT",
        subscriptionId="",
        details={"password": secret, "appPassword": {"not": "text"}, "mailboxId": None},
    )
    response = await deliver(client, payload)
    assert response.status_code == 422
    body = response.json()
    assert body["error"] == "invalid_payload"
    assert {tuple(d["loc"]) for d in body["detail"]} == {
        ("data", "subscriptionId"),
        ("data", "mailboxDetails", "mailboxId"),
        ("data", "mailboxDetails", "appPassword"),
    }
    assert all(set(d) == {"loc", "msg", "type"} for d in body["detail"])
    for sent in ("not", "text", secret):
        assert sent not in response.text
    row = await db.fetchrow(
        "select reason, event, event_id, body_encrypted from rejected_deliveries"
    )
    assert (row["reason"], row["event"], row["event_id"]) == (
        "invalid_payload",
        "mailbox.created",
        payload["eventId"],
    )
    assert secret.encode() not in row["body_encrypted"]
    assert await db.fetchval("select count(*) from events") == 0


DEAD_DATABASE = "postgresql+asyncpg://postgres@127.0.0.1:1/nothing"


async def test_database_unreachable_queues_the_delivery_in_the_spool(capsys):
    """A service that starts while the database is away: the first delivery (which needs
    the hashing key the database keeps) is queued, and the operator reads one line saying
    why the database cannot be reached."""
    async with app_client(make_settings(DEAD_DATABASE)) as client:
        response = await deliver(client, factories.mailbox_created())
        ready = await client.get("/readyz")
    away = r"coldmail\.receiver .*database unreachable \((.*)\): deliveries go to the spool"
    [cause] = re.findall(away, capsys.readouterr().err)
    assert cause.startswith("ConnectionRefusedError: ")
    assert response.status_code == 200
    assert response.json()["status"] == "queued"
    assert ready.status_code == 200
    assert ready.json() == {
        "database": "down",
        "revision": None,
        "spool": {
            "depth": 1,
            "oldestSeconds": ready.json()["spool"]["oldestSeconds"],
            "room": True,
        },
    }


async def test_database_unreachable_and_spool_full_is_503_with_retry_after():
    settings = make_settings(DEAD_DATABASE, spool_max_bytes=1024)
    async with app_client(settings) as client:
        response = await deliver(client, factories.prewarmup_success(domains=2, per_domain=2))
        ready = await client.get("/readyz")
    assert response.status_code == 503
    assert response.json() == {"error": "unavailable"}
    assert response.headers["retry-after"].isdigit()
    assert ready.json()["spool"]["depth"] == 0


async def test_same_event_id_with_other_content_is_applied_and_flagged(client, db):
    first = factories.mailbox_created()
    second = factories.mailbox_created()
    second["eventId"] = first["eventId"]
    conflicts_before = await conflicts_counted(client)
    assert (await deliver(client, first)).json()["status"] == "processed"
    response = await deliver(client, second)
    assert response.json() == {
        "status": "processed",
        "eventId": first["eventId"],
        "event": "mailbox.created",
        "conflict": True,
    }
    assert await db.fetchval("select count(*) from mailboxes") == 2
    assert await db.fetch("select conflict from events") == [(True,), (True,)]
    assert await conflicts_counted(client) == conflicts_before + 1


async def conflicts_counted(client) -> float:
    for family in text_string_to_metric_families((await client.get("/metrics")).text):
        if family.name == "cmr_webhook_conflicts":
            return sum(s.value for s in family.samples if s.name.endswith("_total"))
    return 0.0


async def test_report_mode_records_a_bad_signature_instead_of_refusing(database_url, db):
    async with app_client(make_settings(database_url, cmr_signature_mode="report")) as client:
        unsigned = await deliver(client, factories.mailbox_created(), signing_key=None)
        forged = await deliver(client, factories.mailbox_created(), signing_key="forged")
    assert unsigned.status_code == forged.status_code == 200
    assert sorted(r["signature"] for r in await db.fetch("select signature from events")) == [
        "absent",
        "invalid",
    ]


# Fixed vectors, made with openssl (`printf '%s' "$T.$BODY" | openssl dgst -sha256 -hmac $KEY`),
# not with the service's code.
VECTOR_KEY, VECTOR_TS = "cmr-test-vector-key", "1764000000"
VECTOR_BODY = b'{"event":"mailbox.created","eventId":"V1","data":{}}'
VECTORS = {
    "timestamp.body:hex": "7859e0d3503bfab932f42f53c267b23ef39269fe316fef1401331cec74dcce2e",
    "timestamp.body:base64": "eFng01A7+rky9C9TwmeyPvOSaf4xb+8UATMc7HTczi4=",
    "body:hex": "b04172040b0eebfcec3b847c4a77e1e4515a3a9c1cd28829b00654281c33fd40",
    "body:base64": "sEFyBAsO6/zsO4R8Snfh5FFaOpwc0ogpsAZUKBwz/UA=",
}


@pytest.mark.parametrize("form", sorted(VECTORS))
def test_each_signature_form_matches_its_fixed_vector(form):
    check = signing.verify(
        VECTOR_KEY,
        VECTOR_BODY,
        signature=VECTORS[form],
        timestamp=VECTOR_TS,
        tolerance=300,
        now=float(VECTOR_TS),
    )
    assert (check.result, check.form) == ("valid", form)


def test_an_hmac_sha1_is_not_a_signature():
    sha1 = hmac.new(VECTOR_KEY.encode(), f"{VECTOR_TS}.".encode() + VECTOR_BODY, hashlib.sha1)
    check = signing.verify(
        VECTOR_KEY,
        VECTOR_BODY,
        signature=sha1.hexdigest(),
        timestamp=VECTOR_TS,
        tolerance=300,
        now=float(VECTOR_TS),
    )
    assert check.result == "invalid"


def sender_digest(message: bytes, encoding: str) -> str:
    raw = hmac.new(SIGNING_KEY.encode(), message, hashlib.sha256).digest()
    return raw.hex() if encoding == "hex" else base64.b64encode(raw).decode()


@pytest.mark.parametrize("form", sorted(VECTORS))
async def test_every_candidate_signature_form_is_accepted_and_recorded(client, db, form):
    body = orjson.dumps(factories.mailbox_created())
    ts = str(int(time.time()))
    message = f"{ts}.".encode() + body if form.startswith("timestamp.") else body
    headers = {"cmr-x-signature": sender_digest(message, form.split(":")[1]), "cmr-x-timestamp": ts}
    response = await client.post(
        "/webhooks/cmr", content=body, params={"token": WEBHOOK_TOKEN}, headers=headers
    )
    assert response.status_code == 200
    assert await db.fetchval("select signature_form from events") == form


async def test_logs_hold_no_secret_token_or_body(client, caplog):
    caplog.set_level(logging.DEBUG)
    payload = factories.mailbox_created(provider="MICROSOFT")
    secret = payload["data"]["mailboxDetails"]["password"]
    assert (await deliver(client, payload)).status_code == 200
    rejected = factories.mailbox_created(details={"mailboxId": ""})
    rejected["data"]["mailboxDetails"]["password"] = secret
    assert (await deliver(client, rejected)).status_code == 422
    assert (await deliver(client, b'{"broken": "' + secret.encode())).status_code == 400
    assert (await deliver(client, b"{broken", token="guess")).status_code == 401
    server_records = [r for r in caplog.records if not r.name.startswith("httpx")]
    text = "\n".join(r.getMessage() + repr(r.__dict__) for r in server_records)
    assert payload["eventId"] in text  # the delivery was logged
    for leak in (secret, WEBHOOK_TOKEN, SIGNING_KEY, "guess", "oauth-callback"):
        assert leak not in text
