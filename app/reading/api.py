"""The read-only ops API under /api/v1: bearer tokens, keyset pages, camelCase JSON."""

import re
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import quote

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    WithJsonSchema,
    model_validator,
)
from pydantic.alias_generators import to_camel
from sqlalchemy import (
    Select,
    Table,
    Text,
    func,
    insert,
    literal,
    literal_column,
    or_,
    select,
    text,
    true,
    union,
)
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql import Executable
from sqlalchemy.sql.elements import ColumnElement

from app.crypto import Vault, token_matches
from app.errors import ApiError, NotFound
from app.models import (
    EVENT_ABOUT,
    MAILBOX_SEARCH,
    SUBSCRIPTION_SEARCH,
    credential_reads,
    domains,
    events,
    mailboxes,
    order_domains,
    orders,
    reconciliations,
    rejected,
    subscriptions,
)
from app.reading import exports, renewals, resources
from app.receiving.edge import require_https
from app.receiving.payloads import HANDLED_EVENTS, assume_utc

bearer = HTTPBearer(
    auto_error=False, description="A token from OPS_API_TOKENS or CREDENTIALS_API_TOKENS"
)


def iso_only(value: object) -> object:
    """An ISO 8601 date or time, not a number read as a Unix time."""
    if isinstance(value, str) and not re.match(r"^\d{4}-\d{2}-\d{2}", value):
        raise ValueError("must be an ISO 8601 date or time, e.g. 2026-12-01T00:00:00Z")
    return value


def in_utc(value: datetime) -> datetime:
    """No offset means UTC; a time beyond the calendar once in UTC (year 0) is its edge."""
    try:
        return assume_utc(value).astimezone(UTC)
    except OverflowError:
        edge = datetime.min if value.year == 1 else datetime.max
        return edge.replace(tzinfo=UTC)


# Identifiers and filter values: PostgreSQL text cannot hold NUL, so refuse it as a 422.
Ident = Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=r"^[^\x00]+$")]
MAX_ROW_ID = 2**63 - 1
# Ids and xids of at most 18 digits: every cursor the pattern allows fits a bigint.
CURSOR_PATTERN = r"^[0-9]{1,18}(-[0-9]{1,18}){2,}$"
UtcTime = Annotated[
    datetime,
    BeforeValidator(iso_only),
    AfterValidator(in_utc),
    WithJsonSchema({"type": "string", "format": "date-time", "description": "No offset means UTC"}),
]
RowId = Annotated[int, Path(ge=1, le=MAX_ROW_ID)]
R = TypeVar("R", bound=resources.Resource)
UNAUTHORIZED = ApiError(401, {"error": "unauthorized"}, {"WWW-Authenticate": "Bearer"})
AUDIT_BATCH = 10_000  # mailboxes audited a statement (an export's audit, below)
SKIPPED_NAMED = 20  # mailboxes an export names in X-Export-Skipped-Mailboxes, at most
SKIPPED_HEADER_CHARS = 1024  # and their IDs together: proxies cap a response's headers


async def ops_token(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> str:
    settings = request.app.state.settings
    token = credentials.credentials if credentials else None
    allowed = settings.ops_token_list + settings.credentials_token_list
    if not token_matches(token, allowed):
        raise UNAUTHORIZED
    assert token is not None
    # who reads, as the dashboard's sessions know it: searches are counted per token
    request.state.signed_in = (await request.app.state.hashing.get()).fingerprint(token)
    return token


def credentials_token(request: Request, token: Annotated[str, Depends(ops_token)]) -> str:
    if not token_matches(token, request.app.state.settings.credentials_token_list):
        raise ApiError(403, {"error": "forbidden"})
    return token


SEARCHES_PER_TOKEN = 2  # of the read pool's 5 connections (per worker)
TOO_MANY_SEARCHES = ApiError(429, {"error": "too_many_searches"}, {"Retry-After": "1"})


class SearchSlots:
    """Searches under way per token (its fingerprint) in this process: one token cannot
    hold the read pool with them, and its searches beyond SEARCHES_PER_TOKEN get a 429."""

    def __init__(self) -> None:
        self.running: Counter[str] = Counter()

    @asynccontextmanager
    async def hold(self, who: str) -> AsyncIterator[None]:
        if self.running[who] >= SEARCHES_PER_TOKEN:
            raise TOO_MANY_SEARCHES
        self.running[who] += 1
        try:
            yield
        finally:
            self.running[who] -= 1
            if not self.running[who]:
                del self.running[who]


class Reader:
    """The read API's access to the database, for one token: each statement checks a
    connection out of the read pool (its own, small, with a statement_timeout and custom
    plans, so no read can starve deliveries) and gives it back with the rows, so none is
    held while a response is sent."""

    def __init__(self, engine: AsyncEngine, searches: SearchSlots, who: str) -> None:
        self.engine, self.searches, self.who = engine, searches, who

    async def execute(self, stmt: Executable, *, search: bool = False) -> Any:
        async with self.searches.hold(self.who) if search else nullcontext():
            async with self.engine.connect() as conn:
                return await conn.execute(stmt)  # buffered: every row is fetched here

    async def write(self, stmt: Executable) -> None:
        """Committed on return."""
        async with self.engine.begin() as conn:
            await conn.execute(stmt)


def reader(request: Request) -> Reader:
    """For the token that ops_token (or the dashboard's session) identified."""
    state = request.app.state
    return Reader(state.read_engine, state.searches, request.state.signed_in)


ReadConnection = Annotated[Reader, Depends(reader)]


def one_value_each(request: Request) -> None:
    """Every parameter takes one value: `?q=abc&q=x` is refused, not settled by quietly
    taking the last one (which the client may not have meant, and the schema forbids)."""
    given = Counter(key for key, _ in request.query_params.multi_items())
    if repeated := sorted(key for key, count in given.items() if count > 1):
        raise RequestValidationError(
            [{"loc": ("query", key), "msg": "given more than once", "type": "repeated"}
             for key in repeated]
        )  # fmt: skip


router = APIRouter(
    prefix="/api/v1",
    dependencies=[Depends(ops_token), Depends(one_value_each)],
    tags=["read API"],
    responses=resources.errors(401, 422, 500, 503),
)
ONE = resources.errors(404)  # for the routes that name one resource


class ListQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)

    limit: int = Field(50, ge=1, le=500, description="Page size, at most 500")
    order: Literal["newest", "oldest"] = Field(
        "oldest", description="newest: the latest first. Keep it for the whole walk."
    )
    cursor: str | None = Field(
        None,
        max_length=1024,
        pattern=CURSOR_PATTERN,
        description="`nextCursor` of the previous page. A walk returns every row committed "
        "before its first page was read, each exactly once; rows committed during the walk "
        "appear in the next walk.",
    )


@dataclass(frozen=True)
class Cursor:
    """Where a walk stands: the last id returned, and the snapshot its first page saw
    (PostgreSQL's xmin, xmax and in-progress xids), as "id-xmin-xmax[-xip...]"."""

    last_id: int = 0
    snapshot: tuple[int, ...] = ()

    def encode(self) -> str:
        return "-".join(str(n) for n in (self.last_id, *self.snapshot))

    @property
    def pg_snapshot(self) -> str:
        """Any cursor the pattern allows is a valid snapshot: out-of-range parts are clamped."""
        xmin = max(1, self.snapshot[0])
        xmax = max(xmin, self.snapshot[1])
        xips = sorted({x for x in self.snapshot[2:] if xmin <= x < xmax})
        return f"{xmin}:{xmax}:{','.join(map(str, xips))}"


def decode_cursor(cursor: str | None) -> Cursor:
    if cursor is None:
        return Cursor()
    last, *snapshot = (int(part) for part in cursor.split("-"))
    return Cursor(last, tuple(snapshot))


def snapshot_parts(text_: str) -> tuple[int, ...]:
    xmin, xmax, xips = text_.split(":")
    return (int(xmin), int(xmax), *(int(x) for x in xips.split(",") if x))


async def fetch_page(
    conn: Reader, stmt: Select[Any], table: Table, query: ListQuery
) -> tuple[Sequence[Any], str | None]:
    """Keyset pagination on the table's id, bounded by the first page's snapshot: each row
    committed before the walk began comes exactly once, whatever commits meanwhile (a
    large delivery may hold low ids and commit after smaller ones with higher ids)."""
    cursor = decode_cursor(query.cursor)
    if query.order == "newest":
        stmt = stmt.order_by(table.c.id.desc())
        if cursor.last_id:
            stmt = stmt.where(table.c.id < cursor.last_id)
    else:
        stmt = stmt.where(table.c.id > cursor.last_id).order_by(table.c.id)
    if cursor.snapshot:
        visible = text(
            f"pg_visible_in_snapshot({table.name}.created_xid::text::xid8, "
            "CAST(:walk_snapshot AS pg_snapshot))"
        ).bindparams(walk_snapshot=cursor.pg_snapshot)
        stmt = stmt.where(visible)
    else:
        stmt = stmt.add_columns(
            literal_column("pg_current_snapshot()::text").label("walk_snapshot")
        )
    searching = bool(getattr(query, "q", None))
    rows = (await conn.execute(stmt.limit(query.limit + 1), search=searching)).all()
    if len(rows) <= query.limit:
        return rows, None
    rows = rows[: query.limit]
    snapshot = cursor.snapshot or snapshot_parts(rows[-1].walk_snapshot)
    return rows, Cursor(rows[-1].id, snapshot).encode()


async def list_page(
    conn: Reader, stmt: Select[Any], table: Table, query: ListQuery, model: type[R]
) -> resources.Page[R]:
    """A filtered keyset page of `table`, as `model` items."""
    stmt = apply_filters(stmt, table, filter_values(query))
    rows, cursor = await fetch_page(conn, stmt, table, query)
    return resources.Page(
        items=[model.model_validate(r._asdict()) for r in rows], next_cursor=cursor
    )


def apply_filters(stmt: Select[Any], table: Table, filters: dict[str, Any]) -> Select[Any]:
    for column, value in filters.items():
        if value is None:
            continue
        if column == "q":
            stmt = stmt.where(search_text(table).ilike(contains(value)))
        elif column == "updated_since":
            stmt = stmt.where(table.c.updated_at >= value)
        else:
            stmt = stmt.where(table.c[column] == value)
    return stmt


def filter_values(query: ListQuery) -> dict[str, Any]:
    return query.model_dump(exclude={"limit", "cursor", "order"}, by_alias=False)


def search_text(table: Table) -> ColumnElement[str]:
    """The text `q` searches: the trigram index's own expression, so the index serves it."""
    expression = {"mailboxes": MAILBOX_SEARCH, "subscriptions": SUBSCRIPTION_SEARCH}
    return literal_column(f"({expression[table.name]})")


def contains(value: str) -> str:
    """An ILIKE pattern for `value` anywhere, its own % and _ taken literally (backslash is
    PostgreSQL's default LIKE escape)."""
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


SEARCH_MAX = 100
# The trigram index finds a substring by its 3-character pieces of letters or digits; a
# term with none would have PostgreSQL read every row. The letters are spelled out (Latin,
# Greek, Cyrillic, Hebrew, Arabic, kana, CJK, Hangul) rather than `\w`, which Python reads
# as Unicode and the OpenAPI document's readers (ECMA 262) as ASCII: both must agree.
LETTERS = (
    r"0-9A-Za-z\u00AA\u00B5\u00BA\u00C0-\u00D6\u00D8-\u00F6\u00F8-\u02AF"
    r"\u0370-\u03FF\u0400-\u052F\u05D0-\u05EA\u0620-\u064A\u3041-\u30FF"
    r"\u4E00-\u9FFF\uAC00-\uD7A3"
)
SEARCHABLE = f"[{LETTERS}]{{3}}"


def searchable(value: str) -> str:
    if not re.search(SEARCHABLE, value):
        raise ValueError("needs at least 3 letters or digits in a row")
    return value


Search = Annotated[
    str,
    StringConstraints(min_length=3, max_length=SEARCH_MAX, pattern=r"^[^\x00]+$"),
    AfterValidator(searchable),
    WithJsonSchema(
        {
            "type": "string",
            "minLength": 3,
            "maxLength": SEARCH_MAX,
            "pattern": f"^[^\\x00]*{SEARCHABLE}[^\\x00]*$",
        }
    ),
]


# --- subscriptions -------------------------------------------------------------------


def mailbox_count(
    subscription_id: ColumnElement[Any], order_id: ColumnElement[Any] | None = None
) -> Any:
    """A subscription's mailboxes; with `order_id`, only those that order brought."""
    stmt = select(func.count()).where(mailboxes.c.subscription_id == subscription_id)
    if order_id is not None:
        stmt = stmt.where(mailboxes.c.order_id == order_id)
    return stmt.scalar_subquery().label("mailbox_count")


class SubscriptionQuery(ListQuery):
    q: Search | None = Field(
        None,
        description="Case-insensitive substring of the domain, subscriptionId or user email; "
        "3 to 100 characters, 3 letters or digits in a row among them",
    )
    domain: Ident | None = None
    user_id: Ident | None = None
    user_email: Ident | None = None
    provider: resources.Provider | None = None
    source: Literal["standard", "prewarmed"] | None = None
    status: Literal["active", "failed"] | None = None
    subscription_status: resources.SubscriptionStatus | None = None
    expires_before: UtcTime | None = Field(None, description="ISO 8601; no offset means UTC")
    updated_since: UtcTime | None = Field(None, description="ISO 8601; no offset means UTC")


def subscription_select() -> Select[Any]:
    """Subscriptions with their mailbox count and their domain's registrar state (by the
    domain's ID, else its name)."""
    s, d = subscriptions.c, domains.c
    rank = func.domain_rank(d.status)  # alembic/versions/0009_merge_functions.py
    domain = (
        select(d.status, d.expiry_date)
        .where(or_(d.domain_id == s.domain_id, d.name == s.domain))
        .order_by(d.expiry_date.desc().nulls_last(), rank.desc().nulls_last(), d.version.desc())
        .limit(1)
        .lateral("domain")
    )
    visible = [c for c in subscriptions.c if c.name not in ("quantity", "lifecycle_quantity")]
    return select(
        *visible,
        func.coalesce(s.lifecycle_quantity, s.quantity).label("quantity"),
        mailbox_count(s.subscription_id),
        domain.c.status.label("domain_status"),
        domain.c.expiry_date.label("domain_expiry_date"),
    ).select_from(subscriptions.outerjoin(domain, true()))


SEARCHED = resources.errors(429)  # for the lists that take `q`


@router.get("/subscriptions", summary="List subscriptions (one per domain)", responses=SEARCHED)
async def list_subscriptions(
    conn: ReadConnection, query: Annotated[SubscriptionQuery, Query()]
) -> resources.Page[resources.Subscription]:
    filters = filter_values(query)
    expires_before = filters.pop("expires_before")
    stmt = apply_filters(subscription_select(), subscriptions, filters)
    if expires_before is not None:
        stmt = stmt.where(subscriptions.c.expiry_date < expires_before)
    rows, cursor = await fetch_page(conn, stmt, subscriptions, query)
    return resources.Page(
        items=[resources.Subscription.model_validate(r._asdict()) for r in rows], next_cursor=cursor
    )


@router.get(
    "/subscriptions/{subscription_id}", summary="One subscription with its mailboxes", responses=ONE
)
async def get_subscription(
    conn: ReadConnection, subscription_id: Annotated[Ident, Path()]
) -> resources.SubscriptionWithMailboxes:
    stmt = subscription_select().where(subscriptions.c.subscription_id == subscription_id)
    row = (await conn.execute(stmt)).first()
    if row is None:
        raise NotFound()
    boxes = await conn.execute(
        mailbox_select()
        .where(mailboxes.c.subscription_id == subscription_id)
        .order_by(mailboxes.c.id)
    )
    return resources.SubscriptionWithMailboxes.model_validate(
        {
            **row._mapping,
            "mailboxes": [resources.Mailbox.model_validate(b._asdict()) for b in boxes],
        }
    )


# --- renewals ------------------------------------------------------------------------

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class RenewalQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)

    within_days: int = Field(
        renewals.DEFAULT_DAYS, ge=1, le=366, description="Renewing within this many days"
    )
    limit: int = Field(50, ge=1, le=500, description="Page size, at most 500")
    cursor: str | None = Field(
        None, pattern=r"^-?[0-9]{1,17}-[0-9]{1,18}$", description="`nextCursor` of the last page"
    )

    def after(self) -> tuple[datetime, int] | None:
        """The last row's (end, id) of the previous page; a time beyond the calendar is its
        edge (any cursor the pattern allows is a valid one)."""
        if self.cursor is None:
            return None
        micros, _, row_id = self.cursor.rpartition("-")
        try:
            at = EPOCH + timedelta(microseconds=int(micros))
        except OverflowError:
            at = datetime.min.replace(tzinfo=UTC)
        return at, int(row_id)


def renewal_cursor(row: Any) -> str:
    return f"{(row.sort_at - EPOCH) // timedelta(microseconds=1)}-{row.id}"


@router.get("/renewals", summary="What renews within N days or is overdue, most urgent first")
async def list_renewals(
    request: Request, conn: ReadConnection, query: Annotated[RenewalQuery, Query()]
) -> resources.RenewalPage:
    """Each with its risks, mailbox count and monthly cost; `totals` per userId (computed at
    most once a minute: `totalsAt` says when)."""
    params = renewals.page_params(query.within_days, query.after(), query.limit + 1)
    rows = (await conn.execute(renewals.PAGE.bindparams(**params))).all()

    async def totals() -> list[Any]:
        sums = await conn.execute(renewals.TOTALS.bindparams(days=query.within_days))
        return [resources.RenewalTotal.model_validate(t._asdict()) for t in sums]

    totals_at, per_user = await request.app.state.renewal_totals.get(query.within_days, totals)
    cursor = renewal_cursor(rows[query.limit - 1]) if len(rows) > query.limit else None
    return resources.RenewalPage(
        items=[resources.Renewal.model_validate(r._asdict()) for r in rows[: query.limit]],
        next_cursor=cursor,
        totals=per_user,
        totals_at=totals_at,
    )


# --- mailboxes -----------------------------------------------------------------------


class MailboxFilters(BaseModel):
    model_config = ListQuery.model_config

    q: Search | None = Field(
        None,
        description="Case-insensitive substring of the email, first or last name, domain or "
        "mailboxId; 3 to 100 characters, 3 letters or digits in a row among them",
    )
    order_id: Ident | None = None
    updated_since: UtcTime | None = Field(None, description="ISO 8601; no offset means UTC")
    subscription_id: Ident | None = None
    domain: Ident | None = None
    email: Ident | None = None
    user_id: Ident | None = None
    provider: resources.Provider | None = None
    source: Literal["standard", "prewarmed"] | None = None


class MailboxQuery(ListQuery, MailboxFilters):
    pass


class ExportQuery(MailboxFilters):
    format: exports.Format = Field(description="Which platform's bulk-import columns")
    all: bool = Field(False, description="Every mailbox: needed when no filter is given")
    bom: bool = Field(True, description="Begin with a UTF-8 byte-order mark (for Excel)")

    def filters(self) -> dict[str, Any]:
        return self.model_dump(exclude={"format", "all", "bom"})

    @model_validator(mode="after")
    def chosen(self) -> "ExportQuery":
        """An export of every mailbox is asked for, never the default of a form left empty."""
        if not self.all and all(value is None for value in self.filters().values()):
            raise ValueError(
                "choose the mailboxes: give a filter (e.g. subscriptionId) or all=true"
            )
        return self


def mailbox_select() -> Select[Any]:
    """The columns the resource shows (never the ciphertext); whether each credential
    exists."""
    shown = [mailboxes.c[name] for name in resources.Mailbox.model_fields if name in mailboxes.c]
    return select(
        mailboxes.c.id,  # the keyset
        *shown,
        mailboxes.c.password_encrypted.is_not(None).label("has_password"),
        mailboxes.c.app_password_encrypted.is_not(None).label("has_app_password"),
        mailboxes.c.authenticator_secret_encrypted.is_not(None).label("has_authenticator_secret"),
    )


@router.get("/mailboxes", summary="List mailboxes", responses=SEARCHED)
async def list_mailboxes(
    conn: ReadConnection, query: Annotated[MailboxQuery, Query()]
) -> resources.Page[resources.Mailbox]:
    return await list_page(conn, mailbox_select(), mailboxes, query, resources.Mailbox)


@router.get("/mailboxes/{mailbox_id}", summary="One mailbox (never its credentials)", responses=ONE)
async def get_mailbox(
    conn: ReadConnection, mailbox_id: Annotated[Ident, Path()]
) -> resources.Mailbox:
    row = (await conn.execute(mailbox_select().where(mailboxes.c.mailbox_id == mailbox_id))).first()
    if row is None:
        raise NotFound()
    return resources.Mailbox.model_validate(row._asdict())


@router.get(
    "/mailboxes/{mailbox_id}/credentials",
    summary="Decrypted credentials (CREDENTIALS_API_TOKENS only, over HTTPS; every read is "
    "audited)",
    responses=resources.errors(403, 404),
)
async def get_credentials(
    request: Request,
    response: Response,
    conn: ReadConnection,
    mailbox_id: Annotated[Ident, Path()],
    token: Annotated[str, Depends(credentials_token)],
) -> resources.Credentials:
    require_https(request.scope)
    columns = [
        mailboxes.c.password_encrypted,
        mailboxes.c.app_password_encrypted,
        mailboxes.c.authenticator_secret_encrypted,
    ]
    row = (await conn.execute(select(*columns).where(mailboxes.c.mailbox_id == mailbox_id))).first()
    if row is None:
        raise NotFound()
    vault: Vault = request.app.state.vault
    await conn.write(  # committed before any value is decrypted: no read without its audit
        insert(credential_reads).values(
            mailbox_id=mailbox_id,
            token_fingerprint=(await request.app.state.hashing.get()).fingerprint(token),
            client_address=request.client.host if request.client else None,
        )
    )
    response.headers["Cache-Control"] = "no-store"
    password, app_password, secret = (vault.decrypt_text(value) for value in row)
    return resources.Credentials(
        mailbox_id=mailbox_id,
        password=password,
        app_password=app_password,
        authenticator_secret=secret,
    )


SKIPPED_HEADERS = {
    "X-Export-Skipped": {
        "description": "How many chosen mailboxes were left out: they cannot log in on the "
        "platform (Google without an app password, unknown provider); always 0 for csv",
        "schema": {"type": "integer"},
    },
    "X-Export-Skipped-Mailboxes": {
        "description": f"The first of them (at most {SKIPPED_NAMED}, about "
        f"{SKIPPED_HEADER_CHARS} characters): their mailboxIds, each percent-encoded, "
        "comma-separated; present when any was left out",
        "schema": {"type": "string"},
    },
}


@router.get(
    "/exports/mailboxes",
    summary="Mailboxes with credentials as a sending platform's bulk-import CSV "
    "(CREDENTIALS_API_TOKENS only, over HTTPS; every mailbox exported is audited)",
    response_class=StreamingResponse,
    responses={
        **resources.errors(403),
        200: {"content": {"text/csv": {}}, "headers": SKIPPED_HEADERS},
    },
)
async def export_mailboxes(
    request: Request,
    conn: ReadConnection,
    query: Annotated[ExportQuery, Query()],
    token: Annotated[str, Depends(credentials_token)],
) -> StreamingResponse:
    """The mailboxes a filter chooses, or every one with `all=true` (neither: 422). For a
    platform's format, mailboxes that cannot log in there are left out and named in the
    X-Export-Skipped headers."""
    fingerprint = (await request.app.state.hashing.get()).fingerprint(token)
    return await export_response(request, conn, query, fingerprint)


async def export_response(
    request: Request, conn: Reader, query: ExportQuery, fingerprint: str
) -> StreamingResponse:
    """Audit every mailbox the filters choose that the file can carry (committed before the
    first byte: none leaves without its row), then stream exactly those. A mailbox left out
    is not audited: nothing secret of it is sent."""
    require_https(request.scope)
    export_id = uuid.uuid4().hex
    client = request.client.host if request.client else None
    chosen = select(
        mailboxes.c.id,
        mailboxes.c.mailbox_id,
        literal(fingerprint).label("token_fingerprint"),
        literal(client, Text).label("client_address"),
        literal(export_id).label("export_id"),
    ).where(mailboxes.c.erased_at.is_(None))
    skipped: tuple[int, list[Any]] = (0, [])
    if query.format in exports.PLATFORMS:
        chosen = chosen.where(exports.missing_login().is_(None))
        skipped = await cannot_export(conn, query.filters(), limit=SKIPPED_NAMED)
    await audit_export(conn, apply_filters(chosen, mailboxes, query.filters()))
    filename = f"mailboxes-{query.format}-{datetime.now(UTC):%Y%m%d-%H%M%S}.csv"
    vault = request.app.state.vault
    return StreamingResponse(
        exports.stream(conn.execute, export_id, query.format, vault, bom=query.bom),
        media_type="text/csv; charset=utf-8",
        headers={
            "Cache-Control": "no-store",
            "Content-Disposition": f'attachment; filename="{filename}"',
            **skipped_headers(*skipped),
        },
    )


async def cannot_export(
    conn: Reader, filters: dict[str, Any], *, limit: int
) -> tuple[int, list[Any]]:
    """The chosen mailboxes that cannot log in on a sending platform: how many, and the
    first `limit` of them (mailbox_id, email, reason) in mailbox order."""
    reason = exports.missing_login()
    stmt = select(mailboxes.c.mailbox_id, mailboxes.c.email, reason.label("reason")).where(
        mailboxes.c.erased_at.is_(None), reason.is_not(None)
    )
    stmt = apply_filters(stmt, mailboxes, filters)
    first = list((await conn.execute(stmt.order_by(mailboxes.c.id).limit(limit))).all())
    if len(first) < limit:
        return len(first), first
    counted = select(func.count()).select_from(stmt.subquery())
    return (await conn.execute(counted)).scalar_one(), first


def skipped_headers(count: int, first: list[Any]) -> dict[str, str]:
    """X-Export-Skipped, and the IDs that fit in SKIPPED_HEADER_CHARS (percent-encoded:
    an ID may hold a comma or characters a header cannot)."""
    named: list[str] = []
    for row in first:
        quoted = quote(row.mailbox_id, safe="")
        if len(",".join([*named, quoted])) > SKIPPED_HEADER_CHARS:
            break
        named.append(quoted)
    headers = {"X-Export-Skipped": str(count)}
    if named:
        headers["X-Export-Skipped-Mailboxes"] = ",".join(named)
    return headers


async def audit_export(conn: Reader, chosen: Select[Any]) -> None:
    """One credential_reads row per chosen mailbox, in mailbox order, AUDIT_BATCH mailboxes
    a statement: each well inside the read pool's statement timeout however many mailboxes
    an export holds (one statement for a million took 9.2 of its 10 s). One transaction:
    the rows appear, and the export streams, all or none."""
    columns = ["mailbox_id", "token_fingerprint", "client_address", "export_id"]
    async with conn.engine.begin() as db:
        after: int | None = 0
        while after is not None:
            batch = chosen.where(mailboxes.c.id > after).order_by(mailboxes.c.id)
            batch_cte = batch.limit(AUDIT_BATCH).cte("batch")
            written = insert(credential_reads).from_select(
                columns, select(*(batch_cte.c[name] for name in columns)).order_by(batch_cte.c.id)
            )
            after = (
                await db.execute(select(func.max(batch_cte.c.id)).add_cte(written.cte("audit")))
            ).scalar_one()


class AuditQuery(ListQuery):
    mailbox_id: Ident | None = None


@router.get(
    "/audit/credential-reads",
    summary="The credential-read audit trail (CREDENTIALS_API_TOKENS only)",
    responses=resources.errors(403),
    dependencies=[Depends(credentials_token)],
)
async def list_credential_reads(
    conn: ReadConnection, query: Annotated[AuditQuery, Query()]
) -> resources.Page[resources.CredentialRead]:
    return await list_page(
        conn, select(credential_reads), credential_reads, query, resources.CredentialRead
    )


# --- orders --------------------------------------------------------------------------


class OrderQuery(ListQuery):
    status: Literal["succeeded", "failed", "partially_failed"] | None = None
    kind: Literal["mailbox", "prewarmup"] | None = None
    user_id: Ident | None = None


async def with_domains(conn: Reader, rows: Sequence[Any]) -> list[resources.Order]:
    """Attach each order's domains, fetched for the whole page in one query."""
    ids = [row.order_id for row in rows]
    stmt = (
        select(
            order_domains,
            mailbox_count(order_domains.c.subscription_id, order_domains.c.order_id),
        )
        .where(order_domains.c.order_id.in_(ids))
        .order_by(order_domains.c.domain)
    )
    domains: dict[str, list[resources.OrderDomain]] = {order_id: [] for order_id in ids}
    for domain in await conn.execute(stmt):
        domains[domain.order_id].append(resources.OrderDomain.model_validate(domain._asdict()))
    return [
        resources.Order.model_validate({**row._mapping, "domains": domains[row.order_id]})
        for row in rows
    ]


@router.get("/orders", summary="List orders with each domain's outcome")
async def list_orders(
    conn: ReadConnection, query: Annotated[OrderQuery, Query()]
) -> resources.Page[resources.Order]:
    stmt = apply_filters(select(orders), orders, filter_values(query))
    rows, cursor = await fetch_page(conn, stmt, orders, query)
    return resources.Page(items=await with_domains(conn, rows), next_cursor=cursor)


@router.get("/orders/{order_id}", summary="One order with each domain's outcome", responses=ONE)
async def get_order(conn: ReadConnection, order_id: Annotated[Ident, Path()]) -> resources.Order:
    row = (await conn.execute(select(orders).where(orders.c.order_id == order_id))).first()
    if row is None:
        raise NotFound()
    return (await with_domains(conn, [row]))[0]


# --- events and rejected deliveries --------------------------------------------------


class EventQuery(ListQuery):
    event: Ident | None = None
    status: Literal["processed", "ignored"] | None = None
    event_id: Ident | None = None
    conflict: bool | None = None


def event_select(*, payload: bool = True) -> Select[Any]:
    hidden = {"body_encrypted", "content_hash"} | (set() if payload else {"payload"})
    return select(*[c for c in events.c if c.name not in hidden])


@router.get("/events", summary="List stored events (payloads redacted)")
async def list_events(
    conn: ReadConnection, query: Annotated[EventQuery, Query()]
) -> resources.Page[resources.EventSummary]:
    """Without payloads (up to MAX_BODY_BYTES each): `GET /events/{id}` has it."""
    select_ = event_select(payload=False)
    return await list_page(conn, select_, events, query, resources.EventSummary)


@router.get(
    "/events/{id}",
    summary="One stored event: redacted payload, deliveries, signature",
    responses=ONE,
)
async def get_event(conn: ReadConnection, id: RowId) -> resources.Event:
    row = (await conn.execute(event_select().where(events.c.id == id))).first()
    if row is None:
        raise NotFound()
    return resources.Event.model_validate(row._asdict())


async def events_about(conn: Reader, limit: int = 50, **ids: Sequence[str]) -> list[Any]:
    """The latest events that name any of these IDs (order=, subscription=, mailbox=)."""
    wanted = [(EVENT_ABOUT[kind], value) for kind, values in ids.items() for value in values]
    wanted += [(EVENT_ABOUT["updated_mailbox"], value) for value in ids.get("mailbox", ())]
    if not wanted:
        return []
    # One index range per ID, each read backwards from its newest (an OR of them would
    # have the planner walk the whole table by id, hoping for an early match).
    latest = union(
        *(
            select(events.c.id)
            .where(literal_column(f"(payload #>> '{path}')") == value)
            .order_by(events.c.id.desc())
            .limit(limit)
            for path, value in wanted
        )
    ).subquery()
    stmt = (
        event_select(payload=False)
        .where(events.c.id.in_(select(latest.c.id)))
        .order_by(events.c.id.desc())
        .limit(limit)
    )
    return [resources.EventSummary.model_validate(r._asdict()) for r in await conn.execute(stmt)]


class RejectedQuery(ListQuery):
    event_id: Ident | None = None


def rejected_select() -> Select[Any]:
    return select(*[c for c in rejected.c if c.name != "body_encrypted"])


@router.get("/rejected", summary="List rejected deliveries with their errors (no body)")
async def list_rejected(
    conn: ReadConnection, query: Annotated[RejectedQuery, Query()]
) -> resources.Page[resources.Rejected]:
    return await list_page(conn, rejected_select(), rejected, query, resources.Rejected)


@router.get(
    "/rejected/{id}", summary="One rejected delivery with its errors (no body)", responses=ONE
)
async def get_rejected(conn: ReadConnection, id: RowId) -> resources.Rejected:
    row = (await conn.execute(rejected_select().where(rejected.c.id == id))).first()
    if row is None:
        raise NotFound()
    return resources.Rejected.model_validate(row._asdict())


# --- stats ---------------------------------------------------------------------------


async def counts_by(conn: Reader, table: Table, column: str) -> dict[str, int]:
    """Rows per value; `unknown` for rows where the sender never said."""
    rows = await conn.execute(select(table.c[column], func.count()).group_by(table.c[column]))
    return {"unknown" if key is None else str(key): count for key, count in rows}


@router.get(
    "/reconciliation",
    summary="The last reconcile's report: drift against the sender's subscriptions API",
    responses=resources.errors(404),
)
async def last_reconciliation(conn: ReadConnection) -> dict[str, Any]:
    row = await latest_reconciliation(conn)
    if row is None:
        raise NotFound()
    return dict(row.report)


async def latest_reconciliation(conn: Reader) -> Any:
    """The last reconcile's row (ran_at, report), or None."""
    stmt = select(reconciliations.c.ran_at, reconciliations.c.report)
    return (await conn.execute(stmt.order_by(reconciliations.c.id.desc()).limit(1))).first()


def replayable_count() -> Any:
    """Stored as ignored, of a type this version applies, and not for want of an ID."""
    identified = text(
        "NOT EXISTS (SELECT 1 FROM jsonb_array_elements_text(events.warnings) AS w "
        "WHERE w LIKE 'stored as ignored:%')"
    )
    return (
        select(func.count())
        .select_from(events)
        .where(events.c.status == "ignored", events.c.event.in_(sorted(HANDLED_EVENTS)))
        .where(identified)
        .scalar_subquery()
    )


CONFLICTS = select(func.count()).select_from(events).where(events.c.conflict).scalar_subquery()
REJECTED = select(func.count()).select_from(rejected).scalar_subquery()
# last_received_at is first_received_at until a duplicate arrives: the later of the two
# maxima, each read from its index (ix_events_last_received_at holds only duplicates).
LAST_DELIVERY = func.greatest(
    select(func.max(events.c.first_received_at)).scalar_subquery(),
    select(func.max(events.c.last_received_at))
    .where(text("deliveries > 1"))  # a literal, so every plan can use the partial index
    .scalar_subquery(),
)


@router.get("/stats", summary="What ops checks first: counts and the last delivery time")
async def stats(request: Request, conn: ReadConnection) -> resources.Stats:
    by_provider = await counts_by(conn, mailboxes, "provider")
    scalars = select(
        select(func.count()).select_from(subscriptions).scalar_subquery(),
        CONFLICTS,
        REJECTED,
        LAST_DELIVERY,
        replayable_count(),
    )
    subs, conflicts, rejected_count, last, replayable = (await conn.execute(scalars)).one()
    return resources.Stats(
        subscriptions=subs,
        mailboxes=sum(by_provider.values()),
        mailboxes_by_provider=by_provider,
        mailboxes_by_source=await counts_by(conn, mailboxes, "source"),
        orders_by_status=await counts_by(conn, orders, "status"),
        events_by_status=await counts_by(conn, events, "status"),
        conflicts=conflicts,
        rejected_deliveries=rejected_count,
        replayable_events=replayable,
        last_delivery_at=last,
        signature_forms=sorted(await request.app.state.signature_forms.accepted())
        if request.app.state.settings.signing_key
        else [],
    )
