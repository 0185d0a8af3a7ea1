"""Mailboxes as the sending platforms' bulk-import CSVs (Instantly, Smartlead, EmailBison)
or our own full CSV, with each provider's IMAP/SMTP servers and the login that works there:
the app password for Google, the password for Microsoft 365. A mailbox that cannot log in
that way (Google without an app password, an unknown provider...) is left out of a
platform's file and named instead (`missing_login`); our own CSV carries every mailbox.

An export is audited first (one credential_reads row per mailbox, all with one export_id,
committed before the first byte); the rows streamed are exactly the audited ones, read in
batches by the audit row's id, so no connection is held while the client reads.
"""

import csv
import io
import unicodedata
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from sqlalchemy import ColumnElement, and_, case, or_, select

from app.crypto import Vault
from app.models import CREDENTIAL_COLUMNS, credential_reads, mailboxes

Format = Literal["instantly", "smartlead", "emailbison", "csv"]
PLATFORMS = ("instantly", "smartlead", "emailbison")  # the formats that log in somewhere
BATCH = 1000
BOM = "\ufeff"  # tells Excel the file is UTF-8 (without it "Müller" shows as "MÃ¼ller")
# A spreadsheet runs a cell beginning with one of these as a formula (the fullwidth ＝＋－＠
# too, compared after NFKC), even behind leading whitespace or invisible characters.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
# A cell starting with one of these (printable ASCII but those and the space) is no formula:
# neutralise needs no Unicode lookups for it (they were most of a CSV's Python time).
PLAIN_STARTS = frozenset(chr(c) for c in range(0x21, 0x7F)) - set(FORMULA_STARTS)
# Columns the platform logs in with: exported exactly as stored, never neutralised.
CREDENTIALS = frozenset({"login_password", "password", "app_password", "authenticator_secret"})
SERVERS = {  # imap host, imap port, smtp host, smtp port
    "GOOGLE": ("imap.gmail.com", 993, "smtp.gmail.com", 587),
    "MICROSOFT": ("outlook.office365.com", 993, "smtp.office365.com", 587),
}
# Each platform's whole bulk-import column list (sources in docs/api.md, "Exports"), and
# which of a mailbox's values fills each. A column whose value we do not know (limits,
# warmup, tracking, signature...) is left empty: the platform then applies its default.
COLUMNS: dict[Format, list[tuple[str, str]]] = {
    "instantly": [
        ("Email", "email"),
        ("First Name", "first_name"),
        ("Last Name", "last_name"),
        ("IMAP Username", "email"),
        ("IMAP Password", "login_password"),
        ("IMAP Host", "imap_host"),
        ("IMAP Port", "imap_port"),
        ("SMTP Username", "email"),
        ("SMTP Password", "login_password"),
        ("SMTP Host", "smtp_host"),
        ("SMTP Port", "smtp_port"),
        ("Daily Limit", ""),
        ("Warmup Enabled", ""),
        ("Warmup Limit", ""),
        ("Warmup Increment", ""),
    ],
    "smartlead": [
        ("from_name", "name"),
        ("from_email", "email"),
        ("user_name", "email"),
        ("password", "login_password"),
        ("smtp_host", "smtp_host"),
        ("smtp_port", "smtp_port"),
        ("imap_host", "imap_host"),
        ("imap_port", "imap_port"),
        ("max_email_per_day", ""),
        ("custom_tracking_url", ""),
        ("warmup_enabled", ""),
        ("total_warmup_per_day", ""),
        ("daily_rampup", ""),
        ("reply_rate_percentage", ""),
        ("bcc", ""),
        ("signature", ""),
        ("different_reply_to_address", ""),
        ("imap_user_name", "email"),
        ("imap_password", "login_password"),
    ],
    "emailbison": [
        ("Name", "name"),
        ("Email", "email"),
        ("Password", "login_password"),
        ("IMAP Server", "imap_host"),
        ("IMAP Port", "imap_port"),
        ("SMTP Server", "smtp_host"),
        ("SMTP Port", "smtp_port"),
        ("Daily Limit", ""),
        ("SMTP Secure", ""),
        ("IMAP Secure", ""),
    ],
    "csv": [
        ("mailboxId", "mailbox_id"),
        ("email", "email"),
        ("firstName", "first_name"),
        ("lastName", "last_name"),
        ("domain", "domain"),
        ("subscriptionId", "subscription_id"),
        ("orderId", "order_id"),
        ("provider", "provider"),
        ("imapHost", "imap_host"),
        ("imapPort", "imap_port"),
        ("smtpHost", "smtp_host"),
        ("smtpPort", "smtp_port"),
        ("password", "password"),
        ("appPassword", "app_password"),
        ("authenticatorSecret", "authenticator_secret"),
    ],
}
SELECTED = [
    credential_reads.c.id.label("audit_id"),
    mailboxes.c.mailbox_id,
    mailboxes.c.email,
    mailboxes.c.first_name,
    mailboxes.c.last_name,
    mailboxes.c.domain,
    mailboxes.c.subscription_id,
    mailboxes.c.order_id,
    mailboxes.c.provider,
    mailboxes.c.password_encrypted,
    mailboxes.c.app_password_encrypted,
    mailboxes.c.authenticator_secret_encrypted,
]


def missing_login() -> ColumnElement[str | None]:
    """Why a mailbox cannot log in on a sending platform, or NULL when it can. Such a
    mailbox is left out of the platforms' files and named instead: an empty password
    would be imported without a word and fail later."""
    provider = mailboxes.c.provider
    return case(
        (
            and_(provider == "GOOGLE", mailboxes.c.app_password_encrypted.is_(None)),
            "Google without an app password",
        ),
        (
            and_(provider == "MICROSOFT", mailboxes.c.password_encrypted.is_(None)),
            "Microsoft 365 without a password",
        ),
        (or_(provider.is_(None), provider.not_in(list(SERVERS))), "unknown provider"),
        else_=None,
    )


def neutralise(cell: str) -> str:
    """A cell a spreadsheet would run as a formula, made text by a leading quote. Whitespace
    and invisible characters (zero-width, BOM, bidi controls: Unicode's format category)
    before the start do not hide it."""
    if cell[:1] in PLAIN_STARTS:  # the common case, decided by its first character alone
        return cell
    for char in cell:
        if unicodedata.normalize("NFKC", char).startswith(FORMULA_STARTS):
            return f"'{cell}"
        if not (char.isspace() or unicodedata.category(char) == "Cf"):
            break
    return cell


def values(row: Any, vault: Vault) -> dict[str, Any]:
    """What the columns draw on, for one mailbox."""
    imap_host, imap_port, smtp_host, smtp_port = SERVERS.get(row.provider, ("", "", "", ""))
    secrets = vault.unseal({name: row._mapping[c] for name, c in CREDENTIAL_COLUMNS.items()})
    password, app_password = secrets["password"], secrets["app_password"]
    name = " ".join(part for part in (row.first_name, row.last_name) if part)
    return {
        **row._asdict(),
        "name": name,
        "imap_host": imap_host,
        "imap_port": imap_port,
        "smtp_host": smtp_host,
        "smtp_port": smtp_port,
        "password": password,
        "app_password": app_password,
        "authenticator_secret": secrets["authenticator_secret"],
        # Google's IMAP and SMTP take an app password; Microsoft 365's the mailbox password
        "login_password": app_password if row.provider == "GOOGLE" else password,
    }


def csv_text(rows: list[list[str]]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerows(rows)
    return out.getvalue()


def header(fmt: Format) -> str:
    return csv_text([[title for title, _ in COLUMNS[fmt]]])


def cell(key: str, known: dict[str, Any]) -> str:
    value = "" if not key or known[key] is None else str(known[key])
    return value if key in CREDENTIALS else neutralise(value)


def lines(fmt: Format, batch: list[Any], vault: Vault) -> str:
    cells = []
    for row in batch:
        known = values(row, vault)
        cells.append([cell(key, known) for _, key in COLUMNS[fmt]])
    return csv_text(cells)


Fetch = Callable[[Any], Any]


async def stream(
    fetch: Fetch, export_id: str, fmt: Format, vault: Vault, *, bom: bool
) -> AsyncIterator[str]:
    """The header (behind a BOM unless `bom` is false), then the audited mailboxes BATCH at
    a time (`fetch` runs a statement and returns its rows, holding a connection only while
    it does)."""
    yield (BOM if bom else "") + header(fmt)
    after = 0
    while True:
        stmt = (
            select(*SELECTED)
            .select_from(
                credential_reads.join(
                    mailboxes, mailboxes.c.mailbox_id == credential_reads.c.mailbox_id
                )
            )
            .where(credential_reads.c.export_id == export_id, credential_reads.c.id > after)
            .order_by(credential_reads.c.id)
            .limit(BATCH)
        )
        batch = (await fetch(stmt)).all()
        if not batch:
            return
        yield lines(fmt, batch, vault)
        after = batch[-1].audit_id
