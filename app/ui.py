"""The ops dashboard under /ui: server-rendered pages over the read API's own queries.

Sign-in takes an ops token and sets a session cookie: HMAC-signed, expiring, HttpOnly,
SameSite=Strict (Secure behind HTTPS), bound to a fingerprint of the token so that
removing the token from OPS_API_TOKENS ends its sessions. No page has a script, so the
Content-Security-Policy allows none. No page shows a credential, whoever signed in.
"""

import base64
import hashlib
import hmac
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlencode

import orjson
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import RedirectResponse
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, ValidationError
from sqlalchemy import func, select, text

from app import api, resources
from app.api import events, rejected, subscriptions
from app.crypto import fingerprint, token_matches
from app.errors import ApiError

COOKIE = "cmw_session"
SESSION_SECONDS = 8 * 3600
EXPIRING_DAYS = 14
CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
OUTCOMES = ("processed", "ignored", "duplicate", "rejected")
Q = TypeVar("Q", bound=BaseModel)
templates = Jinja2Templates(directory=Path(__file__).parent / "templates")
router = APIRouter(prefix="/ui", include_in_schema=False)


# --- the session ---------------------------------------------------------------------


def session_key(request: Request) -> bytes:
    """Derived from the first Fernet key: rotating keys signs everyone out."""
    first = request.app.state.settings.fernet_key_list[0]
    return hashlib.sha256(b"coldmail-webhooks ui session\0" + first.encode()).digest()


def mac(request: Request, payload: bytes) -> bytes:
    return hmac.new(session_key(request), payload, hashlib.sha256).digest()


def session_cookie(request: Request, token: str) -> str:
    payload = orjson.dumps({"exp": int(time.time()) + SESSION_SECONDS, "tok": fingerprint(token)})
    parts = (payload, mac(request, payload))
    return ".".join(base64.urlsafe_b64encode(part).decode() for part in parts)


def session_token_fingerprint(request: Request) -> str | None:
    """The signed-in token's fingerprint, if the cookie is genuine, current, and its token
    still configured."""
    value = request.cookies.get(COOKIE, "")
    try:
        payload, given = (base64.urlsafe_b64decode(part) for part in value.split("."))
        if not hmac.compare_digest(given, mac(request, payload)):
            return None
        session = orjson.loads(payload)
    except ValueError:
        return None
    settings = request.app.state.settings
    allowed = {fingerprint(t) for t in settings.ops_token_list + settings.credentials_token_list}
    if session.get("exp", 0) < time.time() or session.get("tok") not in allowed:
        return None
    return str(session["tok"])


class SignInRequired(Exception):
    """Raised by a page without a session: answered with a redirect to the sign-in page."""


def signed_in(request: Request) -> str:
    who = session_token_fingerprint(request)
    if who is None:
        raise SignInRequired()
    return who


def to_sign_in(request: Request, error: Exception) -> Response:
    return secure(RedirectResponse("/ui/login", status_code=303))


def secure(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-store"
    return response


def page(request: Request, name: str, status: int = 200, **context: Any) -> Response:
    context |= {"signed_in": name != "login.html", "path": request.url.path}
    return secure(templates.TemplateResponse(request, name, context, status_code=status))


@router.get("/login")
async def login_form(request: Request) -> Response:
    return page(request, "login.html")


@router.post("/login")
async def login(request: Request) -> Response:
    form = parse_qs((await request.body()).decode(errors="replace"))
    token = (form.get("token") or [""])[0].strip()
    settings = request.app.state.settings
    if not token_matches(token, settings.ops_token_list + settings.credentials_token_list):
        return page(request, "login.html", 401, error="That token is not an ops token.")
    response = RedirectResponse("/ui", status_code=303)
    response.set_cookie(
        COOKIE,
        session_cookie(request, token),
        max_age=SESSION_SECONDS,
        path="/ui",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return secure(response)


@router.post("/logout")
async def logout(request: Request) -> Response:
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


async def per_minute(conn: api.Reader, since: datetime) -> dict[str, dict[datetime, int]]:
    """Deliveries a minute by outcome. A duplicate counts at its event's last receipt (the
    sender retries within minutes, so events first seen in the 24 h before suffice)."""
    minute = "date_trunc('minute', {})"
    stmt = text(
        f"SELECT {minute.format('first_received_at')} AS m, status AS outcome, count(*) AS n"
        " FROM events WHERE first_received_at >= :since GROUP BY 1, 2"
        f" UNION ALL SELECT {minute.format('last_received_at')}, 'duplicate', sum(deliveries - 1)"
        " FROM events WHERE first_received_at >= :since - interval '1 day'"
        " AND last_received_at >= :since AND deliveries > 1 GROUP BY 1"
        f" UNION ALL SELECT {minute.format('received_at')}, 'rejected', count(*)"
        " FROM rejected_deliveries WHERE received_at >= :since GROUP BY 1"
    ).bindparams(since=since)
    counts: dict[str, dict[datetime, int]] = {outcome: {} for outcome in OUTCOMES}
    for row in await conn.execute(stmt):
        counts[row.outcome][row.m] = int(row.n)
    return counts


def chart(counts: dict[str, dict[datetime, int]], since: datetime) -> dict[str, Any]:
    """Stacked bars, one a minute, as one SVG path per outcome (drawn server-side)."""
    height, minutes = 120, 24 * 60
    totals = [
        sum(counts[o].get(since + timedelta(minutes=i), 0) for o in OUTCOMES)
        for i in range(minutes)
    ]
    peak = max(totals) or 1
    paths: dict[str, list[str]] = {outcome: [] for outcome in OUTCOMES}
    for i in range(minutes):
        at, base = since + timedelta(minutes=i), 0.0
        for outcome in OUTCOMES:
            n = counts[outcome].get(at, 0)
            if n:
                h = n / peak * height
                paths[outcome].append(f"M{i} {height - base - h:.1f}h1v{h:.1f}h-1z")
                base += h
    ticks = [
        {"x": i, "label": (since + timedelta(minutes=i)).strftime("%H:%M")}
        for i in range(0, minutes + 1, 180)
    ]
    return {
        "paths": {o: "".join(p) for o, p in paths.items()},
        "height": height,
        "width": minutes,
        "peak": peak,
        "ticks": ticks,
        "totals": {o: sum(counts[o].values()) for o in OUTCOMES},
    }


@pages.get("")
async def overview(request: Request) -> Response:
    conn = api.reader(request)
    # 1,440 minutes, the current one last
    since = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=24 * 60 - 1)
    counts = await per_minute(conn, since)
    signature_rows = await conn.execute(
        text(
            "SELECT signature, sum(n) AS n FROM ("
            " SELECT signature, count(*) AS n FROM events WHERE first_received_at >= :since"
            " GROUP BY 1 UNION ALL SELECT signature, count(*) FROM rejected_deliveries"
            " WHERE received_at >= :since GROUP BY 1) AS s GROUP BY 1 ORDER BY 2 DESC"
        ).bindparams(since=since)
    )
    conflicts, rejected_total = (
        await conn.execute(
            select(
                select(func.count()).select_from(events).where(events.c.conflict).scalar_subquery(),
                select(func.count()).select_from(rejected).scalar_subquery(),
            )
        )
    ).one()
    depth, oldest, room = await request.app.state.intake.spool.depth()
    last = await api.latest_reconciliation(conn)
    return page(
        request,
        "overview.html",
        chart=chart(counts, since),
        signatures=[(row.signature, int(row.n)) for row in signature_rows],
        conflicts=conflicts,
        rejected_total=rejected_total,
        spool={"depth": depth, "oldest": round(oldest or 0.0, 1), "room": room},
        reconcile=last,
    )


@pages.get("/orders")
async def orders_page(request: Request) -> Response:
    conn = api.reader(request)
    query = query_of(request, api.OrderQuery)
    partial = None
    if not query.cursor and not query.status:
        partial = await api.list_orders(conn, api.OrderQuery(status="partially_failed", limit=20))
    result = await api.list_orders(conn, query)
    return page(
        request,
        "orders.html",
        partial=partial,
        orders=result.items,
        next=next_link(request, result.next_cursor),
        query=query,
    )


@pages.get("/subscriptions")
async def subscriptions_page(request: Request) -> Response:
    conn = api.reader(request)
    query = query_of(request, api.SubscriptionQuery)
    soon = datetime.now(UTC) + timedelta(days=EXPIRING_DAYS)
    s = subscriptions.c
    expiring = await conn.execute(
        api.subscription_select()
        .where(s.expiry_date >= func.now(), s.expiry_date < soon)
        .order_by(s.expiry_date)
        .limit(20)
    )
    result = await api.list_subscriptions(conn, query)
    return page(
        request,
        "subscriptions.html",
        by_status=await api.counts_by(conn, subscriptions, "subscription_status"),
        expiring=[resources.Subscription.model_validate(r._asdict()) for r in expiring],
        expiring_days=EXPIRING_DAYS,
        subscriptions=result.items,
        next=next_link(request, result.next_cursor),
        query=query,
    )


@pages.get("/mailboxes")
async def mailboxes_page(request: Request) -> Response:
    """One search box: an address finds a mailbox, anything else a domain's mailboxes."""
    search = request.query_params.get("q", "").strip()
    found = None
    if search:
        field = "email" if "@" in search else "domain"
        cursor = request.query_params.get("cursor")
        try:
            query = api.MailboxQuery.model_validate({field: search, "cursor": cursor})
        except ValidationError:
            raise PageError(422, "Search for an email address or a domain.") from None
        found = await api.list_mailboxes(api.reader(request), query)
    return page(
        request,
        "mailboxes.html",
        search=search,
        mailboxes=found.items if found else None,
        next=next_link(request, found.next_cursor) if found else None,
    )


@pages.get("/events")
async def events_page(request: Request) -> Response:
    query = query_of(request, api.EventQuery)
    result = await api.list_events(api.reader(request), query)
    return page(
        request,
        "events.html",
        events=result.items,
        next=next_link(request, result.next_cursor),
        query=query,
    )


@pages.get("/events/{id}")
async def event_page(request: Request, id: str) -> Response:
    if not id.isdigit() or not 1 <= int(id) <= api.MAX_ROW_ID:
        raise PageError(404, "No such event.")
    try:
        event = await api.get_event(api.reader(request), int(id))
    except ApiError:
        raise PageError(404, "No such event.") from None
    payload = orjson.dumps(event.payload, option=orjson.OPT_INDENT_2).decode()
    return page(request, "event.html", event=event, payload=payload)


@pages.get("/rejected")
async def rejected_page(request: Request) -> Response:
    query = query_of(request, api.RejectedQuery)
    result = await api.list_rejected(api.reader(request), query)
    return page(
        request,
        "rejected.html",
        rejected=result.items,
        next=next_link(request, result.next_cursor),
        query=query,
    )
