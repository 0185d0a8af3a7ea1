"""Destinations as declared (DESTINATIONS_FILE) and messages written in the caller's
transaction (app/outbound/messages.py)."""

import asyncio
import base64
import importlib.util
import json
import os
import re
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, get_args

import asyncpg
import orjson
import pytest
from pydantic import BaseModel

from app.config import ConfigError
from app.crypto import DESCRIPTIVE, redact
from app.destinations import Destination, check_network, load
from app.hashing import Hasher
from app.outbound.dispatch import CLAIM, message
from app.outbound.messages import credential_named, enqueue, forward_many, without_credentials
from app.receiving import payloads
from app.recording.forwarding import CREDENTIAL_FIELDS, data_of, jsonb_keys, jsonb_order
from app.simulation import traffic
from tests.conftest import asyncpg_dsn, with_database
from tests.test_keyed_hashes import migrate

SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()


def destination(**given) -> Destination:
    fields = {"name": "crm", "url": "https://crm.example.com/h", "format": "standard-webhooks"}
    fields |= {"events": ["*"], "secretEnv": "CRM_SECRET"} | given
    return load_one(fields)


def load_one(fields, env=None) -> Destination:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as file:
        json.dump({"destinations": [fields]}, file)
    try:
        return load(Path(file.name), {"CRM_SECRET": SECRET} if env is None else env)[0]
    finally:
        os.unlink(file.name)


def refusal(fields, env=None) -> str:
    with pytest.raises(ConfigError) as error:
        load_one(fields, env)
    message = str(error.value)
    assert "\n" not in message and message.startswith("DESTINATIONS_FILE: ")
    return message


BASE = {
    "name": "crm",
    "url": "https://crm.example.com/h",
    "format": "standard-webhooks",
    "events": ["order.*"],
    "secretEnv": "CRM_SECRET",
}


def test_a_declared_destination_takes_its_secret_from_the_environment(tmp_path):
    path = tmp_path / "destinations.yaml"
    path.write_text(
        "destinations:\n"
        "  - name: crm\n    url: https://crm.example.com/h\n    format: standard-webhooks\n"
        "    events: ['order.*']\n    secretEnv: CRM_SECRET\n    userIds: [u1]\n"
        "  - name: ops\n    urlEnv: SLACK_URL\n    format: slack\n    events: ['*']\n"
    )
    crm, ops = load(path, {"CRM_SECRET": SECRET, "SLACK_URL": "https://hooks.slack.com/x"})
    assert crm.secret is not None and crm.secret.get_secret_value() == SECRET
    assert crm.user_ids == frozenset({"u1"}) and not crm.allow_private_network
    assert ops.url == "https://hooks.slack.com/x" and ops.secret is None
    assert load(None) == []


@pytest.mark.parametrize(
    "change, env, says",
    [
        ({"url": "ftp://crm.example.com"}, None, "destination 'crm': url must be an http"),
        ({"format": "xml"}, None, "destination 'crm': format"),
        ({}, {}, "CRM_SECRET (its secretEnv) is not set"),
        ({}, {"CRM_SECRET": "hunter2hunter2"}, "CRM_SECRET is not a whsec_ secret"),
        ({"secretEnv": None}, None, "needs secretEnv"),
        ({"events": []}, None, "events"),
        ({"colour": "red"}, None, "colour"),
    ],
)
def test_an_unusable_destination_is_refused_in_one_line(change, env, says):
    message = refusal(BASE | change, env)
    assert says in message
    assert "hunter2" not in message


def test_an_internal_address_is_refused_unless_allowed():
    for url in ("http://127.0.0.1:9/h", "http://10.1.2.3/h", "http://169.254.169.254/x"):
        with pytest.raises(ConfigError, match="internal address"):
            check_network([load_one(BASE | {"url": url})])
    check_network([load_one(BASE | {"url": "http://127.0.0.1:9/h", "allowPrivateNetwork": True})])
    with pytest.raises(ConfigError, match="does not resolve"):
        check_network([load_one(BASE | {"url": "https://no-such-host.invalid/h"})])


def test_wildcards_and_user_filters_choose_the_destinations():
    orders = destination(events=["order.*"])
    assert orders.wants("order.failed", None) and orders.wants("order.partially_failed", "u")
    assert not orders.wants("mailbox.created", None) and not orders.wants("orders", None)
    mailbox = destination(events=["mailbox.*", "spool.started"], userIds=["u1"])
    assert mailbox.wants("mailbox.order.success", "u1")
    assert not mailbox.wants("mailbox.order.success", "u2")
    assert not mailbox.wants("spool.started", None)


async def test_messages_are_written_with_their_cause_and_never_without_it(db):
    wanted = [destination(name="a", events=["order.*"]), destination(name="b", events=["*"])]
    data = {"orderId": "o1", "mailboxes": [{"email": "x@y.z", "password": "hunter2"}]}
    async with db.transaction():
        assert await enqueue(db, wanted, "order.failed", data, user_id="u1") == 2
    with pytest.raises(RuntimeError):
        async with db.transaction():
            await enqueue(db, wanted, "order.failed", {"orderId": "o2"})
            raise RuntimeError("the cause failed")
    assert await enqueue(db, wanted, "mailbox.created", {}) == 1
    rows = await db.fetch("SELECT * FROM outbound_messages ORDER BY id")
    assert [(r["destination"], r["type"]) for r in rows] == [
        ("a", "order.failed"),
        ("b", "order.failed"),
        ("b", "mailbox.created"),
    ]
    assert all(r["status"] == "pending" and r["attempts"] == 0 for r in rows)
    assert len({r["webhook_id"] for r in rows}) == 3
    assert json.loads(rows[0]["payload"]) == {"orderId": "o1", "mailboxes": [{"email": "x@y.z"}]}
    assert rows[0]["user_id"] == "u1"


async def test_many_forwarded_messages_are_written_by_one_statement_with_their_cause(db):
    """forward_many (a group commit's forwarded events): each message once per destination
    it names, naming its event and copying none of its data, in the caller's transaction;
    a cause that fails leaves none."""
    at = datetime(2026, 12, 5, 18, 0, tzinfo=UTC)
    given: list[list[Any]] = [
        [7, ["a", "b"], "mailbox.created", "u1", at],
        [8, ["b"], "mailbox.updated", None, at],
    ]
    with pytest.raises(RuntimeError):
        async with db.transaction():
            assert await forward_many(db, given) == 3
            raise RuntimeError("the cause failed")
    assert await db.fetchval("SELECT count(*) FROM outbound_messages") == 0
    async with db.transaction():
        assert await forward_many(db, given) == 3
        assert await forward_many(db, []) == 0
    rows = await db.fetch("SELECT * FROM outbound_messages ORDER BY destination, type")
    assert [(r["destination"], r["type"], r["user_id"], r["event_id"]) for r in rows] == [
        ("a", "mailbox.created", "u1", 7),
        ("b", "mailbox.created", "u1", 7),
        ("b", "mailbox.updated", None, 8),
    ]
    assert [r["payload"] for r in rows] == [None, None, None]
    assert [r["occurred_at"] for r in rows] == [at, at, at]
    assert len({r["webhook_id"] for r in rows}) == 3
    assert {r["status"] for r in rows} == {"pending"}


def stored_copy(sent: dict[str, Any]) -> dict[str, Any]:
    """The event's redacted copy, as recording stores it (events.payload)."""
    copy: dict[str, Any] = redact(
        payloads.parse_envelope(orjson.dumps(sent), Hasher(os.urandom(32)))
    )
    return copy


def test_a_forwarded_event_has_no_credential_at_any_depth():
    """Each of the sender's credential fields is named like a credential, so forwarding
    drops it wherever it stands (a prewarmup order's mailboxes, two lists deep), and keeps
    every other declared field."""
    assert CREDENTIAL_FIELDS and all(credential_named(name) for name in CREDENTIAL_FIELDS)
    sent = traffic.prewarmup_success(domains=2, per_domain=2)
    data = data_of(stored_copy(sent), sent["eventId"], datetime.now(UTC))
    body = orjson.dumps(data)
    assert traffic.CANARY_PREFIX.encode() not in body and b"REDACTED" not in body
    assert not any(re.search(name, body.decode()) for name in CREDENTIAL_FIELDS)
    boxes = [box for domain in data["mailboxDetails"] for box in domain["preWarmedUpMailboxes"]]
    given = [box for d in sent["data"]["mailboxDetails"] for box in d["preWarmedUpMailboxes"]]
    assert [box["email"] for box in boxes] == [box["email"] for box in given]
    assert data["orderId"] == sent["data"]["orderId"]


AT = datetime(2026, 12, 5, 18, 0, 1, 250000, tzinfo=UTC)
HEAD = {"eventId": "E1", "eventTime": "2026-12-05T18:00:01.250000Z"}


def test_an_event_type_we_do_not_model_forwards_only_what_its_stored_copy_shows():
    """An event type we do not model: its eventId and time, then the fields its stored
    copy shows, without those it hides (a field named like nothing we know, a bare list
    item, wherever they stand), every object's keys in jsonb's order (shorter first), as a
    copied message's data came back."""
    box = {"mailboxId": "mb1", "email": "a@x.example", "smtpPass": traffic.canary("smtp")}
    sent = traffic.envelope(
        "mailbox.frozen",
        {"status": "frozen", "pwd": traffic.canary("pwd"), "mailboxDetails": [box, "hunter2"]}
        | {"reason": "unpaid"},
    )
    data = data_of(stored_copy(sent), "E1", AT)
    box_shown = {"email": "a@x.example", "mailboxId": "mb1"}
    shown = {"reason": "unpaid", "status": "frozen"} | HEAD | {"mailboxDetails": [box_shown]}
    assert orjson.dumps(data) == orjson.dumps(shown)  # key order too
    assert traffic.CANARY_PREFIX.encode() not in orjson.dumps(data)


def test_a_stored_copy_that_no_longer_validates_forwards_what_it_shows():
    """A copy of a modelled type that its model refuses now (a release's stricter model)
    goes out as an unmodelled one would: what the copy shows; no data at all, the head."""
    refused: dict[str, Any] = {"userId": "u1", "mailboxDetails": 7, "domain": "a.com"}
    stored = {"event": "mailbox.created", "eventId": "E1", "data": refused}
    data = data_of(stored, "E1", AT)
    assert orjson.dumps(data) == orjson.dumps(
        {"domain": "a.com", "userId": "u1"} | HEAD | {"mailboxDetails": 7}
    )
    assert data_of({"event": "mailbox.frozen", "eventId": "E1"}, "E1", AT) == HEAD
    assert data_of({"event": "mailbox.frozen", "eventId": "E1", "data": "x"}, "E1", AT) == HEAD


def declared_names(model: Any) -> set[str]:
    """Every field name a payload model declares, at any depth."""
    names: set[str] = set()
    for name, info in model.model_fields.items():
        names.add(name)
        for inner in getattr(info.annotation, "__args__", ()) + (info.annotation,):
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                names |= declared_names(inner)
    return names


def test_the_stored_copy_shows_every_declared_field_but_the_credentials():
    """What forwarding builds from the stored copy is what the delivery's own model held:
    the copy (app/crypto.redact) shows each field the payload models declare, hiding only
    the credentials (which forwarding drops anyway)."""
    union, _ = get_args(payloads.HandledEvent)  # Annotated[Union[...], its discriminator]
    models = [payloads.Envelope, *get_args(union)]
    declared = set().union(*(declared_names(model) for model in models))
    assert {"mailboxDetails", "preWarmedUpMailboxes", "failedOrders", "email"} <= declared
    assert declared - DESCRIPTIVE == set(CREDENTIAL_FIELDS)


async def copied_before(db: asyncpg.Connection, sent: dict[str, Any], at: datetime) -> bytes:
    """A forwarded event's data as its message sent it before migration 0029: the
    delivery's model dumped, credentials dropped, copied into the message's jsonb and read
    back from it (the sender's extra fields aside)."""
    envelope = payloads.parse_envelope(orjson.dumps(sent), Hasher(os.urandom(32)))
    model = payloads.parse_handled(envelope, [])
    assert model is not None
    fields = model.data.model_dump(mode="json", exclude_none=True)
    head = {"eventId": sent["eventId"], "eventTime": at.isoformat().replace("+00:00", "Z")}
    copied = orjson.dumps(without_credentials(head | fields)).decode()
    return orjson.dumps(orjson.loads(await db.fetchval("SELECT $1::jsonb::text", copied)))


EVERY_KIND = [
    traffic.mailbox_created(),
    traffic.mailbox_order_success(price=0.30000000000000004, workspaceType="g suite"),
    traffic.mailbox_order_failed(),
    traffic.mailbox_updated("m1", {"firstName": "Al", "lastName": 7}),
    traffic.prewarmup_success(domains=2, per_domain=2),
    traffic.prewarmup_failed(order_id="o1", failures={"a.com": "DNS", "b.com": "taken"}),
    traffic.envelope(
        "subscription.renewal.failed",
        {"subscriptionId": "s1", "periodEnd": "2026-01-01T00:00:00.123Z", "autoRenew": "true"},
    ),
    traffic.envelope("domain.grace_period", {"domain": "a.com", "status": "grace period"}),
    traffic.envelope(
        "mailbox.exported", {"mailboxDetails": {"mailboxId": "m1", "password": "canary-p"}}
    ),
]


@pytest.mark.parametrize("sent", EVERY_KIND, ids=[sent["event"] for sent in EVERY_KIND])
async def test_the_data_built_from_the_stored_copy_is_the_data_a_message_copied(db, sent):
    """Every kind of event: the data the dispatcher builds from the stored copy is, byte
    for byte (key order too), the data its message sent when it held a copy."""
    at = datetime(2026, 12, 5, 18, 0, 1, 250000, tzinfo=UTC)
    built = orjson.dumps(data_of(stored_copy(sent), sent["eventId"], at))
    assert built == await copied_before(db, sent, at)
    assert traffic.CANARY_PREFIX.encode() not in built


async def test_keys_are_ordered_as_postgresql_jsonb_orders_them(db):
    """Shorter by bytes first, then bytewise, at any depth: what PostgreSQL answers."""
    keys = ["b", "aa", "é", "Z", "ab", "a", "zz", "€", "aé", "userId", "eventId"]
    value = {key: {"é": 1, "b": [{"zz": 1, "ä": 2}], "aa": 3} for key in keys}
    theirs = await db.fetchval("SELECT $1::jsonb::text", orjson.dumps(value).decode())
    assert orjson.dumps(jsonb_order(value)) == orjson.dumps(orjson.loads(theirs))
    assert jsonb_keys(keys) == list(orjson.loads(theirs))


async def test_webhook_ids_are_unique_and_in_the_order_messages_were_written(db):
    everyone = [destination(name="a", events=["*"]), destination(name="b", events=["*"])]
    for n in range(3):
        async with db.transaction():
            await enqueue(db, everyone, "order.failed", {"orderId": f"o{n}"})
    ids = [r["webhook_id"] for r in await db.fetch("SELECT * FROM outbound_messages ORDER BY id")]
    # 'msg_', 16 hex digits of a sequence, 20 random: unique by construction (no index
    # checks it), and in the order written
    assert all(re.fullmatch("msg_[0-9a-f]{36}", webhook_id) for webhook_id in ids)
    assert len(set(ids)) == 6 and ids == sorted(ids)
    assert len({webhook_id[20:] for webhook_id in ids}) == 6  # the random tails differ too


@pytest.fixture
async def at_0022(server_url: str) -> Any:
    """An empty database migrated only as far as 0022, dropped afterwards."""
    name = f"cmw_at_0022_{os.getpid()}_{id(object())}"
    admin = await asyncpg.connect(asyncpg_dsn(with_database(server_url, "postgres")))
    await admin.execute(f"CREATE DATABASE {name}")
    url = with_database(server_url, name)
    try:
        await asyncio.to_thread(migrate, url, "0022")
        yield url
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


async def test_messages_written_before_0023_keep_their_ids_and_none_is_given_again(at_0022):
    everyone = [destination(name="a", events=["*"]), destination(name="b", events=["*"])]
    conn = await asyncpg.connect(asyncpg_dsn(at_0022))
    try:
        await enqueue(conn, everyone, "order.failed", {"orderId": "before"})
        before = await conn.fetch("SELECT id, webhook_id FROM outbound_messages ORDER BY id")
        await asyncio.to_thread(migrate, at_0022, "head")
        await enqueue(conn, everyone, "order.failed", {"orderId": "after"})
        rows = await conn.fetch("SELECT id, webhook_id FROM outbound_messages ORDER BY id")
    finally:
        await conn.close()
    assert rows[:2] == before
    assert all(re.fullmatch("msg_[0-9a-f]{32}", r["webhook_id"]) for r in rows[:2])
    assert all(re.fullmatch("msg_[0-9a-f]{36}", r["webhook_id"]) for r in rows[2:])
    assert len({r["webhook_id"] for r in rows}) == 4


def migration(name: str) -> Any:
    path = Path(__file__).resolve().parent.parent / "alembic" / "versions" / name
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_copied_and_referenced_messages_are_both_sent_and_a_downgrade_copies_back(db):
    """A message that holds its data (derived, or forwarded before migration 0029) is sent
    with that data; one naming its event, with the data built from the event's copy. Going
    back to 0028 gives the latter a copy of what the stored copy shows (no credential)."""
    sent = traffic.mailbox_created()
    stored = orjson.dumps(stored_copy(sent)).decode()
    event = await db.fetchval(
        "INSERT INTO events (event_id, event, status, content_hash, deliveries, conflict,"
        " signature, payload, event_time) VALUES ($1, 'mailbox.created', 'processed',"
        " '\\x00', 1, false, 'valid', $2::jsonb, $3) RETURNING id",
        sent["eventId"],
        stored,
        datetime(2026, 12, 5, 18, 0, tzinfo=UTC),
    )
    await db.execute(
        "INSERT INTO outbound_messages (destination, type, payload, event_id) VALUES"
        " ('crm', 'order.failed', '{\"orderId\": \"o1\"}', NULL),"
        " ('crm', 'mailbox.created', NULL, $1)",
        event,
    )
    rows = await db.fetch(CLAIM, datetime.now(UTC) + timedelta(days=1), ["crm"], 10)
    copied, referenced = (message(row).data for row in rows)
    assert copied == {"orderId": "o1"}
    assert referenced == data_of(orjson.loads(stored), sent["eventId"], rows[1]["event_time"])
    assert referenced["eventTime"] == "2026-12-05T18:00:00Z"
    await db.execute(migration("0029_forwarded_messages_by_reference.py").COPY_DATA)
    copy = await db.fetchval("SELECT payload FROM outbound_messages WHERE event_id = $1", event)
    back = orjson.loads(copy)
    assert back["eventId"] == sent["eventId"] and back["orderId"] == sent["data"]["orderId"]
    assert back["mailboxDetails"]["email"] == sent["data"]["mailboxDetails"]["email"]
    assert traffic.CANARY_PREFIX not in orjson.dumps(back).decode()
