"""An export of mailboxes as a download, for the API's route and the dashboard's form
alike: every mailbox it carries audited first, those the platform's file cannot carry
named."""

import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import (
    Field,
    model_validator,
)
from sqlalchemy import (
    Select,
    Text,
    func,
    insert,
    literal,
    select,
)

from app.models import (
    credential_reads,
    mailboxes,
)
from app.reading import exports
from app.reading.queries.mailboxes import MailboxFilters
from app.reading.queries.paging import apply_filters
from app.reading.reader import Reader
from app.receiving.edge import require_https

AUDIT_BATCH = 10_000  # mailboxes audited a statement (an export's audit, below)
SKIPPED_NAMED = 20  # mailboxes an export names in X-Export-Skipped-Mailboxes, at most
SKIPPED_HEADER_CHARS = 1024  # and their IDs together: proxies cap a response's headers


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
