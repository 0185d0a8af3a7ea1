"""Lists as keyset pages: their query models, filters, search and the walk's cursor."""

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    WithJsonSchema,
)
from pydantic.alias_generators import to_camel
from sqlalchemy import (
    Select,
    Table,
    Text,
    TextClause,
    exists,
    func,
    literal,
    literal_column,
    select,
    text,
    union_all,
)
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.selectable import NamedFromClause

from app.models import (
    MAILBOX_SEARCH,
    SUBSCRIPTION_SEARCH,
    mailbox_search,
    subscription_search,
)
from app.reading import resources
from app.reading.reader import Reader
from app.receiving.payloads import assume_utc


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

R = TypeVar("R", bound=resources.Resource)


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
    large delivery may hold low ids and commit after smaller ones with higher ids).
    A search (`q`, its text checked by apply_filters(paged=True)) pages its two legs
    (search_legs) each so, and their union."""
    cursor = decode_cursor(query.cursor)
    page = page_statement(stmt, table, query, cursor)
    rows = (await conn.execute(page, search=bool(getattr(query, "q", None)))).all()
    if len(rows) <= query.limit:
        return rows, None
    rows = rows[: query.limit]
    snapshot = cursor.snapshot or snapshot_parts(rows[-1].walk_snapshot)
    return rows, Cursor(rows[-1].id, snapshot).encode()


def page_statement(
    stmt: Select[Any], table: Table, query: ListQuery, cursor: Cursor
) -> Select[Any]:
    q = getattr(query, "q", None)
    legs = search_legs(stmt, table, q) if q and table.name in SIDES else [stmt]
    pages = [keyset(leg, table, query, cursor) for leg in legs]
    if len(pages) == 1:
        return pages[0]
    # by name: a select of the subquery's columns would build a proxy of each (3 ms a page)
    found = union_all(*pages).subquery("found")
    last: ColumnElement[Any] = literal_column("found.id")
    order = last.desc() if query.order == "newest" else last
    return (
        select(literal_column("found.*")).select_from(found).order_by(order).limit(query.limit + 1)
    )


def keyset(stmt: Select[Any], table: Table, query: ListQuery, cursor: Cursor) -> Select[Any]:
    """The page after `cursor`, one row more than asked (is there a next page?)."""
    if query.order == "newest":
        stmt = stmt.order_by(table.c.id.desc())
        if cursor.last_id:
            stmt = stmt.where(table.c.id < cursor.last_id)
    else:
        stmt = stmt.where(table.c.id > cursor.last_id).order_by(table.c.id)
    if cursor.snapshot:
        stmt = stmt.where(visible_to(table, cursor))
    else:
        stmt = stmt.add_columns(
            literal_column("pg_current_snapshot()::text").label("walk_snapshot")
        )
    return stmt.limit(query.limit + 1)


def visible_to(table: Table, cursor: Cursor) -> TextClause:
    """The rows committed before the walk's first page was read."""
    return text(
        f"pg_visible_in_snapshot({table.name}.created_xid::text::xid8, "
        "CAST(:walk_snapshot AS pg_snapshot))"
    ).bindparams(walk_snapshot=cursor.pg_snapshot)


async def list_page(
    conn: Reader, stmt: Select[Any], table: Table, query: ListQuery, model: type[R]
) -> resources.Page[R]:
    """A filtered keyset page of `table`, as `model` items."""
    stmt = apply_filters(stmt, table, filter_values(query), paged=True)
    rows, cursor = await fetch_page(conn, stmt, table, query)
    return resources.Page(
        items=[model.model_validate(r._asdict()) for r in rows], next_cursor=cursor
    )


def apply_filters(
    stmt: Select[Any], table: Table, filters: dict[str, Any], *, paged: bool = False
) -> Select[Any]:
    """The filters as conditions. `paged`: for fetch_page, which adds a search's legs."""
    for column, value in filters.items():
        if value is None:
            continue
        if column == "q" and paged:
            stmt = stmt.where(search_text(table).ilike(contains(value)))
        elif column == "q":
            stmt = stmt.where(matching(table, value))
        elif column == "updated_since":
            stmt = stmt.where(table.c.updated_at >= value)
        else:
            stmt = stmt.where(table.c[column] == value)
    return stmt


def filter_values(query: ListQuery) -> dict[str, Any]:
    return query.model_dump(exclude={"limit", "cursor", "order"}, by_alias=False)


def search_text(table: Table) -> ColumnElement[str]:
    """The text `q` searches, of the row as it is now."""
    expression = {"mailboxes": MAILBOX_SEARCH, "subscriptions": SUBSCRIPTION_SEARCH}
    return literal_column(f"({expression[table.name]})")


# The side tables the search indexer keeps (app/operations/search_index.py).
SIDES = {"mailboxes": mailbox_search, "subscriptions": subscription_search}


def written_since_mark(table: Table, rows: Table | NamedFromClause) -> ColumnElement[bool]:
    """The rows (of `table`, or an alias of it) the search indexer may not have copied as
    they are now. search_mark (migration 0026) is STABLE: the planner reads the mark when
    it estimates how many rows that is (a subquery's value it guesses as a third)."""
    return rows.c.search_written_at >= func.search_mark(literal(table.name, Text))


def matching(table: Table, q: str) -> ColumnElement[bool]:
    """Rows whose text holds `q`, exactly as the rows are now: the ids the side table's
    trigram index finds, with the rows written since the search indexer's mark (not yet
    copied, or copied before a change), each re-checked against its own current text, so
    a new row is found at once and a renamed one by its new text only. For a statement
    that reads every match (an export, a count); a page reads search_legs."""
    pattern, side, recent = contains(q), SIDES[table.name], table.alias("recent")
    candidates = union_all(
        select(side.c.id).where(side.c.text.ilike(pattern)),
        select(recent.c.id).where(written_since_mark(table, recent)),
    )
    return table.c.id.in_(candidates) & search_text(table).ilike(pattern)


def search_legs(stmt: Select[Any], table: Table, q: str) -> list[Select[Any]]:
    """`stmt` (its rows' own text checked) split in two disjoint legs: rows whose copied
    text holds `q`, and rows written since the mark whose copy does not. Each leg is a
    semi-join the planner can drive either way: from the trigram index for a rare `q`, or
    walking the table's ids and probing the copy for a common one, to the page's end."""
    side = SIDES[table.name]
    copied = exists().where(side.c.id == table.c.id, side.c.text.ilike(contains(q)))
    return [stmt.where(copied), stmt.where(written_since_mark(table, table), ~copied)]


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
