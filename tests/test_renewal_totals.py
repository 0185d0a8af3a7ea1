"""The renewals' per-user totals are summed at most once a minute per window (`totalsAt`
says when): within the minute a page shows the kept sums; after it, the kept ones while
they are summed again in the background, then the new ones; each window (`withinDays`)
keeps its own."""

from datetime import UTC, datetime, timedelta
from typing import Any, cast

import httpx

from app.reading import renewals
from app.simulation import traffic
from tests.conftest import deliver
from tests.state import OPS


class Clock:
    """time.monotonic for the renewals module, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


async def page(client: httpx.AsyncClient, days: int) -> Any:
    response = await client.get("/api/v1/renewals", params={"withinDays": days}, headers=OPS)
    assert response.status_code == 200, response.text
    return response.json()


def subscriptions(body: Any) -> int:
    return sum(total["subscriptions"] for total in body["totals"])


async def order(client: httpx.AsyncClient, expiry: str) -> None:
    payload = traffic.mailbox_order_success(expiryDate=expiry)
    assert (await deliver(client, payload)).status_code == 200


async def test_totals_are_kept_for_a_minute_per_window_then_summed_again(client, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(renewals, "time", clock)
    await order(client, "2020-01-01T00:00:00Z")  # overdue: on every window's list
    first = await page(client, 30)
    assert subscriptions(first) == 1
    await order(client, "2020-02-01T00:00:00Z")

    clock.now += renewals.FRESH_SECONDS - 1  # within the minute: the kept sums
    kept = await page(client, 30)
    assert (subscriptions(kept), kept["totalsAt"]) == (1, first["totalsAt"])
    assert len(kept["items"]) == 2  # the page itself is read afresh
    other_window = await page(client, 7)  # another window sums its own
    assert subscriptions(other_window) == 2

    clock.now += 1  # the minute is over: the kept ones shown while they are summed again
    stale = await page(client, 30)
    assert (subscriptions(stale), stale["totalsAt"]) == (1, first["totalsAt"])
    await kept_totals(client).settled()
    await order(client, "2020-03-01T00:00:00Z")
    fresh = await page(client, 30)  # what was summed in the background, kept as summed
    assert subscriptions(fresh) == 2
    assert fresh["totalsAt"] > first["totalsAt"] and fresh["totalsAt"].endswith("Z")

    clock.now += renewals.STALE_SECONDS  # kept too long to be shown: the view waits
    waited = await page(client, 30)
    assert subscriptions(waited) == 3
    assert waited["totalsAt"] > fresh["totalsAt"]


def kept_totals(client: httpx.AsyncClient) -> renewals.KeptValues:
    """The app's own (the client's transport is the app's)."""
    app = cast(httpx.ASGITransport, client._transport).app
    return cast(renewals.KeptValues, app.state.renewal_totals)  # type: ignore[attr-defined]


async def test_the_kept_totals_are_bounded_and_the_least_recent_go_first(monkeypatch):
    """Past KEPT_KEYS filter combinations (3 here), the one read least recently is summed
    again on its next read; those read since are still served from what was kept."""
    monkeypatch.setattr(renewals, "KEPT_KEYS", 3)
    cache, summed = renewals.KeptValues(), []

    async def read(key: str) -> None:
        async def compute() -> str:
            summed.append(key)
            return key

        assert (await cache.get(key, compute))[1] == key

    for key in ("a", "b", "c", "a", "d", "a", "c", "b"):
        await read(key)
    # "b" was the least recent when "d" came: dropped, then summed again
    assert summed == ["a", "b", "c", "d", "b"]
    assert list(cache.kept) == ["a", "c", "b"]  # "d" least recent when "b" came back


async def test_sums_that_fail_in_the_background_leave_the_kept_ones_and_say_so(monkeypatch, caplog):
    """A sum again that fails (the database away) keeps the last sums shown, logs why, and
    the next view past the minute tries again."""
    clock = Clock()
    monkeypatch.setattr(renewals, "time", clock)
    cache = renewals.KeptValues()

    async def first() -> str:
        return "first"

    async def away() -> str:
        raise ConnectionRefusedError("the database is away")

    summed_at, _ = await cache.get("key", first)
    clock.now += renewals.FRESH_SECONDS
    for _ in range(2):
        assert await cache.get("key", away) == (summed_at, "first")
        await cache.settled()
        assert not cache.summing
    said = [r.getMessage() for r in caplog.records if r.name == "coldmail.renewals"]
    assert said == ["summing renewals again failed: ConnectionRefusedError"] * 2
    assert {r.levelname for r in caplog.records if r.name == "coldmail.renewals"} == {"WARNING"}


def at(when: datetime) -> str:
    return when.isoformat().replace("+00:00", "Z")


async def test_a_date_ranges_totals_are_kept_apart_per_customer(client):
    """A range of whole days takes its sums from the sums per day of its filters: within the
    same minute, each customer's range totals count only their renewals, and the range
    without a customer counts everyone's."""
    day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=2)
    for user, hours, boxes in [("USR-A", 5, 1), ("USR-A", 29, 2), ("USR-B", 53, 4)]:
        payload = traffic.mailbox_order_success(
            userId=user, expiryDate=at(day + timedelta(hours=hours)), quantity=boxes, price=10
        )
        assert (await deliver(client, payload)).status_code == 200
    whole_days = {"renewsFrom": at(day), "renewsBefore": at(day + timedelta(days=5))}

    async def total(**params: str) -> tuple[int, int, Any]:
        response = await client.get("/api/v1/renewals", params=whole_days | params, headers=OPS)
        assert response.status_code == 200, response.text
        body = response.json()["total"]
        return body["subscriptions"], body["mailboxes"], body["monthlyCost"]

    assert await total(userId="USR-A") == (2, 3, 30)
    assert await total(userId="USR-B") == (1, 4, 40)
    assert await total() == (3, 7, 70)
    assert await total(userId="USR-C") == (0, 0, 0)  # nothing on the list costs 0, not unknown
