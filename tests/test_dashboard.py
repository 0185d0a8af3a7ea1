"""The ops dashboard through the HTTP app: sign-in, headers, what each page shows, and
that no page ever carries a credential."""

import asyncio
import base64
import hashlib
import re
from collections.abc import MutableMapping
from typing import Any

import httpx
import pytest

from app.main import create_app
from app.reading import ui
from tests.conftest import CREDENTIALS_TOKEN, OPS_TOKEN, app_client
from tests.dashboard_data import fill
from tests.reliability.test_secrets import canaries_in

PAGES = [
    "/ui",
    "/ui/renewals",
    "/ui/orders",
    "/ui/subscriptions",
    "/ui/mailboxes",
    "/ui/events",
    "/ui/rejected",
    "/ui/failed-domains",
    "/ui/incomplete-orders",
    "/ui/deliveries?range=7d",
    "/ui/events?q=REDACTED",
]


async def sign_in(client: httpx.AsyncClient, token: str = OPS_TOKEN) -> httpx.Response:
    return await client.post(
        "/ui/login",
        content=f"token={token}",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )


async def test_no_page_without_a_session(client):
    for path in [*PAGES, "/ui/events/1", "/ui/mailboxes?q=x.com"]:
        response = await client.get(path)
        assert response.status_code == 303, path
        assert response.headers["location"] == "/ui/login"


async def test_a_wrong_token_is_refused_and_gets_no_session(client):
    response = await sign_in(client, "not-" + OPS_TOKEN)
    assert response.status_code == 401
    assert "not an ops token" in response.text
    assert "set-cookie" not in response.headers
    assert (await client.get("/ui")).status_code == 303


class Clock:
    """The throttle's clock, moved by hand: no test waits for real time to pass."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


async def test_failed_sign_ins_back_off_briefly_per_address_and_a_success_starts_over(settings):
    clock = Clock()
    application = create_app(settings)
    application.state.sign_in_throttle = ui.SignInThrottle(clock=clock)

    def at(address: str) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=application, client=(address, 50_000))
        return httpx.AsyncClient(transport=transport, base_url="http://test")

    async with application.router.lifespan_context(application):
        office, home = at("198.51.100.7"), at("203.0.113.9")
        assert (await sign_in(office, "guess-" + OPS_TOKEN)).status_code == 401
        held = await sign_in(office)  # the right token waits too: no oracle
        assert held.status_code == 429 and held.headers["retry-after"] == "1"
        assert "set-cookie" not in held.headers
        assert (await sign_in(home)).status_code == 303  # another address is not held up
        clock.now += 1
        assert (await sign_in(office)).status_code == 303  # the wait was short
        waits = []
        for _ in range(7):  # a success started over: 1 s, doubling, 30 s at most
            assert (await sign_in(office, "guess-" + OPS_TOKEN)).status_code == 401
            waits.append(int((await sign_in(office, "guess")).headers["retry-after"]))
            clock.now += waits[-1]
        assert waits == [1, 2, 4, 8, 16, 30, 30]
        assert (await sign_in(office, "guess-" + OPS_TOKEN)).status_code == 401
        for _ in range(20):  # guesses within the wait are refused and do not lengthen it
            refused = await sign_in(office, "guess")
            assert refused.status_code == 429 and refused.headers["retry-after"] == "30"
        clock.now += 29
        assert (await sign_in(office)).headers["retry-after"] == "1"
        clock.now += 1
        assert (await sign_in(office)).status_code == 303


async def test_a_sign_in_counts_as_failed_before_its_body_arrives(settings):
    """Posts that never finish are counted too: while one from an address is still sending
    its body, the right token from that address waits, and another address does not."""
    clock = Clock()
    application = create_app(settings)
    throttle = application.state.sign_in_throttle = ui.SignInThrottle(clock=clock)
    left, answered = asyncio.Event(), []

    async def receive() -> dict[str, Any]:
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        answered.append(message)

    head = [(b"host", b"test"), (b"content-type", b"application/x-www-form-urlencoded")]
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/ui/login", "raw_path": b"/ui/login", "query_string": b"",
        "root_path": "", "headers": [*head, (b"content-length", b"100")],
        "client": ("198.51.100.7", 50_000), "server": ("test", 80),
    }  # fmt: skip

    def at(address: str) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=application, client=(address, 50_000))
        return httpx.AsyncClient(transport=transport, base_url="http://test")

    async with application.router.lifespan_context(application):
        unfinished = asyncio.create_task(application(scope, receive, send))
        for _ in range(1_000):
            if throttle.wait_seconds("198.51.100.7"):
                break
            await asyncio.sleep(0)
        held = await sign_in(at("198.51.100.7"))
        assert held.status_code == 429 and "set-cookie" not in held.headers
        assert (await sign_in(at("203.0.113.9"))).status_code == 303
        left.set()  # the client leaves mid-body: no answer, no error
        await unfinished
        assert not any(m.get("status") == 500 for m in answered)
        clock.now += 1
        assert (await sign_in(at("198.51.100.7"))).status_code == 303


async def test_sign_in_sets_a_strict_http_only_session_and_sign_out_ends_it(client):
    response = await sign_in(client)
    assert response.status_code == 303 and response.headers["location"] == "/ui"
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/ui" in cookie
    assert "max-age=28800" in cookie
    assert OPS_TOKEN.lower() not in cookie  # the token itself is never in the cookie
    assert (await client.get("/ui")).status_code == 200
    await client.post("/ui/logout")
    assert (await client.get("/ui")).status_code == 303


async def test_a_forged_session_cookie_is_refused(client):
    await sign_in(client)
    genuine = client.cookies["cmw_session"]
    forged = genuine[:-2] + ("AA" if genuine[-2:] != "AA" else "BB")
    client.cookies.set("cmw_session", forged, path="/ui")
    assert (await client.get("/ui")).status_code == 303


async def test_the_session_is_secure_behind_https(settings):
    async with app_client(settings, base_url="https://test") as client:
        response = await sign_in(client)
    assert "secure" in response.headers["set-cookie"].lower()


async def test_every_page_has_a_strict_csp_that_runs_only_its_copy_script(client):
    """The one script (the IDs' copy button) is inline and allowed by its own hash alone:
    no other inline script, no script from anywhere, runs."""
    await sign_in(client)
    for path in [*PAGES, "/ui/login"]:
        response = await client.get(path)
        csp = dict(
            part.strip().split(" ", 1)
            for part in response.headers["content-security-policy"].split(";")
        )
        assert csp["default-src"] == "'none'", path
        scripts = re.findall(r"<script>(.*?)</script>", response.text, re.S)
        assert len(scripts) == 1 == response.text.lower().count("<script"), path
        digest = base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode()
        assert csp["script-src"] == f"'sha256-{digest}'", path
        assert " style=" not in response.text  # no inline style either
        assert " onclick" not in response.text.lower()  # no inline handler (the hash allows none)


async def test_pages_show_the_partial_order_first_the_renewal_and_search(client):
    data = await fill(client)
    await sign_in(client)
    orders = (await client.get("/ui/orders")).text
    attention = orders.split("All orders")[0]
    assert data["order_id"] in attention and data["failed_domain"] in attention
    assert "DNS not verified" in attention
    overview = (await client.get("/ui")).text
    renewals = overview.split("Renewals in the next")[1].split("Failed and partially failed")[0]
    assert f"/ui/subscriptions/{data['expiring']}" in renewals
    by_email = (await client.get("/ui/mailboxes", params={"q": data["email"]})).text
    assert data["email"] in by_email
    by_domain = (await client.get("/ui/mailboxes", params={"q": data["domain"]})).text
    assert data["email"] in by_domain
    rejected = (await client.get("/ui/rejected")).text
    assert "broken" in rejected and "invalid_payload" in rejected
    overview = (await client.get("/ui")).text
    assert re.search(r"processed <strong>\d+</strong>", overview)
    assert '<path class="bar-processed"' in overview  # the chart has bars


async def test_bad_filters_get_a_page_saying_so(client):
    await sign_in(client)
    response = await client.get("/ui/orders", params={"status": "bogus"})
    assert response.status_code == 422 and "Bad filter" in response.text
    assert (await client.get("/ui/events/999999")).status_code == 404
    assert (await client.get("/ui/events/abc")).status_code == 404


@pytest.mark.parametrize("token", [OPS_TOKEN, CREDENTIALS_TOKEN])
async def test_no_page_shows_a_credential_even_to_a_credentials_token(client, token):
    data = await fill(client)
    canaries = {f"canary-{c}" for p in data["payloads"] for c in canaries_in(p)}
    assert len(canaries) >= 10
    assert (await sign_in(client, token)).status_code == 303
    events = (
        await client.get(
            "/api/v1/events",
            params={"limit": 100},
            headers={"Authorization": f"Bearer {OPS_TOKEN}"},
        )
    ).json()
    mailboxes = (
        await client.get(
            "/api/v1/mailboxes",
            params={"limit": 100},
            headers={"Authorization": f"Bearer {OPS_TOKEN}"},
        )
    ).json()["items"]
    paths = [
        *PAGES,
        f"/ui/mailboxes?q={data['domain']}",
        f"/ui/mailboxes?q={data['email']}",
        f"/ui/orders/{data['order_id']}",
    ]
    paths += [f"/ui/mailboxes/{m['mailboxId']}" for m in mailboxes]
    paths += list({f"/ui/subscriptions/{m['subscriptionId']}" for m in mailboxes})
    paths += [f"/ui/events/{e['id']}" for e in events["items"]]
    redacted = 0
    for path in paths:
        response = await client.get(path)
        assert response.status_code == 200, path
        assert not [c for c in canaries if c in response.text], path
        redacted += response.text.count("[REDACTED]")
    assert redacted >= len(canaries)  # the inspector shows where each one was
