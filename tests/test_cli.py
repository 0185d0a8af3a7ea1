"""The console script, run as a user would: real subprocesses, real servers."""

import argparse
import asyncio
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import orjson
from cryptography.fernet import Fernet

from app.cli import build_parser
from app.crypto import Vault, generate_key
from app.simulation import traffic as factories
from tests.conftest import (
    CREDENTIALS_TOKEN,
    FERNET_KEY,
    OPS_TOKEN,
    SIGNING_KEY,
    WEBHOOK_TOKEN,
    app_client,
    deliver,
    make_settings,
)
from tests.reliability.test_crash_and_outage import server_env
from tests.servers import CLI, clean_env, free_port, run_cli, serving


def test_local_mode_serves_stores_and_keeps_data_across_a_restart():
    home = Path(tempfile.mkdtemp(prefix="cmw-local-", dir="/tmp"))
    home.chmod(0o755)  # an ordinary folder: local mode refuses private ones
    env = clean_env(DATA_DIR=str(home / "data"))
    payload = factories.mailbox_created()
    with serving(env, home) as server:
        port, printed = server.port, server.output()
        assert "LOCAL MODE" in printed
        url = re.search(r"Webhook URL.*?: (\S+)", printed).group(1)  # type: ignore[union-attr]
        ops = re.search(r"Ops API token: +(\S+)", printed).group(1)  # type: ignore[union-attr]
        assert url.startswith(f"http://127.0.0.1:{port}/webhooks/cmr?token=")
        assert httpx.post(url, content=orjson.dumps(payload)).json()["status"] == "processed"
        assert oct((home / "data" / "secrets.env").stat().st_mode & 0o777) == "0o600"
    with serving(env, home) as server:
        port = server.port
        assert ops in server.output()  # the same secrets after a restart
        mailbox_id = payload["data"]["mailboxDetails"]["mailboxId"]
        response = httpx.get(
            f"http://127.0.0.1:{port}/api/v1/mailboxes/{mailbox_id}",
            headers={"Authorization": f"Bearer {ops}"},
        )
        assert response.status_code == 200
        # a command run beside it uses the same database and leaves it running
        assert "applied 1" in run_cli("replay", "--all", env=env, cwd=home)
        # a second serve, on its port or on another, and `db stop`: refused, in one line
        for args, says in [
            (["serve", "--port", str(port)], f"127.0.0.1:{port} is already in use"),
            (["serve", "--port", str(free_port())], "a serve (pid"),
            (["db", "stop"], "stop that serve"),
        ]:
            refused = subprocess.run(
                [*CLI, *args], env=env, cwd=home, capture_output=True, text=True, timeout=120
            )
            assert refused.returncode == 2 and says in refused.stderr, refused.stderr
            assert len(refused.stderr.strip().splitlines()) == 1
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz").json()
        assert ready["database"] == "up"  # the first one's database untouched
    elsewhere = Path(tempfile.mkdtemp(prefix="cmw-elsewhere-", dir="/tmp"))
    stopped = run_cli(
        "db", "stop", "--data-dir", str(home / "data"), env=clean_env(), cwd=elsewhere
    )
    assert f"no embedded database runs under {home / 'data'}" in stopped  # serve stopped it


def test_production_mode_refuses_to_start_without_a_secret(database_url):
    env = clean_env(DATABASE_URL=database_url, FERNET_KEYS=FERNET_KEY, WEBHOOK_TOKENS="t")
    result = subprocess.run([*CLI, "serve"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == "coldmail-webhooks: OPS_API_TOKENS is not set"


def test_generate_key_prints_a_usable_fernet_key():
    Fernet(run_cli("generate-key", env=clean_env()).strip())


async def test_rotate_keys_then_dropping_the_old_key_keeps_every_credential(
    client, database_url, settings
):
    payload = factories.prewarmup_success(domains=2, per_domain=3)
    assert (await deliver(client, payload)).status_code == 200
    new_key = generate_key()
    env = clean_env(
        DATABASE_URL=database_url,
        FERNET_KEYS=f"{new_key},{FERNET_KEY}",
        OPS_API_TOKENS=OPS_TOKEN,
        WEBHOOK_TOKENS=WEBHOOK_TOKEN,
    )
    first = run_cli("rotate-keys", "--batch", "4", env=env)
    assert re.search(r"mailboxes.password_encrypted\s+re-encrypted\s+6", first)
    assert re.search(r"events.body_encrypted\s+re-encrypted\s+1", first)
    again = run_cli("rotate-keys", env=env)
    assert re.search(
        r"mailboxes.password_encrypted\s+re-encrypted\s+0\s+already current\s+6", again
    )
    async with app_client(make_settings(database_url, fernet_keys=new_key)) as fresh:
        headers = {"Authorization": f"Bearer {CREDENTIALS_TOKEN}"}
        for group in payload["data"]["mailboxDetails"]:
            for box in group["preWarmedUpMailboxes"]:
                got = await fresh.get(
                    f"/api/v1/mailboxes/{box['mailboxId']}/credentials", headers=headers
                )
                assert got.json()["authenticatorSecret"] == box["authenticatorSecret"]


async def test_replay_applies_a_rejected_delivery_once_its_cause_is_fixed(client, database_url, db):
    # An older release refused this delivery (say, a provider spelling it did not know);
    # it sits among the rejected deliveries, encrypted, until the fix ships.
    payload = factories.mailbox_created(provider="MICROSOFT")
    body = orjson.dumps(payload)
    row_id = await db.fetchval(
        "insert into rejected_deliveries (reason, event, event_id, errors, signature, "
        "body_encrypted) values ('invalid_payload', $1, $2, '[]', 'valid', $3) returning id",
        payload["event"],
        payload["eventId"],
        Vault([FERNET_KEY]).encrypt(body),
    )
    still_bad = factories.mailbox_created(details={"mailboxId": ""})
    assert (await deliver(client, still_bad)).status_code == 422
    env = clean_env(
        DATABASE_URL=database_url,
        FERNET_KEYS=FERNET_KEY,
        OPS_API_TOKENS=OPS_TOKEN,
        WEBHOOK_TOKENS=WEBHOOK_TOKEN,
    )
    dry = run_cli("replay", "--all", "--dry-run", env=env)
    assert "rejected: would apply 1, still invalid 1" in dry
    assert await db.fetchval("select count(*) from mailboxes") == 0
    run = run_cli("replay", "--rejected", str(row_id), env=env)
    assert "rejected: applied 1, still invalid 0" in run
    assert (
        await db.fetchval("select mailbox_id from mailboxes")
        == payload["data"]["mailboxDetails"]["mailboxId"]
    )
    replayed = await db.fetchrow(
        "select replayed_at, replayed_event_id from rejected_deliveries where id = $1", row_id
    )
    assert replayed["replayed_at"] is not None
    assert (
        await db.fetchval(
            "select event_id from events where id = $1", replayed["replayed_event_id"]
        )
        == payload["eventId"]
    )
    again = run_cli("replay", "--rejected", str(row_id), env=env)
    assert "rejected: applied 0" in again  # a replayed delivery is not applied twice


def test_a_command_given_an_unknown_id_says_so_and_exits_non_zero(database_url):
    env = clean_env(DATABASE_URL=database_url, FERNET_KEYS=FERNET_KEY)
    for args, says in [
        (["replay", "--event", "999999"], "no event 999999 (GET /api/v1/events lists them)"),
        (["replay", "--rejected", "999998"], "no rejected delivery 999998"),
        (["erase", "--mailbox", "no-such-mailbox"], "no mailbox 'no-such-mailbox'"),
    ]:
        result = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, (args, result.stdout)
        assert result.stderr.count("\n") == 1 and says in result.stderr, result.stderr


def test_help_answers_without_importing_the_service():
    """`--help` took 2.6 s on a busy machine: every library of the service was imported
    first. Now each command imports what it uses."""
    probe = (
        "import sys; from app.cli import build_parser; build_parser(); "
        "print(sorted({'pydantic', 'sqlalchemy', 'asyncpg', 'fastapi', 'cryptography'} "
        "& {name.split('.')[0] for name in sys.modules}))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert loaded.stdout.strip() == "[]"


def test_every_command_and_every_option_has_help():
    out = run_cli("--help", env=clean_env())
    for command in ("serve", "migrate", "generate-key", "rotate-keys", "replay", "simulate", "db"):
        assert command in out
    undocumented = []
    parsers = [build_parser()]
    while parsers:
        parser = parsers.pop()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers += action.choices.values()
            elif not action.help:
                undocumented.append(f"{parser.prog} {'/'.join(action.option_strings)}")
    assert not undocumented


def simulate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "simulate", *args, "--events", "5", "--quiet"],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_simulate_says_what_to_fix(database_url, tmp_path):
    dead = simulate(f"http://127.0.0.1:{free_port()}/webhooks/cmr", "--wait", "0")
    assert "what to fix: nothing answers at" in dead.stderr
    with serving(server_env(database_url), tmp_path) as server:
        wrong = simulate(f"{server.url}/webhooks/cmr", "--token", "not-the-token-at-all")
        right = simulate(
            f"{server.url}/webhooks/cmr", "--token", WEBHOOK_TOKEN, "--signing-key", SIGNING_KEY
        )
    assert (
        wrong.returncode == 1
        and "--token must be one of the server's WEBHOOK_TOKENS" in wrong.stderr
    )
    assert right.returncode == 0 and "what to fix" not in right.stderr


def test_simulate_waits_for_a_service_still_starting(database_url, tmp_path):
    """`serve` prints its banner, with the simulate command, before it listens: a simulate
    pasted at once waits for it instead of failing every delivery."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/webhooks/cmr"
    command = [*CLI, "simulate", url, "--token", WEBHOOK_TOKEN, "--signing-key", SIGNING_KEY]
    early = subprocess.Popen(
        [*command, "--events", "5", "--quiet", "--wait", "120"],
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert early.stderr is not None
    assert "waiting up to 120 s for" in early.stderr.readline()  # nothing listens yet
    with serving(server_env(database_url), tmp_path, port=port):
        out, err = early.communicate(timeout=120)
    assert early.returncode == 0, err
    assert "what to fix" not in err and "violations            0" in out


async def test_rotate_keys_leaves_spooled_deliveries_readable_under_the_new_key(database_url):
    spool_dir = tempfile.mkdtemp(prefix="cmw-spool-", dir="/tmp")
    dead = "postgresql+asyncpg://postgres@127.0.0.1:1/nothing"
    payload = factories.mailbox_created()
    async with app_client(make_settings(dead, spool_dir=spool_dir)) as offline:
        assert (await deliver(offline, payload)).json()["status"] == "queued"
    new_key = generate_key()
    env = clean_env(
        DATABASE_URL=database_url,
        FERNET_KEYS=f"{new_key},{FERNET_KEY}",
        SPOOL_DIR=spool_dir,
        OPS_API_TOKENS=OPS_TOKEN,
        WEBHOOK_TOKENS=WEBHOOK_TOKEN,
    )
    out = run_cli("rotate-keys", env=env)
    assert re.search(r"^spool \(deliveries waiting.*re-encrypted +1$", out, re.M), out
    only_new = make_settings(database_url, spool_dir=spool_dir, fernet_keys=new_key)
    async with app_client(only_new) as client:
        for _ in range(100):
            if (await client.get("/readyz")).json()["spool"]["depth"] == 0:
                break
            await asyncio.sleep(0.1)
        box = payload["data"]["mailboxDetails"]
        got = await client.get(
            f"/api/v1/mailboxes/{box['mailboxId']}/credentials",
            headers={"Authorization": f"Bearer {CREDENTIALS_TOKEN}"},
        )
    assert got.json()["appPassword"] == box["appPassword"]


async def test_rotate_keys_changes_no_updated_at_so_updated_since_readers_see_no_change(
    client, database_url, db
):
    payload = factories.prewarmup_success(domains=1, per_domain=3)
    assert (await deliver(client, payload)).status_code == 200
    await db.execute("update mailboxes set updated_at = '2026-01-02T03:04:05Z'")
    before = dict(await db.fetch("select mailbox_id, password_encrypted from mailboxes"))
    new_key = generate_key()
    env = clean_env(DATABASE_URL=database_url, FERNET_KEYS=f"{new_key},{FERNET_KEY}")
    out = run_cli("rotate-keys", env=env)
    assert re.search(r"mailboxes.password_encrypted\s+re-encrypted\s+3", out)
    after = dict(await db.fetch("select mailbox_id, password_encrypted from mailboxes"))
    assert after.keys() == before.keys() and all(after[k] != before[k] for k in after)
    stamps = await db.fetch("select distinct updated_at::text as at from mailboxes")
    assert [row["at"] for row in stamps] == ["2026-01-02 03:04:05+00"]
    ops = {"Authorization": f"Bearer {OPS_TOKEN}"}
    since = await client.get(
        "/api/v1/mailboxes", params={"updatedSince": "2026-06-01T00:00:00Z"}, headers=ops
    )
    assert since.status_code == 200 and since.json()["items"] == []
