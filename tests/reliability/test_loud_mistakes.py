"""Mistakes an operator makes fail loudly: one line naming the cause, /readyz 503 where the
service cannot apply deliveries, and no acknowledged delivery lost meanwhile."""

import asyncio
import re
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import orjson
from fastapi import FastAPI

from app.config import Settings
from app.crypto import generate_key
from app.main import create_app
from app.simulation import traffic
from tests.conftest import app_client, deliver, make_settings
from tests.reliability.proxy import Proxy
from tests.reliability.test_crash_and_outage import server_env
from tests.reliability.test_spool import events_by_id, wait_until_drained
from tests.servers import CLI, clean_env, run_cli, serve_to_its_end, serving

KEYS_LINE = "FERNET_KEYS cannot decrypt what the database stores"


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The real app and a client, for a test that looks inside the receiver."""
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            yield application, http


def lines(text: str, start: str) -> list[str]:
    return [line for line in text.splitlines() if start in line]


async def test_keys_that_cannot_decrypt_what_is_stored_keep_every_delivery_and_say_so(
    database_url, capsys
):
    old, stranger = generate_key(), generate_key()
    first = traffic.mailbox_created()
    async with app_client(make_settings(database_url, fernet_keys=old)) as client:
        assert (await deliver(client, first)).json()["status"] == "processed"
    capsys.readouterr()
    # Restarted with a key list that lost the old key (rotate-keys run elsewhere, or a
    # secrets file left behind): it must neither look ready nor lose what it acknowledges.
    wrong = make_settings(database_url, fernet_keys=stranger)
    later = [traffic.mailbox_created() for _ in range(5)]
    async with app_client(wrong) as client:
        ready = await client.get("/readyz")
        answers = [await deliver(client, payload) for payload in later]
        assert (await client.get("/readyz")).status_code == 503
    assert ready.status_code == 503 and ready.json()["error"].startswith(KEYS_LINE)
    assert [a.status_code for a in answers] == [200] * 5, answers[0].text
    assert {a.json()["status"] for a in answers} == {"queued"}
    err = capsys.readouterr().err
    assert len(lines(err, KEYS_LINE)) == 1, err
    assert "Traceback" not in err
    # Given the old key back, the same spool drains: nothing acknowledged was lost.
    fixed = make_settings(
        database_url, fernet_keys=f"{stranger},{old}", spool_dir=str(wrong.spool_path)
    )
    async with app_client(fixed) as client:
        await wait_until_drained(client)
    stored = await events_by_id(database_url)
    assert set(stored) == {p["eventId"] for p in [first, *later]}


async def test_serve_with_keys_that_cannot_decrypt_what_is_stored_stops_in_one_line(
    database_url, tmp_path
):
    async with app_client(make_settings(database_url)) as client:
        assert (await deliver(client, traffic.mailbox_created())).status_code == 200
    env = server_env(database_url) | {"FERNET_KEYS": generate_key()}
    result = await asyncio.to_thread(serve_to_its_end, env, tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"coldmail-webhooks: {KEYS_LINE}: "
        + (
            "list the key it was encrypted with in FERNET_KEYS (newest first; local mode keeps "
            "them in DATA_DIR/secrets.env)"
        )
    ]


def test_rotate_keys_in_local_mode_updates_secrets_env_so_serve_restarts_readable():
    home = Path(tempfile.mkdtemp(prefix="cmw-rotate-", dir="/tmp"))
    home.chmod(0o755)  # an ordinary folder: local mode refuses private ones
    env = clean_env(DATA_DIR=str(home / "data"))
    first, second = traffic.mailbox_created(), traffic.mailbox_created()
    with serving(env, home) as server:
        url = re.search(r"Webhook URL[^:]*: (\S+)", server.output()).group(1)  # type: ignore[union-attr]
        assert httpx.post(url, content=orjson.dumps(first)).json()["status"] == "processed"
    secrets_file = home / "data" / "secrets.env"
    old = re.search(r"^FERNET_KEYS=(\S+)$", secrets_file.read_text(), re.M).group(1)  # type: ignore[union-attr]
    new = generate_key()
    rotated = run_cli("rotate-keys", env=env | {"FERNET_KEYS": f"{new},{old}"}, cwd=home)
    with serving(env, home) as server:
        here = url.replace(url.split("/")[2], f"127.0.0.1:{server.port}")
        answer = httpx.post(here, content=orjson.dumps(second))
    # the old code answered a text/plain 500 here and kept nothing
    assert answer.status_code == 200 and answer.json()["status"] == "processed", answer.text
    # every stored body still decrypts: replay reads them all
    assert "events:   applied 2" in run_cli("replay", "--all", env=env, cwd=home)
    assert "secrets.env now holds these FERNET_KEYS (local mode)" in rotated
    assert f"FERNET_KEYS={new},{old}\n" in secrets_file.read_text()
    # a key list that cannot decrypt what is stored: one line naming FERNET_KEYS
    stranger = env | {"FERNET_KEYS": generate_key()}
    refused = subprocess.run(
        [*CLI, "rotate-keys"], env=stranger, cwd=home, capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 2
    assert refused.stderr.startswith(f"coldmail-webhooks: {KEYS_LINE}")
    assert refused.stderr.count("\n") == 1, refused.stderr


async def test_an_outage_logs_one_line_with_its_cause_and_one_with_the_drain(database_url, capsys):
    proxy = Proxy(database_url)
    await proxy.start()
    payloads = [traffic.mailbox_created() for _ in range(30)]
    async with running(make_settings(proxy.url)) as (application, client):
        assert (await deliver(client, payloads[0])).json()["status"] == "processed"
        await proxy.cut()
        receiver = application.state.receiver
        answers = []
        for payload in payloads[1:]:
            receiver.database_down_until = 0.0  # as if each came after the circuit's pause
            answers.append(await deliver(client, payload))
            await client.get("/readyz")  # probed as a kubelet would
        await proxy.restore()
        await wait_until_drained(client)
    assert {a.json()["status"] for a in answers} == {"queued"}
    err = capsys.readouterr().err
    started = lines(err, "database unreachable")
    assert len(started) == 1, started
    cause = r"database unreachable \(\w+Error: .+\): deliveries go to the spool until it answers"
    assert re.search(cause, started[0]), started
    drained = lines(err, "the spool is empty again")
    assert len(drained) == 1, drained
    assert re.search(
        r"the spool is empty again: 29 spooled deliveries applied in \d+\.\d s", drained[0]
    )
    assert len(lines(err, "database not ready")) == 1
    assert set(await events_by_id(database_url)) == {p["eventId"] for p in payloads}
