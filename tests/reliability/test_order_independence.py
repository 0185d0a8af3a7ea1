"""The final state, read through the API, is the same whatever order events arrive in, and
it is what a small model of the rules (tests/model.py) says it must be."""

import time
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import model, streams
from tests.conftest import app_client, deliver, fresh_database, make_settings
from tests.state import read_state

edits = st.lists(
    st.tuples(
        st.integers(0, 5),
        st.sampled_from(["firstName", "lastName", "userName"]),
        st.sampled_from(["Ann", "Bo", "Cy", "Dee"]),
    ),
    max_size=4,
)
standard = st.tuples(
    st.integers(1, 3),  # mailboxes
    st.booleans(),  # a failure reported for the same domain too
    edits,  # same-field edits, each with its own send time
    st.integers(0, len(streams.LIFECYCLE_STEPS)),  # lifecycle events of its subscription
    st.booleans(),  # a second order on the same subscription
)
prewarmup = st.tuples(st.integers(0, 2), st.integers(0, 2), st.booleans()).filter(
    lambda t: t[0] + t[1] > 0
)


def build_stream(
    orders: list[tuple[int, bool, list[Any], int, bool]], prewarmups: list[tuple[int, int, bool]]
) -> list[dict[str, Any]]:
    start = time.time() - 20_000
    events: list[dict[str, Any]] = []
    for i, (boxes, failure, changes, steps, again) in enumerate(orders):
        order = streams.standard_order(boxes, failure, changes, start=start + 1000 * i)
        events += order
        if steps:
            events += streams.lifecycle(order[0], steps, start=start + 1000 * i + 100)
        if again:
            events += streams.second_order(order[0], 2, start=start + 1000 * i + 200)
    for i, (ok, failed, both_ways) in enumerate(prewarmups):
        events += streams.prewarmup_order(ok, failed, both_ways, start=start + 50 * i)
    return events


scenarios = st.tuples(
    st.lists(standard, min_size=1, max_size=2), st.lists(prewarmup, max_size=2), st.floats(0, 0.5)
)


async def final_state(
    server_url: str, template: str, stream: list[dict[str, Any]]
) -> dict[str, Any]:
    async with fresh_database(server_url, template) as url:
        options = {"log_level": "WARNING", "cmr_signature_tolerance_seconds": streams.TOLERANCE}
        async with app_client(make_settings(url, **options)) as client:
            for payload in stream:
                assert (await deliver(client, payload)).status_code == 200
            return await read_state(client)


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(scenario=scenarios, data=st.data())
async def test_any_arrival_order_gives_the_same_final_state(
    server_url, template_name, scenario, data
):
    orders, prewarmups, duplicate_share = scenario
    events = build_stream(orders, prewarmups)
    duplicates = [e for e in events if data.draw(st.floats(0, 1)) < duplicate_share]
    stream = events + duplicates
    expected = await final_state(server_url, template_name, stream)
    assert expected["mailboxes"] and expected["orders"]
    model.check(events, expected)  # right, not only the same in every order
    for _ in range(2):
        shuffled = data.draw(st.permutations(stream))
        assert await final_state(server_url, template_name, shuffled) == expected
