"""The read-only ops API under /api/v1: its routes, each calling the query function the
dashboard's page calls too (app/reading/queries/); bearer tokens, camelCase JSON."""

from collections import Counter
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from sqlalchemy import insert, select

from app.crypto import Vault
from app.errors import NotFound
from app.models import CREDENTIAL_COLUMNS, credential_reads
from app.reading import exporting, renewals, resources
from app.reading.auth import credentials_token, ops_token
from app.reading.exporting import SKIPPED_HEADER_CHARS, SKIPPED_NAMED, ExportQuery
from app.reading.queries import counts, events, mailboxes, orders, subscriptions

# tests/test_query_plans.py reads the statements' builders here
from app.reading.queries.mailboxes import mailbox_select as mailbox_select
from app.reading.queries.paging import MAX_ROW_ID, Ident, ListQuery, list_page
from app.reading.queries.paging import apply_filters as apply_filters
from app.reading.queries.subscriptions import subscription_select as subscription_select
from app.reading.reader import Reader, reader
from app.receiving.edge import require_https

RowId = Annotated[int, Path(ge=1, le=MAX_ROW_ID)]
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
SEARCHED = resources.errors(429)  # for the lists that take `q`


# --- subscriptions -------------------------------------------------------------------


@router.get("/subscriptions", summary="List subscriptions (one per domain)", responses=SEARCHED)
async def list_subscriptions(
    conn: ReadConnection, query: Annotated[subscriptions.SubscriptionQuery, Query()]
) -> resources.Page[resources.Subscription]:
    return await subscriptions.list_subscriptions(conn, query)


@router.get(
    "/subscriptions/{subscription_id}", summary="One subscription with its mailboxes", responses=ONE
)
async def get_subscription(
    conn: ReadConnection, subscription_id: Annotated[Ident, Path()]
) -> resources.SubscriptionWithMailboxes:
    return await subscriptions.get_subscription(conn, subscription_id)


# --- renewals ------------------------------------------------------------------------


@router.get("/renewals", summary="What renews within N days or is overdue, most urgent first")
async def list_renewals(
    request: Request, conn: ReadConnection, query: Annotated[renewals.RenewalQuery, Query()]
) -> resources.RenewalPage:
    """Each with its risks, the part of the queue it is in (`due`), its mailbox count and
    monthly cost; `total` of every page the filters choose (`byDue`: per part), `totals` per
    userId over the whole list (sums computed at most once a minute: `totalsAt` says when).
    A cost whose price is unknown is not summed as 0: `unknownCost` counts those left out."""
    state = request.app.state
    return await renewals.list_renewals(
        conn, query, state.renewal_totals, state.settings.price_currency
    )


# --- mailboxes -----------------------------------------------------------------------


@router.get("/mailboxes", summary="List mailboxes", responses=SEARCHED)
async def list_mailboxes(
    conn: ReadConnection, query: Annotated[mailboxes.MailboxQuery, Query()]
) -> resources.Page[resources.Mailbox]:
    return await mailboxes.list_mailboxes(conn, query)


@router.get("/mailboxes/{mailbox_id}", summary="One mailbox (never its credentials)", responses=ONE)
async def get_mailbox(
    conn: ReadConnection, mailbox_id: Annotated[Ident, Path()]
) -> resources.Mailbox:
    return await mailboxes.get_mailbox(conn, mailbox_id)


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
    row = await mailboxes.credential_ciphertexts(conn, mailbox_id)
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
    return resources.Credentials(
        mailbox_id=mailbox_id, **vault.unseal(dict(zip(CREDENTIAL_COLUMNS, row, strict=True)))
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
    return await exporting.export_response(request, conn, query, fingerprint)


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


@router.get("/orders", summary="List orders with each domain's outcome")
async def list_orders(
    conn: ReadConnection, query: Annotated[orders.OrderQuery, Query()]
) -> resources.Page[resources.Order]:
    return await orders.list_orders(conn, query)


@router.get("/orders/{order_id}", summary="One order with each domain's outcome", responses=ONE)
async def get_order(conn: ReadConnection, order_id: Annotated[Ident, Path()]) -> resources.Order:
    return await orders.get_order(conn, order_id)


# --- events and rejected deliveries --------------------------------------------------


@router.get("/events", summary="List stored events (payloads redacted)")
async def list_events(
    conn: ReadConnection, query: Annotated[events.EventQuery, Query()]
) -> resources.Page[resources.EventSummary]:
    """Without payloads (up to MAX_BODY_BYTES each): `GET /events/{id}` has it."""
    return await events.list_events(conn, query)


@router.get(
    "/events/{id}",
    summary="One stored event: redacted payload, deliveries, signature",
    responses=ONE,
)
async def get_event(conn: ReadConnection, id: RowId) -> resources.Event:
    return await events.get_event(conn, id)


@router.get("/rejected", summary="List rejected deliveries with their errors (no body)")
async def list_rejected(
    conn: ReadConnection, query: Annotated[events.RejectedQuery, Query()]
) -> resources.Page[resources.Rejected]:
    return await events.list_rejected(conn, query)


@router.get(
    "/rejected/{id}", summary="One rejected delivery with its errors (no body)", responses=ONE
)
async def get_rejected(conn: ReadConnection, id: RowId) -> resources.Rejected:
    return await events.get_rejected(conn, id)


# --- stats ---------------------------------------------------------------------------


@router.get(
    "/reconciliation",
    summary="The last reconcile's report: drift against the sender's subscriptions API",
    responses=resources.errors(404),
)
async def last_reconciliation(conn: ReadConnection) -> dict[str, Any]:
    row = await counts.latest_reconciliation(conn)
    if row is None:
        raise NotFound()
    return dict(row.report)


@router.get("/stats", summary="What ops checks first: counts and the last delivery time")
async def stats(request: Request, conn: ReadConnection) -> resources.Stats:
    state = request.app.state
    forms = sorted(await state.signature_forms.accepted()) if state.settings.signing_key else []
    return await counts.stats(conn, forms)
