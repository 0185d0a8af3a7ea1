"""`replay --all` rebuilds what the live deliveries built: wipe every table the events
write to, replay, and ops read the same subscriptions, mailboxes and orders."""

import time

from tests import streams
from tests.conftest import app_client, deliver, make_settings
from tests.reliability.test_crash_and_outage import server_env
from tests.servers import run_cli
from tests.state import read_state

DERIVED = "mailboxes, order_domains, orders, subscriptions, domains"


def mixed_stream() -> list[dict[str, object]]:
    """Standard orders with edits, failures, second orders and lifecycles, and prewarmup
    orders with partial failures: every kind of effect, in time order."""
    start = time.time() - 20_000
    events: list[dict[str, object]] = []
    first = streams.standard_order(
        3, True, [(0, "firstName", "Ann"), (1, "firstName", "Bo")], start=start
    )
    events += first
    events += streams.second_order(first[0], 2, start=start + 500)
    events += streams.lifecycle(first[0], 4, start=start + 800)
    events += streams.prewarmup_order(2, 1, False, start=start + 1000)
    events += streams.prewarmup_order(0, 2, False, start=start + 2000)
    events += streams.prewarmup_order(1, 0, True, start=start + 3000)
    return events


async def test_replay_after_losing_every_derived_table_restores_what_ops_saw(db, database_url):
    settings = make_settings(database_url, cmr_signature_tolerance_seconds=streams.TOLERANCE)
    async with app_client(settings) as client:
        for payload in mixed_stream():
            assert (await deliver(client, payload)).status_code == 200
        before = await read_state(client)
        assert before["mailboxes"] and before["orders"] and before["subscriptions"]
        await db.execute(f"TRUNCATE {DERIVED}")
        assert (await read_state(client))["mailboxes"] == []
        run_cli("replay", "--all", env=server_env(database_url))
        assert await read_state(client) == before
