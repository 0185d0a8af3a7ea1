"""Mailboxes: what the resource shows of them (never a credential)."""

from typing import Any, Literal

from pydantic import (
    BaseModel,
    Field,
)
from sqlalchemy import (
    Select,
    func,
    select,
)

from app.errors import NotFound
from app.models import CREDENTIAL_COLUMNS, mailboxes
from app.reading import resources
from app.reading.queries.paging import Ident, ListQuery, Search, UtcTime, list_page
from app.reading.reader import Reader


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


async def list_mailboxes(conn: Reader, query: MailboxQuery) -> resources.Page[resources.Mailbox]:
    return await list_page(conn, mailbox_select(), mailboxes, query, resources.Mailbox)


async def get_mailbox(conn: Reader, mailbox_id: str) -> resources.Mailbox:
    row = (await conn.execute(mailbox_select().where(mailboxes.c.mailbox_id == mailbox_id))).first()
    if row is None:
        raise NotFound()
    return resources.Mailbox.model_validate(row._asdict())


async def credential_ciphertexts(conn: Reader, mailbox_id: str) -> Any:
    """A mailbox's sealed credentials (a row of CREDENTIAL_COLUMNS' columns, each None
    where unknown), or None if there is no such mailbox."""
    columns = [mailboxes.c[column] for column in CREDENTIAL_COLUMNS.values()]
    stmt = select(*columns).where(mailboxes.c.mailbox_id == mailbox_id)
    return (await conn.execute(stmt)).first()


async def count_of_user(conn: Reader, user_id: str) -> int:
    stmt = select(func.count()).where(mailboxes.c.user_id == user_id)
    count: int = (await conn.execute(stmt)).scalar_one()
    return count
