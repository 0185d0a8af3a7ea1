"""The ops dashboard under /ui: server-rendered pages over the same query functions as
the read API (app/reading/queries/); sessions are in sessions.py, the chart in chart.py.

No page has a script, so the Content-Security-Policy allows none. No page shows a
credential, whoever signed in.
"""

import logging
import math
import secrets
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, quote, urlencode

import orjson
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import RedirectResponse
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, ValidationError

from app.crypto import token_matches
from app.db import is_transient
from app.errors import ApiError
from app.reading import chart, exporting, renewals
from app.reading.queries import counts, events, mailboxes, orders, subscriptions
from app.reading.queries.paging import MAX_ROW_ID
from app.reading.reader import Reader, reader
from app.reading.sessions import (
    COOKIE,
    SESSION_HOURS,
    cross_site,
    hasher_of,
    is_credentials_session,
    session_statement,
    signed_in,
    tokens,
)
from app.reading.sessions import (
    SignInThrottle as SignInThrottle,  # tests/test_dashboard.py builds one with its clock
)

log = logging.getLogger("coldmail.ui")
RENEWALS_SHOWN = 10  # on the overview; the rest are a page of their own
SKIPPED_SHOWN = 50  # mailboxes an export leaves out, named on the page that offers it
CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
Q = TypeVar("Q", bound=BaseModel)
T = TypeVar("T")
templates = Jinja2Templates(directory=Path(__file__).parent / "templates")


def ago(value: datetime) -> str:
    """ "3 min ago" or "in 5 d": how far a time is from now, roughly (pages show the exact
    time on hover)."""
    seconds = (datetime.now(UTC) - value).total_seconds()
    span = abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if span >= size or unit == "s":
            amount = f"{int(span // size)} {unit}"
            break
    return f"in {amount}" if seconds < 0 else f"{amount} ago"


def segment(value: str) -> str:
    """An ID as one path segment: the sender's `../x` or `a/b` stays inside the link it is in
    (the routes take IDs with `/` in them)."""
    return quote(value, safe="")


templates.env.filters["ago"] = ago
templates.env.filters["segment"] = segment
router = APIRouter(prefix="/ui", include_in_schema=False)


def to_sign_in(request: Request, error: Exception) -> Response:
    return secure(RedirectResponse("/ui/login", status_code=303))


def secure(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    # same-origin, not no-referrer: under no-referrer browsers send `Origin: null` even
    # with our own forms, and sign-in could not tell them from a forged post
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["Cache-Control"] = "no-store"
    return response


def page(request: Request, name: str, status: int = 200, **context: Any) -> Response:
    context |= {
        "signed_in": name != "login.html",
        "path": request.url.path,
        "now": datetime.now(UTC),
    }
    return secure(templates.TemplateResponse(request, name, context, status_code=status))


@router.get("/login")
async def login_form(request: Request) -> Response:
    return page(request, "login.html")


@router.post("/login")
async def login(request: Request) -> Response:
    if cross_site(request):
        return page(request, "login.html", 403, error="Sign-in from another site refused.")
    client = request.client.host if request.client else "unknown"
    throttle: SignInThrottle = request.app.state.sign_in_throttle
    if (wait := math.ceil(throttle.wait_seconds(client))) > 0:
        error = f"A sign-in failed from here just now: try again in {wait} s."
        response = page(request, "login.html", 429, error=error)
        response.headers["Retry-After"] = str(wait)
        return response
    throttle.failed(client)
    form = parse_qs((await request.body()).decode(errors="replace"))  # a few KiB: BodyLimit
    token = (form.get("token") or [""])[0].strip()
    if not token_matches(token, tokens(request)):
        return page(request, "login.html", 401, error="That token is not an ops token.")
    throttle.succeeded(client)
    hasher = await hasher_of(request)
    secret = secrets.token_urlsafe(32)
    await session_statement(request, "expire")
    await session_statement(
        request, "open", hasher.digest(secret.encode()), hasher.fingerprint(token)
    )
    response = RedirectResponse("/ui", status_code=303)
    response.set_cookie(
        COOKIE,
        secret,
        max_age=SESSION_HOURS * 3600,
        path="/ui",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return secure(response)


@router.post("/logout")
async def logout(request: Request) -> Response:
    if cross_site(request):
        return page(request, "login.html", 403, error="Sign-out from another site refused.")
    if secret := request.cookies.get(COOKIE):
        hasher = await hasher_of(request)
        await session_statement(request, "close", hasher.digest(secret.encode()))
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(COOKIE, path="/ui", httponly=True, samesite="strict")
    return secure(response)


# --- pages ---------------------------------------------------------------------------

pages = APIRouter(prefix="/ui", include_in_schema=False, dependencies=[Depends(signed_in)])


class PageError(Exception):
    """A page that cannot be shown: answered as an HTML page with this status."""

    def __init__(self, status: int, message: str) -> None:
        self.status, self.message = status, message


def query_of(request: Request, model: type[Q]) -> Q:
    """The read API's own query model, from the page's URL (the same names, camelCase)."""
    params = {k: v for k, v in request.query_params.items() if v != ""}
    try:
        return model.model_validate(params)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise PageError(422, f"Bad filter: {problems}") from None


def show_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, PageError)
    return page(request, "error.html", error.status, message=error.message)


def next_link(request: Request, cursor: str | None) -> str | None:
    if cursor is None:
        return None
    params = dict(request.query_params) | {"cursor": cursor}
    return f"{request.url.path}?{urlencode(params)}"


def first_link(request: Request) -> str | None:
    """Back to the first page, once a cursor has moved on from it."""
    if "cursor" not in request.query_params:
        return None
    params = {k: v for k, v in request.query_params.items() if k != "cursor"}
    return f"{request.url.path}?{urlencode(params)}" if params else request.url.path


def listing(request: Request, model: type[Q]) -> Q:
    """A list page's query: the API's, newest first unless the page asks otherwise."""
    query = query_of(request, model)
    if "order" in model.model_fields and "order" not in request.query_params:
        query = query.model_copy(update={"order": "newest"})
    return query


def links(request: Request, cursor: str | None) -> dict[str, Any]:
    return {"next": next_link(request, cursor), "first": first_link(request)}


async def export_offer(request: Request, conn: Reader, filters: dict[str, Any]) -> dict[str, Any]:
    """For a page that offers the download: whether this session may, and which of the
    mailboxes the platforms' files leave out (they cannot log in there)."""
    if not await is_credentials_session(request):
        return {"can_export": False, "skipped": (0, [])}
    skipped = await exporting.cannot_export(conn, filters, limit=SKIPPED_SHOWN)
    return {"can_export": True, "skipped": skipped}


@pages.get("")
async def overview(request: Request) -> Response:
    conn = reader(request)
    # 1,440 minutes, the current one last
    since = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=24 * 60 - 1)
    per_minute = await events.per_minute(conn, since)
    conflicts, rejected_total, last_delivery = await counts.attention(conn)
    due = await renewals.list_renewals(
        conn, renewals.RenewalQuery(limit=RENEWALS_SHOWN), request.app.state.renewal_totals
    )
    return page(
        request,
        "overview.html",
        renewals=due,
        renewal_days=renewals.DEFAULT_DAYS,
        troubled=await orders.with_domains(conn, await orders.troubled_orders(conn)),
        chart=chart.chart(per_minute, since),
        signatures=await events.signatures_since(conn, since),
        conflicts=conflicts,
        rejected_total=rejected_total,
        last_delivery=last_delivery,
        spool=await spool_state(request),
        reconcile=await counts.latest_reconciliation(conn),
    )


async def spool_state(request: Request) -> dict[str, Any]:
    """From the process itself: it answers while the database is away."""
    depth, oldest, room = await request.app.state.receiver.spool.depth()
    return {"depth": depth, "oldest": round(oldest or 0.0, 1), "room": room}


@pages.get("/renewals")
async def renewals_page(request: Request) -> Response:
    query = query_of(request, renewals.RenewalQuery)
    result = await renewals.list_renewals(reader(request), query, request.app.state.renewal_totals)
    return page(
        request, "renewals.html", result=result, query=query, **links(request, result.next_cursor)
    )


@pages.get("/orders")
async def orders_page(request: Request) -> Response:
    conn = reader(request)
    query = listing(request, orders.OrderQuery)
    partial, partial_count = None, 0
    if not query.cursor and not query.status:
        partial = await orders.list_orders(
            conn, orders.OrderQuery(status="partially_failed", limit=20, order="newest")
        )
        partial_count = await orders.count_with_status(conn, "partially_failed")
    result = await orders.list_orders(conn, query)
    return page(
        request,
        "orders.html",
        partial=partial,
        partial_count=partial_count,
        orders=result.items,
        query=query,
        **links(request, result.next_cursor),
    )


@pages.get("/orders/{order_id:path}")
async def order_page(request: Request, order_id: str) -> Response:
    conn = reader(request)
    order = await found(orders.get_order(conn, order_id), "No such order.")
    boxes = await mailboxes.list_mailboxes(
        conn, mailboxes.MailboxQuery(order_id=order_id, limit=500)
    )
    return page(
        request,
        "order.html",
        order=order,
        mailboxes=boxes.items,
        more_mailboxes=boxes.next_cursor is not None,
        events=await events.events_about(conn, order=[order_id]),
        **await export_offer(request, conn, {"order_id": order_id}),
    )


@pages.get("/subscriptions")
async def subscriptions_page(request: Request) -> Response:
    conn = reader(request)
    query = listing(request, subscriptions.SubscriptionQuery)
    result = await subscriptions.list_subscriptions(conn, query)
    by_status = await subscriptions.count_by_status(conn)
    return page(
        request,
        "subscriptions.html",
        by_status=by_status,
        subscriptions=result.items,
        query=query,
        **links(request, result.next_cursor),
    )


@pages.get("/subscriptions/{subscription_id:path}")
async def subscription_page(request: Request, subscription_id: str) -> Response:
    conn = reader(request)
    sub = await found(
        subscriptions.get_subscription(conn, subscription_id), "No such subscription."
    )
    its_orders = await orders.domains_of_subscription(conn, subscription_id)
    order_ids = {o.order_id for o in its_orders} | ({sub.order_id} if sub.order_id else set())
    return page(
        request,
        "subscription.html",
        sub=sub,
        orders=its_orders,
        events=await events.events_about(
            conn, subscription=[subscription_id], order=sorted(order_ids)
        ),
        **await export_offer(request, conn, {"subscription_id": subscription_id}),
    )


@pages.get("/mailboxes")
async def mailboxes_page(request: Request) -> Response:
    """The newest mailboxes, or those a search finds (address, name, domain or ID)."""
    query = listing(request, mailboxes.MailboxQuery)
    result = await mailboxes.list_mailboxes(reader(request), query)
    return page(
        request,
        "mailboxes.html",
        search=query.q or "",
        mailboxes=result.items,
        **links(request, result.next_cursor),
    )


@pages.get("/mailboxes/{mailbox_id:path}")
async def mailbox_page(request: Request, mailbox_id: str) -> Response:
    conn = reader(request)
    box = await found(mailboxes.get_mailbox(conn, mailbox_id), "No such mailbox.")
    return page(
        request,
        "mailbox.html",
        box=box,
        events=await events.events_about(
            conn, mailbox=[mailbox_id], order=[box.order_id] if box.order_id else []
        ),
    )


async def found(lookup: Awaitable[T], missing: str) -> T:
    """The resource, or a 404 page (an ID that is not valid is not found either)."""
    try:
        return await lookup
    except (ApiError, ValidationError):
        raise PageError(404, missing) from None


@pages.get("/events")
async def events_page(request: Request) -> Response:
    query = listing(request, events.EventQuery)
    result = await events.list_events(reader(request), query)
    return page(
        request,
        "events.html",
        events=result.items,
        query=query,
        **links(request, result.next_cursor),
    )


@pages.get("/events/{id}")
async def event_page(request: Request, id: str) -> Response:
    if not id.isdigit() or not 1 <= int(id) <= MAX_ROW_ID:
        raise PageError(404, "No such event.")
    event = await found(events.get_event(reader(request), int(id)), "No such event.")
    payload = orjson.dumps(event.payload, option=orjson.OPT_INDENT_2).decode()
    return page(request, "event.html", event=event, payload=payload)


@pages.get("/rejected")
async def rejected_page(request: Request) -> Response:
    query = listing(request, events.RejectedQuery)
    result = await events.list_rejected(reader(request), query)
    return page(
        request,
        "rejected.html",
        rejected=result.items,
        query=query,
        **links(request, result.next_cursor),
    )


@pages.post("/exports/mailboxes")
async def export_page(request: Request) -> Response:
    """A download for a session signed in with a credentials token (same rules as the API)."""
    if cross_site(request):
        raise PageError(403, "An export asked for by another site is refused.")
    if not await is_credentials_session(request):
        raise PageError(403, "Exports need a session signed in with a credentials token.")
    form = parse_qs((await request.body()).decode(errors="replace"))  # a few KiB: BodyLimit
    fields = {k: v[0] for k, v in form.items() if v and v[0]}
    try:
        query = exporting.ExportQuery.model_validate(fields)
    except ValidationError:
        raise PageError(422, "Choose a format and a subscription or an order.") from None
    try:
        return await exporting.export_response(
            request, reader(request), query, request.state.signed_in
        )
    except ApiError as error:
        raise PageError(error.status, "Exports are served only over HTTPS.") from None


# --- while the database is away ------------------------------------------------------

CANNOT_SHOW = {
    "": "renewals, orders, conflicts, rejected deliveries and the delivery chart",
    "renewals": "renewals",
    "orders": "orders",
    "subscriptions": "subscriptions",
    "mailboxes": "mailboxes",
    "events": "events",
    "rejected": "rejected deliveries",
    "login": "a sign-in: sessions are kept in the database",
    "logout": "a sign-out: sessions are kept in the database",
    "exports": "an export",
}


async def database_away(request: Request, error: Exception) -> Response:
    """Any page the database cannot answer: what the process itself knows (the spool, since
    when it has found the database away) and what the page cannot show, as a page. An error
    the database gave for a statement (a bug, not an outage) is a 500 page and a log line."""
    if not is_transient(error):
        log.error("page %s failed: %s", request.url.path, type(error).__name__, exc_info=error)
        return page(
            request, "error.html", 500, message="This page failed; the server log says why."
        )
    receiver = request.app.state.receiver
    receiver.database_away()
    section = request.url.path.removeprefix("/ui").strip("/").split("/")[0]
    return page(
        request,
        "away.html",
        503,
        away_since=receiver.away_since,
        spool=await spool_state(request),
        cannot_show=CANNOT_SHOW.get(section, "this page"),
        signed_in_known=COOKIE in request.cookies,
    )
