"""The final state, read through the API, is the same whatever order events arrive in."""

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app import traffic
from tests.conftest import OPS_TOKEN, app_client, deliver, fresh_database, make_settings

OPS = {"Authorization": f"Bearer {OPS_TOKEN}"}
VOLATILE = {"createdAt", "updatedAt", "id"}


def standard_order(
    n_boxes: int, failed_first: bool, updates: list[tuple[int, str, str]]
) -> list[dict[str, Any]]:
    user = traffic.provider_id()
    success = traffic.mailbox_order_success(userId=user, quantity=n_boxes)
    data = success["data"]
    events = [success]
    boxes = []
    for _ in range(n_boxes):
        created = traffic.mailbox_created(
            subscriptionId=data["subscriptionId"],
            orderId=data["orderId"],
            domain=data["domainName"],
            userId=user,
        )
        boxes.append(created["data"]["mailboxDetails"])
        events.append(created)
    if failed_first:
        events.append(
            traffic.mailbox_order_failed(
                orderId=data["orderId"],
                subscriptionId=data["subscriptionId"],
                domain=data["domainName"],
                userId=user,
            )
        )
    for index, field, value in updates:
        box = boxes[index % n_boxes]
        events.append(
            traffic.mailbox_updated(
                box["mailboxId"],
                {field: value},
                userId=user,
                domain=data["domainName"],
                email=box["email"],
            )
        )
    return events


def prewarmup_order(ok: int, failed: int, both_ways: bool) -> list[dict[str, Any]]:
    order_id, names = (
        traffic.provider_id(),
        [f"d{i}-{traffic.provider_id()[:6]}.com" for i in range(ok + failed)],
    )
    events = []
    if ok:
        success = traffic.prewarmup_success(
            order_id=order_id, domain_names=names[:ok], per_domain=2
        )
        events.append(success)
    failures = {n: "Insufficient wallet balance" for n in names[ok:]}
    if both_ways and ok:
        failures[names[0]] = "Pre-warmed mailboxes not available"
    if failures:
        failed_event = traffic.prewarmup_failed(order_id=order_id, failures=failures)
        if ok:
            failed_event["data"]["userId"] = events[0]["data"]["userId"]
        events.append(failed_event)
    return events


updates = st.lists(
    st.tuples(
        st.integers(0, 5),
        st.sampled_from(["firstName", "lastName", "userName"]),
        st.sampled_from(["Ann", "Bo", "Cy", "Dee"]),
    ),
    max_size=4,
)
scenarios = st.builds(
    lambda std, pre, dup: (std, pre, dup),
    st.lists(
        st.builds(standard_order, st.integers(1, 3), st.booleans(), updates), min_size=1, max_size=2
    ),
    st.lists(
        st.builds(prewarmup_order, st.integers(0, 2), st.integers(0, 2), st.booleans()).filter(
            bool
        ),
        max_size=2,
    ),
    st.floats(0, 0.5),
)


def strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: strip(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [strip(v) for v in value]
    return value


async def final_state(
    server_url: str, template: str, stream: list[dict[str, Any]]
) -> dict[str, Any]:
    async with fresh_database(server_url, template) as url:
        async with app_client(make_settings(url, log_level="WARNING")) as client:
            for payload in stream:
                assert (await deliver(client, payload)).status_code == 200
            state = {}
            for name in ("subscriptions", "mailboxes", "orders"):
                page = await client.get(f"/api/v1/{name}", params={"limit": 500}, headers=OPS)
                items = strip(page.json()["items"])
                key = {
                    "subscriptions": "subscriptionId",
                    "mailboxes": "mailboxId",
                    "orders": "orderId",
                }[name]
                state[name] = sorted(items, key=lambda item: item[key])
            return state


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(scenario=scenarios, data=st.data())
async def test_any_arrival_order_gives_the_same_final_state(
    server_url, template_name, scenario, data
):
    standard, prewarmup, duplicate_share = scenario
    events = [e for order in standard + prewarmup for e in order]
    duplicates = [e for e in events if data.draw(st.floats(0, 1)) < duplicate_share]
    stream = events + duplicates
    expected = await final_state(server_url, template_name, stream)
    assert expected["mailboxes"] and expected["orders"]
    for _ in range(2):
        shuffled = data.draw(st.permutations(stream))
        assert await final_state(server_url, template_name, shuffled) == expected
