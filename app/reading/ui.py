"""The ops dashboard under /ui: server-rendered pages over the same query functions as
the read API (app/reading/queries/); sessions are in sessions.py, the chart in chart.py.

The only script is the IDs' copy button, inline and allowed by its hash alone. No page
shows a credential, whoever signed in.
"""

import base64
import hashlib
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Awaitable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar, cast, get_args
from urllib.parse import parse_qs, quote, urlencode

import orjson
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import RedirectResponse, StreamingResponse
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, ValidationError

from app.crypto import token_matches
from app.db import is_transient
from app.errors import ApiError
from app.reading import chart, exporting, renewals, resources
from app.reading.ages import ago
from app.reading.queries import (
    counts,
    deliveries,
    event_search,
    events,
    failed_domains,
    mailboxes,
    orders,
    right_now,
    subscriptions,
)
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
FIRST_SHOWN = 10  # of a list on the overview, with a link to all of them
LAST_VISIT = "cmw_seen"  # when this browser last saw the overview: "rejected since"
SKIPPED_SHOWN = 50  # mailboxes an export leaves out, named on the page that offers it
# The one script: a copy button beside each ID. Inline, and allowed by its hash alone, so
# the Content-Security-Policy still runs no other script (none injected, none fetched).
COPY_SCRIPT = (Path(__file__).parent / "static" / "copy.js").read_text().strip()
COPY_HASH = base64.b64encode(hashlib.sha256(COPY_SCRIPT.encode()).digest()).decode()
CSP = (
    f"default-src 'none'; script-src 'sha256-{COPY_HASH}'; style-src 'self'; img-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
Q = TypeVar("Q", bound=BaseModel)
T = TypeVar("T")
templates = Jinja2Templates(directory=Path(__file__).parent / "templates")


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
        "copy_script": COPY_SCRIPT,
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


def query_of(request: Request, model: type[Q], params: dict[str, str] | None = None) -> Q:
    """The read API's own query model, from the page's URL (the same names, camelCase), or
    from `params` the page made of it."""
    if params is None:
        params = {k: v for k, v in request.query_params.items() if v != ""}
    try:
        return model.model_validate(params)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise PageError(422, f"Bad filter: {problems}") from None


def show_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, PageError)
    return page(request, "error.html", error.status, message=error.message)


def next_link(request: Request, cursor: str | None, **fixed: str) -> str | None:
    """The page's URL with the cursor, and `fixed` the filters the first page chose."""
    if cursor is None:
        return None
    params = dict(request.query_params) | fixed | {"cursor": cursor}
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
    spool = await spool_state(request)
    reconciling = request.app.state.settings.api_key is not None
    counted_at, (incomplete, _) = await kept_incomplete(request)
    tiles = await right_now.right_now(
        conn, spool, last_visit(request), reconciling, (counted_at, incomplete)
    )
    since, step, buckets, tally = await deliveries.deliveries(conn, "24h", settled_buckets(request))
    due = await renewals_of(request, renewals.RenewalQuery(limit=RENEWALS_SHOWN))
    troubled, troubled_counts = await orders.troubled_orders(conn, FIRST_SHOWN)
    response = page(
        request,
        "overview.html",
        tiles=tiles,
        renewals=due,
        renewal_days=renewals.DEFAULT_DAYS,
        troubled=await orders.with_domains(conn, troubled),
        troubled_counts=troubled_counts,
        shown=FIRST_SHOWN,
        chart=chart.chart(tally, since, step, buckets),
        span="24h",
        signatures=deliveries.signatures(tally),
        spool=spool,
        reconcile=await counts.latest_reconciliation(conn),
    )
    remember_visit(request, response)
    return response


def kept_incomplete(request: Request) -> Awaitable[tuple[datetime, tuple[int, list[Any]]]]:
    """The incomplete orders (how many, the first FIRST_SHOWN) for the overview and the
    orders page, counted at most once a minute per process, and when they were (every order
    domain of 2 days counts its mailboxes: 25-50 ms at 1M mailboxes); the incomplete-orders
    page counts afresh."""
    cache: renewals.KeptValues = request.app.state.kept_counts
    conn = reader(request)
    return cache.get("incomplete", lambda: right_now.incomplete_orders(conn, FIRST_SHOWN))


def last_visit(request: Request) -> datetime | None:
    """When this browser last saw the overview (its cookie), if it has and recently."""
    try:
        seen = datetime.fromtimestamp(float(request.cookies.get(LAST_VISIT, "")), UTC)
    except (ValueError, OverflowError, OSError):
        return None
    now = datetime.now(UTC)
    return seen if now - timedelta(days=31) < seen <= now else None


def remember_visit(request: Request, response: Response) -> None:
    response.set_cookie(
        LAST_VISIT,
        f"{time.time():.3f}",
        max_age=31 * 86400,
        path="/ui",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def settled_buckets(request: Request) -> deliveries.SettledBuckets:
    """This process's settled chart buckets (see queries/deliveries.py)."""
    state = request.app.state
    if not hasattr(state, "settled_buckets"):
        state.settled_buckets = deliveries.SettledBuckets()
    cache: deliveries.SettledBuckets = state.settled_buckets
    return cache


async def spool_state(request: Request) -> dict[str, Any]:
    """From the process itself: it answers while the database is away."""
    depth, oldest, room = await request.app.state.receiver.spool.depth()
    return {"depth": depth, "oldest": round(oldest or 0.0, 1), "room": room}


QUEUE_TABS = {
    "this_week": "This week",
    "overdue": "Overdue",
    "later": "Later",
    "lapsed": "Lapsed?",
    "ended": "Ended",
    "undated": "No end date",
    "all": "All",
}


def queue_query(request: Request) -> renewals.RenewalQuery:
    """The renewals page's query: the API's, with `due` this week unless asked (`all`: every
    part), and `customer` as a userId, or an email when it holds an @."""
    params = {k: v for k, v in request.query_params.items() if v != ""}
    due = params.pop("due", "this_week")
    if due != "all":
        params["due"] = due
    if customer := params.pop("customer", None):
        params["userEmail" if "@" in customer else "userId"] = customer.strip()
    return query_of(request, renewals.RenewalQuery, params)


def renewals_of(request: Request, query: renewals.RenewalQuery) -> Awaitable[resources.RenewalPage]:
    state = request.app.state
    return renewals.list_renewals(
        reader(request), query, state.renewal_totals, state.settings.price_currency
    )


def with_params(request: Request, path: str, **changed: str | None) -> str:
    """This page's URL at `path`, its parameters changed (None drops one) and no cursor."""
    params = dict(request.query_params) | changed
    kept = {k: v for k, v in params.items() if v not in (None, "") and k != "cursor"}
    return f"{path}?{urlencode(kept)}" if kept else path


@pages.get("/renewals")
async def renewals_page(request: Request) -> Response:
    query = queue_query(request)
    result = await renewals_of(request, query)
    tabs = [
        {
            "label": label,
            "href": with_params(request, "/ui/renewals", due=due),
            "current": (query.due or "all") == due,
            "sum": renewals.total_of(
                [part for key, part in result.by_due.items() if due in ("all", key)]
            ),
        }
        for due, label in QUEUE_TABS.items()
    ]
    return page(
        request,
        "renewals.html",
        result=result,
        query=query,
        tabs=tabs,
        customer=request.query_params.get("customer", ""),
        risks=renewals.RISKS,
        csv_href=with_params(request, "/ui/renewals.csv", due=query.due or "all"),
        **links(request, result.next_cursor),
    )


@pages.get("/renewals.csv")
async def renewals_csv(request: Request) -> Response:
    """The queue the page shows, every page of it, as a CSV (a formula start neutralised)."""
    query = queue_query(request)
    currency = request.app.state.settings.price_currency
    filename = f"renewals-{datetime.now(UTC):%Y%m%d-%H%M%S}.csv"
    return secure(
        StreamingResponse(
            renewals.queue_csv(reader(request), query, currency),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{filename}"'},
        )
    )


@pages.get("/orders")
async def orders_page(request: Request) -> Response:
    conn = reader(request)
    query = listing(request, orders.OrderPageQuery)
    partial, partial_count = None, 0
    incomplete: tuple[int, list[Any]] = (0, [])
    counted_at = None
    if not query.cursor and not query.status and not query.from_ and not query.to:
        # what needs a look leads the first page; a filtered view shows only its filter's
        partial = await orders.list_orders(
            conn, orders.OrderQuery(status="partially_failed", limit=20, order="newest")
        )
        partial_count = await orders.count_with_status(conn, "partially_failed")
        counted_at, incomplete = await kept_incomplete(request)
    result = await orders.list_orders(conn, query)
    return page(
        request,
        "orders.html",
        partial=partial,
        partial_count=partial_count,
        incomplete=incomplete,
        incomplete_at=counted_at,
        yesterday=datetime.now(UTC).date() - timedelta(days=1),
        orders=result.items,
        query=query,
        **links(request, result.next_cursor),
    )


@pages.get("/incomplete-orders")
async def incomplete_orders_page(request: Request) -> Response:
    total, items = await right_now.incomplete_orders(reader(request), 1000)
    return page(
        request,
        "incomplete_orders.html",
        total=total,
        items=items,
        days=right_now.RECENT_DAYS,
    )


def quick_ranges(query: failed_domains.FailedDomainQuery) -> list[tuple[str, str, str]]:
    """Yesterday, today and the last 7 days, keeping the other filters."""
    today = datetime.now(UTC).date()
    kept = {k: v for k, v in {"kind": query.kind, "userId": query.user_id}.items() if v}
    ranges = [
        ("yesterday", "Yesterday", today - timedelta(days=1), today - timedelta(days=1)),
        ("today", "Today", today, today),
        ("week", "Last 7 days", today - timedelta(days=6), today),
    ]
    return [
        (key, label, urlencode(kept | {"from": str(start), "to": str(end)}))
        for key, label, start, end in ranges
    ]


def failed_domain_query(request: Request) -> failed_domains.FailedDomainQuery:
    return query_of(request, failed_domains.FailedDomainQuery)


@pages.get("/failed-domains")
async def failed_domains_page(request: Request) -> Response:
    query = failed_domain_query(request)
    total, rows = await failed_domains.failed_domains(reader(request), query)
    return page(
        request,
        "failed_domains.html",
        query=query,
        total=total,
        rows=rows,
        quick=quick_ranges(query),
        csv_params=urlencode({k: v for k, v in request.query_params.items() if v}),
    )


@pages.get("/failed-domains.csv")
async def failed_domains_csv(request: Request) -> Response:
    """Streamed as it is read; its first rows are read before the answer starts, so a
    database away is its page, not a file cut short."""
    query = failed_domain_query(request)
    chunks = failed_domains.failed_domains_csv(reader(request), query, bom=True)
    first = await anext(chunks)

    async def body() -> AsyncIterator[bytes]:
        yield first
        async for chunk in chunks:
            yield chunk

    filename = f"failed-domains-{datetime.now(UTC):%Y%m%d-%H%M%S}.csv"
    return secure(
        StreamingResponse(
            body(),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{filename}"'},
        )
    )


@pages.get("/orders/{order_id:path}")
async def order_page(request: Request, order_id: str) -> Response:
    conn = reader(request)
    boxes = await mailboxes.list_mailboxes(
        conn, mailboxes.MailboxQuery(order_id=order_id, limit=500)
    )
    try:
        order: Any = await orders.get_order(conn, order_id)
    except (ApiError, ValidationError):
        if not boxes.items:
            raise PageError(404, "No such order.") from None
        order = None  # known only from its mailboxes: no order event has come
    return page(
        request,
        "order.html",
        order=order,
        order_id=order_id,
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


# Rows of each list on a customer's page; "all N" links to the list page filtered by the
# customer (a customer with 2,000 subscriptions and 10,000 mailboxes: 100 rows of each took
# the page past 150 ms at 1M mailboxes).
CUSTOMER_SHOWN = 20


@pages.get("/customers/{user_id:path}")
async def customer_page(request: Request, user_id: str) -> Response:
    """One customer (userId): what they pay a month, their renewals, subscriptions,
    mailboxes and orders, and the export of all their mailboxes."""
    conn = reader(request)
    newest = {"user_id": user_id, "limit": CUSTOMER_SHOWN, "order": "newest"}
    subs = await subscriptions.list_subscriptions(conn, subscriptions.SubscriptionQuery(**newest))
    boxes = await mailboxes.list_mailboxes(conn, mailboxes.MailboxQuery(**newest))
    its_orders = await orders.list_orders(conn, orders.OrderQuery(**newest))
    if not (subs.items or boxes.items or its_orders.items):
        raise PageError(404, "No customer with this userId: no subscription, mailbox or order.")
    due = await renewals_of(request, renewals.RenewalQuery(user_id=user_id, limit=CUSTOMER_SHOWN))
    emails = [x.user_email for x in subs.items] + [o.user_email for o in its_orders.items]
    email = next((e for e in emails if e), None)
    return page(
        request,
        "customer.html",
        user_id=user_id,
        email=email,
        cost=await subscriptions.customer_cost(conn, user_id),
        currency=request.app.state.settings.price_currency,
        renewals=due,
        subscriptions=subs,
        mailboxes=boxes,
        mailbox_count=await mailboxes.count_of_user(conn, user_id),
        subscription_count=await subscriptions.count_of_user(conn, user_id),
        orders=its_orders,
        order_count=await orders.count_of_user(conn, user_id),
        **await export_offer(request, conn, {"user_id": user_id}),
    )


@pages.get("/mailboxes")
async def mailboxes_page(request: Request) -> Response:
    """The newest mailboxes, or those a search finds (address, name, domain or ID); a search
    for a customer (their userId, or part of their email) also finds the customer, and
    when it finds one, their mailboxes."""
    conn = reader(request)
    query = listing(request, mailboxes.MailboxQuery)
    result = await mailboxes.list_mailboxes(conn, query)
    customers = await subscriptions.customers_matching(conn, query.q) if query.q else []
    theirs = None
    if len(customers) == 1 and not query.cursor:
        only = mailboxes.MailboxQuery(user_id=customers[0].user_id, limit=50, order="newest")
        theirs = await mailboxes.list_mailboxes(conn, only)
    return page(
        request,
        "mailboxes.html",
        search=query.q or "",
        user_id=query.user_id,
        customers=customers,
        theirs=theirs,
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
            conn,
            mailbox=[(mailbox_id, box.subscription_id)],
            order=[box.order_id] if box.order_id else [],
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
    query = listing(request, event_search.EventPageQuery)
    listed = await event_search.list_events(reader(request), query)
    # the next page searches the range this one did, not the 6 hours before its own time
    fixed = {"since": query.since.isoformat()} if query.q and query.since else {}
    return page(
        request,
        "events.html",
        events=listed.items,
        query=query,
        searched_to=listed.searched_to,
        slice=event_search.SEARCH_SLICE,
        default_window=not request.query_params.get("since"),
        default_hours=event_search.SEARCH_DEFAULT // timedelta(hours=1),
        next=next_link(request, listed.cursor, **fixed),
        first=first_link(request),
    )


@pages.get("/deliveries")
async def deliveries_page(request: Request) -> Response:
    span = request.query_params.get("range", "24h")
    if span not in get_args(deliveries.Range):
        raise PageError(422, "Bad filter: range is one of 24h, 7d, 30d.")
    since, step, buckets, tally = await deliveries.deliveries(
        reader(request), cast(deliveries.Range, span), settled_buckets(request)
    )
    return page(
        request,
        "deliveries.html",
        span=span,
        chart=chart.chart(tally, since, step, buckets),
        spool=await spool_state(request),
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
    "failed-domains": "failed domains",
    "failed-domains.csv": "failed domains",
    "incomplete-orders": "incomplete orders",
    "deliveries": "the delivery chart",
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
