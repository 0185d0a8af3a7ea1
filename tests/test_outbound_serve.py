"""Outbound messages through a real `serve`: it refuses a destination it cannot use, in
one line, and a kill -9 while it is sending loses no message."""

import asyncio
import base64
import os
import signal
import subprocess

import httpx
import pytest

from app.simulation import traffic
from tests.conftest import deliver
from tests.receivers import receiving
from tests.reliability.test_crash_and_outage import server_env as plain_server_env
from tests.servers import CLI, Server, run_cli, serve_to_its_end, serving
from tests.test_outbound_delivery import declared, destinations_file, messages, until

SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()


def server_env(database_url: str, path: object, **more: str) -> dict[str, str]:
    """A plain server's environment, its destinations in the file at `path`."""
    return plain_server_env(database_url) | {
        "DESTINATIONS_FILE": str(path),
        "CRM_SECRET": SECRET,
        **more,
    }


@pytest.mark.parametrize(
    "change, env, says",
    [
        ({"allowPrivateNetwork": False}, {}, "resolves to the internal address 127.0.0.1"),
        ({}, {"CRM_SECRET": ""}, "CRM_SECRET (its secretEnv) is not set"),
        ({"format": "teams"}, {}, "format: Input should be 'standard-webhooks' or 'slack'"),
        ({"url": "localhost:9/x"}, {}, "url must be an http:// or https:// URL"),
    ],
)
def test_serve_refuses_a_destination_it_cannot_use_in_one_line(
    database_url, tmp_path, change, env, says
):
    path = destinations_file(tmp_path, declared("crm", "http://127.0.0.1:9/h") | change)
    result = serve_to_its_end(server_env(database_url, path) | env, tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "destination 'crm'" in lines[0] and says in lines[0], lines
    assert SECRET not in result.stderr


async def test_kill_9_of_serve_while_it_dispatches_loses_nothing(database_url, db, tmp_path):
    async with receiving(SECRET) as receiver:
        receiver.hold = asyncio.Event()  # slow: every request waits until released
        path = destinations_file(tmp_path, declared("crm", receiver.url))
        server = Server(server_env(database_url, path), tmp_path)
        await asyncio.to_thread(server.start)
        try:
            async with httpx.AsyncClient(base_url=server.url) as client:
                for payload in [traffic.mailbox_created() for _ in range(30)]:
                    assert (await deliver(client, payload)).status_code == 200
            await until(lambda: len(receiver.requests) >= 1)  # being sent when it dies
            await asyncio.to_thread(server.kill)
            in_flight = set(receiver.received)
            assert {r["status"] for r in await messages(db)} == {"pending"}
            receiver.hold.set()  # the receiver applies them; the answer reaches no one
            receiver.hold = None
            await asyncio.to_thread(server.start)
            await until(lambda: len(receiver.applied) == 30, timeout=60)
            await until(lambda: sum(receiver.received.values()) == 30 + len(in_flight))
        finally:
            await asyncio.to_thread(server.stop)
    rows = await messages(db)
    assert len(rows) == 30 and {r["status"] for r in rows} == {"delivered"}
    assert set(receiver.applied) == {r["webhook_id"] for r in rows}
    # what was in flight came again under its own webhook-id, and was applied once
    assert all(receiver.received[webhook_id] == 2 for webhook_id in in_flight)
    assert receiver.bad_signatures == 0


async def test_outbound_dispatch_sends_until_sigterm_and_replay_brings_dead_letters_back(
    database_url, db, tmp_path
):
    async with receiving(SECRET) as receiver:
        path = destinations_file(tmp_path, declared("crm", receiver.url))
        env = server_env(database_url, path, OUTBOUND_DISPATCH="false")
        with serving(env, tmp_path) as server:  # records, but leaves sending to dispatch
            async with httpx.AsyncClient(base_url=server.url) as client:
                for payload in [traffic.mailbox_created() for _ in range(3)]:
                    assert (await deliver(client, payload)).status_code == 200
        assert {r["status"] for r in await messages(db)} == {"pending"} and not receiver.requests
        await db.execute("UPDATE outbound_messages SET status = 'dead' WHERE id = 1")
        dispatch = subprocess.Popen(
            [*CLI, "outbound", "dispatch", "--workers", "2"],
            env=env,
            cwd=tmp_path,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            await until(lambda: len(receiver.applied) == 2)
        finally:
            dispatch.send_signal(signal.SIGTERM)
            _, err = await asyncio.to_thread(dispatch.communicate, timeout=60)
        assert dispatch.returncode == 0, err
        replay = ["outbound", "replay", "--destination", "crm", "--until", "2999-01-01"]
        assert run_cli(*replay, "--dry-run", env=env) == "crm: 1 dead letters would be sent again\n"
        assert run_cli(*replay, env=env) == "crm: 1 dead letters pending again, due now\n"
    assert [r["status"] for r in await messages(db)] == ["pending", "delivered", "delivered"]
