"""The merge rules: what each event does to each table, in one place.

Events arrive late, twice and out of order; every effect below is an upsert keyed by the
provider's own IDs whose result does not depend on arrival order. A column's policy says
how the stored value and the event's value combine:

  OVERWRITE      the event's value replaces the stored one (when the event has one)
  FILL           the event's value is taken only while the stored one is empty
  LATEST         the later of the two dates is kept
  LEAST          the smaller of the two is kept (of several failure reasons, always the same)
  SNAPSHOT       like OVERWRITE, but a column an edit has set keeps the edit's value
  EDIT           the later edit wins: each edited column remembers its edit's version
                 (`field_versions`), and an edit applies only if its version is greater
  VERSIONS       keeps, per column, the greatest edit version seen (goes with EDIT)
  ACTIVE_WINS    a subscription that succeeded once stays active; a failure never demotes it
  SUCCESS_WINS   a domain reported both ways stays succeeded; the failure reason is kept
  PERIOD         the subscription.* rule for the period (periodStart, periodEnd): a later
                 period (greater periodEnd) wins; within one period the further state
                 (ACTIVE < RENEWING < PAST_DUE < EXPIRED < CANCELLED); when either event has
                 no period, the later event. What the winner leaves out, the other fills in,
                 so the result is the same in either order
  LIFECYCLE      the same for the state (status, autoRenew, quantity), except that
                 CANCELLED is final (only another CANCELLED can replace it). So a cancelled
                 subscription shows CANCELLED with the latest period known, whichever
                 arrived first, and its expiryDate is that periodEnd: a late cancellation
                 of an older period does not roll back a renewal's period
  DOMAIN_STATE   the domain.* rule: the same with the domain's expiry date and states
                 ACTIVE < RENEWAL_FAILED < GRACE_PERIOD < EXPIRED < FAILED, nothing final;
                 events combine per domainId, and per name when they carry no domainId.
                 A name may so have several rows (registered again under a new domainId,
                 or also heard of by name alone): a subscription shows the winner among
                 the rows of its domainId and of its domain name, by the later expiry
                 date (a known one first), then the further state, then the later event
and a declaration's `erasable` columns: a mailbox erased by `erase` keeps its personal
fields and credentials empty whatever arrives later.

Each Policy below is the SQL a column of that policy gets. The rules longer than a
coalesce are SQL functions, written once in app/recording/merge_functions.sql:
period_wins, lifecycle_wins and domain_wins (with winner_first), unless_edited, edit_wins
and latest_versions. PostgreSQL inlines them into the statements. A migration applies that
file (CREATE OR REPLACE); a change to it needs a new migration that applies it again
(see apply_functions below).

A version is an event's time, then its eventId, then its content (effects.version): the
time is the signed `cmr-x-timestamp` when the signature was valid, else the first receipt;
`replay` applies a stored event at its stored time.
A delivery is written by one statement: the event's record, and each upsert below for all
its rows, applied only when the record is new (record.py); a prewarmup order's mailbox
snapshots follow in a few parts, in the same transaction. In a group commit
(app/recording/batches.py) a mailbox.created's statement only inserts its mailbox
(`Upsert.sql(insert_only=True)`); when the mailbox was already stored, its full upsert
follows in the group's transaction, after the group's other statements: a snapshot and
an edit combine alike in either order (field_versions), and two snapshots of one mailbox
still apply in the group's eventId order. Derived values (an order's status, a
subscription's quantity and first order) are then recomputed from their parts by the
plain statement at the end of this module, in the same transaction.
"""

import hashlib
import re
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy.dialects import postgresql

from app.models import SEARCH_COLUMNS, Base

DIALECT = postgresql.dialect()  # type: ignore[no-untyped-call]
FUNCTIONS_FILE = Path(__file__).with_name("merge_functions.sql")


def functions_sha256() -> str:
    return hashlib.sha256(FUNCTIONS_FILE.read_bytes()).hexdigest()


def function_statements() -> list[str]:
    """merge_functions.sql, one CREATE OR REPLACE FUNCTION statement each (each ends with
    a line `$$;`)."""
    parts = re.split(r"^\$\$;$", FUNCTIONS_FILE.read_text(), flags=re.MULTILINE)
    return [part.strip() + "\n$$" for part in parts if "CREATE OR REPLACE" in part]


def apply_functions(execute: Any, sha256: str) -> None:
    """For a migration written when the file's SHA-256 was `sha256`: (re)create the
    functions. If the file has changed since, a later migration applies it (the newest
    one names its SHA-256: tests/test_migrations.py), so this one leaves them alone: the
    new file may need columns that a migration after this one adds."""
    if functions_sha256() == sha256:
        for statement in function_statements():
            execute(statement)


class Policy(StrEnum):
    """Each policy's SQL, written once: `old` is the stored row, EXCLUDED the event's. The
    functions named here are in app/recording/merge_functions.sql."""

    OVERWRITE = "coalesce(EXCLUDED.{c}, old.{c})"
    FILL = "coalesce(old.{c}, EXCLUDED.{c})"
    LATEST = "greatest(old.{c}, EXCLUDED.{c})"
    LEAST = "least(old.{c}, EXCLUDED.{c})"
    SNAPSHOT = "unless_edited(old.field_versions, '{c}', EXCLUDED.{c}, old.{c})"
    EDIT = (
        "CASE WHEN edit_wins(old.field_versions, EXCLUDED.field_versions, '{c}')"
        " THEN EXCLUDED.{c} ELSE old.{c} END"
    )
    VERSIONS = "latest_versions(old.{c}, EXCLUDED.{c})"
    ACTIVE_WINS = "CASE WHEN 'active' IN (old.{c}, EXCLUDED.{c}) THEN 'active' ELSE 'failed' END"
    SUCCESS_WINS = (
        "CASE WHEN 'succeeded' IN (old.{c}, EXCLUDED.{c}) THEN 'succeeded' ELSE 'failed' END"
    )
    PERIOD = "winner_first(period_wins(old, EXCLUDED), EXCLUDED.{c}, old.{c})"
    LIFECYCLE = "winner_first(lifecycle_wins(old, EXCLUDED), EXCLUDED.{c}, old.{c})"
    DOMAIN_STATE = "winner_first(domain_wins(old, EXCLUDED), EXCLUDED.{c}, old.{c})"


@dataclass(frozen=True, eq=False)  # one object per declaration: hashed by identity
class Upsert:
    """INSERT any number of rows (one array parameter per column, unnested); on a key
    conflict each column combines by its policy. `columns` lists every column given, key
    columns included."""

    table: str
    key: tuple[str, ...]
    columns: dict[str, Policy | None]  # None: a key column, or set only on insert
    # Columns a row erased by `erase` (app/operations/privacy.py) keeps empty, whatever
    # arrives later.
    erasable: tuple[str, ...] = ()
    # When the key is a partial unique index: its predicate (ON CONFLICT ... WHERE).
    key_where: str = ""
    # Whether a row written may complete an order's or a subscription's mailboxes (the
    # outbound mailboxes.ready, app/outbound/derived.py): SQL of the row as written
    # (`old`), returned as `completes` (record.delivery_statement).
    completes: str = ""

    def combine(self, column: str, policy: Policy) -> str:
        expression = policy.format(c=column)
        if column in self.erasable:
            return f"CASE WHEN old.erased_at IS NULL THEN {expression} END"
        return expression

    @cached_property
    def names(self) -> tuple[str, ...]:
        return tuple(self.columns)

    @cached_property
    def types(self) -> tuple[str, ...]:
        """Each column's SQL type, as the models declare it (for the array parameters)."""
        table = Base.metadata.tables[self.table]
        return tuple(table.c[c].type.compile(dialect=DIALECT) for c in self.names)

    def sql(
        self,
        first: int = 1,
        *,
        many: bool = True,
        gate: str | None = None,
        completes: bool,
        insert_only: bool = False,
    ) -> str:
        """The statement, its parameters numbered from `$first`: one array per column when
        `many`, else one value per column (cheaper to send). With `gate` (a CTE whose one
        row says `inserted`), it writes only when that is true: effects of a new event.
        Not `completes`: without RETURNING `completes` (no one would read it).
        `insert_only`: a key already stored is left alone (DO NOTHING), and the key of each
        row inserted is returned; the caller then applies this same upsert in full to the
        rows not inserted (record.insert_only). PostgreSQL builds a DO UPDATE's SET
        projections at each execution's start, used or not (issue 31, docs/benchmark.md)."""
        names = ", ".join(self.names)
        params = [f"${first + i}::{t}{'[]' if many else ''}" for i, t in enumerate(self.types)]
        if many:
            source = f"SELECT given.* FROM unnest({', '.join(params)}) AS given({names})"
            source += f", {gate} WHERE {gate}.inserted" if gate else ""
        else:
            source = f"SELECT {', '.join(params)}"
            source += f" FROM {gate} WHERE {gate}.inserted" if gate else ""
        where = f" WHERE {self.key_where}" if self.key_where else ""
        conflict = f"ON CONFLICT ({', '.join(self.key)}){where}"
        if insert_only:
            return (
                f"INSERT INTO {self.table} AS old ({names})\n{source}\n"
                f"{conflict} DO NOTHING\nRETURNING {', '.join(self.key)}"
            )
        sets = [f"{c} = {self.combine(c, policy)}" for c, policy in self.columns.items() if policy]
        sets.append("updated_at = now()")
        sets += self.search_written()
        returning = (
            f"\nRETURNING {self.completes} AS completes" if self.completes and completes else ""
        )
        return (
            f"INSERT INTO {self.table} AS old ({names})\n{source}\n"
            f"{conflict} DO UPDATE SET\n    " + ",\n    ".join(sets) + returning
        )

    def search_written(self) -> list[str]:
        """search_written_at (models.SearchedMixin) moved to now() only when a searched
        column this upsert sets gets a new value: `old` is the row before the update."""
        given = [
            (c, policy)
            for c, policy in self.columns.items()
            if policy and c in SEARCH_COLUMNS.get(self.table, ())
        ]
        if not given:
            return []
        new = ", ".join(self.combine(c, policy) for c, policy in given)
        old = ", ".join(f"old.{c}" for c, _ in given)
        return [
            f"search_written_at = CASE WHEN ROW({new}) IS NOT DISTINCT FROM ROW({old})"
            " THEN old.search_written_at ELSE now() END"
        ]

    def parameters(self, rows: list[dict[str, Any]]) -> list[Any]:
        """The rows as parameters: one row's values, or one list per column for several
        (one row per key, the last given, sorted by key, so concurrent upserts of the same
        rows lock them in one order)."""
        if len(rows) == 1:
            return [rows[0].get(c) for c in self.names]
        unique = {tuple(row[k] for k in self.key): row for row in rows}
        ordered = [unique[k] for k in sorted(unique)]
        return [[row.get(c) for row in ordered] for c in self.names]


P = Policy
IDENTITY_FILL: dict[str, Policy | None] = {
    c: P.FILL for c in ("domain", "domain_id", "user_id", "user_email", "provider")
}
IDENTITY_OVERWRITE: dict[str, Policy | None] = {c: P.OVERWRITE for c in IDENTITY_FILL}

# --- subscriptions --------------------------------------------------------------------

# mailbox.order.success and prewarmup.order.success: the order's word on the domain. A new
# subscription is written with the quantity and price DERIVE_ORDER would derive from this
# order alone, which then has nothing to change: its row is written once (a second write of
# a row just inserted, its page full, enters every index again). A known one gets them
# from DERIVE_ORDER only.
SUBSCRIPTION_ORDER_SUCCEEDED = Upsert(
    "subscriptions",
    ("subscription_id",),
    {"subscription_id": None, **IDENTITY_OVERWRITE, "source": P.OVERWRITE}
    | {"status": P.ACTIVE_WINS, "order_id": P.FILL, "expiry_date": P.LATEST}
    | {"quantity": None, "price": None},
)
# mailbox.order.failed: creates the subscription as failed; never demotes an active one.
SUBSCRIPTION_ORDER_FAILED = Upsert(
    "subscriptions",
    ("subscription_id",),
    {"subscription_id": None, **IDENTITY_FILL, "source": P.FILL, "status": P.ACTIVE_WINS}
    | {"order_id": P.FILL},
)
# mailbox.created: a mailbox exists, so the subscription does, and is active. Its mailboxes
# may be complete once it has a quantity: its own (lifecycle) or its orders' (DERIVE_ORDER).
# This is the row as written, after waiting for a concurrent order's transaction that
# wrote it: so a mailbox and its order recorded at once are never both told "not yet".
SUBSCRIPTION_MAILBOX_CREATED = Upsert(
    "subscriptions",
    ("subscription_id",),
    {"subscription_id": None, **IDENTITY_FILL, "source": P.FILL, "status": P.ACTIVE_WINS}
    | {"order_id": P.FILL, "expiry_date": P.LATEST},
    completes="old.quantity IS NOT NULL OR old.lifecycle_quantity IS NOT NULL",
)
# subscription.*: the lifecycle; a subscription first heard of this way is created.
SUBSCRIPTION_LIFECYCLE = Upsert(
    "subscriptions",
    ("subscription_id",),
    {"subscription_id": None, **IDENTITY_FILL, "status": P.ACTIVE_WINS}
    | {
        "subscription_status": P.LIFECYCLE,
        "period_start": P.PERIOD,
        "period_end": P.PERIOD,
        "auto_renew": P.LIFECYCLE,
        "lifecycle_quantity": P.LIFECYCLE,
        "lifecycle_version": P.LIFECYCLE,
        "lifecycle_source": P.LIFECYCLE,  # "event", or "reconciliation" (see reconcile.py)
        "expiry_date": P.LATEST,  # periodEnd becomes the expiry date
        # The latest renewal.failed (its time and the latest period one was for) and the
        # latest renewal.success (its time). The renewal failed (risk renewal_failed, see
        # app/reading/renewals.py) while the failure is later than any success and no
        # later period is known.
        "renewal_failed_at": P.LATEST,
        "renewal_failed_period_end": P.LATEST,
        "renewal_succeeded_at": P.LATEST,
    },
)

# --- mailboxes ------------------------------------------------------------------------

CREDENTIALS = ("password_encrypted", "app_password_encrypted", "authenticator_secret_encrypted")
# Personal fields and credentials: an erased mailbox keeps them empty.
ERASABLE = ("email", "first_name", "last_name", "user_name", "profile_picture", *CREDENTIALS)
SNAPSHOT_FIELDS = (
    "subscription_id",
    "domain",
    "email",
    "first_name",
    "last_name",
    "user_name",
    "profile_picture",
    "is_admin",
    "provider",
    "source",
    "user_id",
    "user_email",
    "order_id",
    "creation_time",
    "warming_up_from",
    "expiry_date",
    "price",
    "final_url",
    *CREDENTIALS,
)


def mailbox_snapshot(columns: tuple[str, ...], completes: str = "") -> Upsert:
    return Upsert(
        "mailboxes",
        ("mailbox_id",),
        {"mailbox_id": None} | {c: P.SNAPSHOT for c in columns},
        erasable=ERASABLE,
        completes=completes,
    )


# mailbox.created: a full snapshot of the mailbox. It may complete its order once the
# order has a domain that succeeded (an order recorded before this statement began; one
# recorded meanwhile wrote the subscription: SUBSCRIPTION_MAILBOX_CREATED).
MAILBOX_SNAPSHOT = mailbox_snapshot(
    SNAPSHOT_FIELDS,
    completes="EXISTS (SELECT FROM order_domains d"
    " WHERE d.order_id = old.order_id AND d.status = 'succeeded')",
)
# prewarmup.order.success: the same, of the fields a prewarmed mailbox has.
PREWARMED_SNAPSHOT = mailbox_snapshot(
    tuple(
        c for c in SNAPSHOT_FIELDS if c not in ("user_name", "creation_time", "price", "final_url")
    )
)
EDITABLE = ("first_name", "last_name", "user_name", "profile_picture")


@lru_cache(maxsize=64)
def mailbox_edit(columns: tuple[str, ...]) -> Upsert:
    """mailbox.updated (the given fields), mailbox.exported and mailbox.warmup.* (warmup
    status, credentials): edits, the later by time wins; identity fields only fill in."""
    return Upsert(
        "mailboxes",
        ("mailbox_id",),
        {"mailbox_id": None}
        | {c: P.FILL for c in ("domain", "email", "user_id", "user_email", "provider")}
        | {c: P.EDIT for c in columns}
        | {"exported_at": P.LATEST, "field_versions": P.VERSIONS},
        erasable=ERASABLE,
    )


# --- orders and their domains ---------------------------------------------------------

ORDER = Upsert(
    "orders",
    ("order_id",),
    {"order_id": None, "kind": P.FILL, "user_id": P.FILL, "user_email": P.FILL}
    | {"provider": P.FILL, "status": None, "failure_reason": P.LEAST},
)
ORDER_DOMAIN = Upsert(
    "order_domains",
    ("order_id", "domain"),
    {"order_id": None, "domain": None, "status": P.SUCCESS_WINS, "reason": P.LEAST}
    | {"subscription_id": P.FILL, "quantity": P.OVERWRITE, "price": P.OVERWRITE}
    | {"succeeded_version": P.LEAST},
)

# --- domains (domain.*) ---------------------------------------------------------------

_DOMAIN_COLUMNS: dict[str, Policy | None] = {
    "status": P.DOMAIN_STATE,
    "expiry_date": P.DOMAIN_STATE,
    "version": P.DOMAIN_STATE,
}
# One row per domainId; a name registered again under a new domainId gets a row of its own.
DOMAIN_BY_ID = Upsert(
    "domains", ("domain_id",), {"domain_id": None, "name": P.FILL, **_DOMAIN_COLUMNS}
)
# An event without a domainId: one row per name among such events (models.Domain).
DOMAIN_BY_NAME = Upsert(
    "domains", ("name",), {"name": None, **_DOMAIN_COLUMNS}, key_where="domain_id IS NULL"
)

# --- derived values -------------------------------------------------------------------

# An order's status from its domains' outcomes (and an order-level failure if any); then
# the order-scoped values of its subscriptions from their succeeded orders: `quantity` is
# their sum, `orderId` and `price` those of the first (earliest version). A subscription
# that already holds them is not written again.
DERIVE_ORDER = """
WITH order_status AS (
    UPDATE orders o SET updated_at = now(), status = (
        SELECT CASE
            WHEN count(*) = 0 THEN
                CASE WHEN o.failure_reason IS NULL THEN o.status ELSE 'failed' END
            WHEN bool_and(d.status = 'failed') THEN 'failed'
            WHEN bool_and(d.status = 'succeeded') AND o.failure_reason IS NULL THEN 'succeeded'
            ELSE 'partially_failed' END
        FROM order_domains d WHERE d.order_id = o.order_id)
    WHERE o.order_id = $1)
UPDATE subscriptions s SET updated_at = now(),
    quantity = coalesce(d.quantity, s.quantity),
    order_id = d.first_order,
    price = coalesce(d.first_price, s.price)
FROM (
    SELECT subscription_id, sum(quantity) AS quantity,
        (array_agg(order_id ORDER BY succeeded_version COLLATE "C", order_id))[1] AS first_order,
        (array_agg(price ORDER BY succeeded_version COLLATE "C", order_id))[1] AS first_price
    FROM order_domains
    WHERE subscription_id = ANY($2::text[]) AND status = 'succeeded'
    GROUP BY subscription_id) d
WHERE s.subscription_id = d.subscription_id
    AND (s.quantity, s.order_id, s.price) IS DISTINCT FROM
        (coalesce(d.quantity, s.quantity), d.first_order, coalesce(d.first_price, s.price))
"""
