"""keyed content hashes and derived eventIds; server-side dashboard sessions

Content hashes and derived eventIds were plain SHA-256 of content that may hold a
credential: with the redacted copy beside them, a guess at a password could be checked
offline. From here on they are HMACs under a random server key (app/hashing.py), and the
ones already stored are keyed the same way, in place: the new digest of content is the HMAC
of its old SHA-256, so no stored body needs to be read. That takes the key, and so
FERNET_KEYS, but only when there are rows to key.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29 17:00:00
"""

import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from alembic import op
from app.config import get_settings
from app.crypto import Vault
from app.hashing import Hasher

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DERIVED = re.compile(r"sha256:([0-9a-f]{64})")


def upgrade() -> None:
    op.create_table(
        "server_keys",
        sa.Column("name", sa.Text(), primary_key=True),
        sa.Column("key_encrypted", sa.LargeBinary(), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("name", name="pk_server_keys"),
    )
    op.create_table(
        "ui_sessions",
        sa.Column("id_hash", sa.LargeBinary(), nullable=False),
        sa.Column("token_fingerprint", sa.Text(), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column(
            "last_seen_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("id_hash", name="pk_ui_sessions"),
    )
    bind = op.get_bind()
    if bind.execute(sa.text("SELECT EXISTS (SELECT FROM event_keys)")).scalar():
        key_stored_hashes(bind)


def key_stored_hashes(bind: Connection) -> None:
    keys = get_settings().fernet_key_list
    if not keys:
        raise SystemExit("migration 0007 keys the content hashes already stored: set FERNET_KEYS")
    key = os.urandom(32)
    bind.execute(
        sa.text("INSERT INTO server_keys (name, key_encrypted) VALUES ('hashing', :k)"),
        {"k": Vault(keys).encrypt(key)},
    )
    hasher = Hasher(key)
    hashes = bind.execute(
        sa.text("SELECT content_hash FROM events UNION SELECT content_hash FROM event_keys")
    ).scalars()
    fill(bind, "hash_map", "bytea", ((old, hasher.key_sha256(old)) for old in hashes))
    for table in ("events", "event_keys"):
        bind.execute(
            sa.text(
                f"UPDATE {table} t SET content_hash = m.new FROM hash_map m "
                "WHERE t.content_hash = m.old"
            )
        )
    derived = bind.execute(
        sa.text(
            "SELECT event_id FROM event_keys WHERE event_id LIKE 'sha256:%' "
            "UNION SELECT event_id FROM rejected_deliveries WHERE event_id LIKE 'sha256:%'"
        )
    ).scalars()
    fill(bind, "id_map", "text", ((old, rekey_id(hasher, old)) for old in derived))
    for statement in REKEY_IDS:
        bind.execute(sa.text(statement))


def rekey_id(hasher: Hasher, old: str) -> str:
    match = DERIVED.fullmatch(old)
    return "sha256:" + hasher.key_sha256(bytes.fromhex(match[1])).hex() if match else old


def fill(bind: Connection, name: str, kind: str, pairs: Iterator[tuple[Any, Any]]) -> None:
    bind.execute(
        sa.text(f"CREATE TEMP TABLE {name} (old {kind} PRIMARY KEY, new {kind}) ON COMMIT DROP")
    )
    insert = sa.text(f"INSERT INTO {name} (old, new) VALUES (:old, :new)")
    batch: list[dict[str, Any]] = []
    for old, new in pairs:
        batch.append({"old": old, "new": new})
        if len(batch) == 5000:
            bind.execute(insert, batch)
            batch = []
    if batch:
        bind.execute(insert, batch)


# Versions are "<20-digit time>|<eventId>": the eventId starts at character 22.
REKEY_IDS = (
    "UPDATE events e SET payload = jsonb_set(payload, '{eventId}', to_jsonb(m.new)) "
    "FROM id_map m WHERE e.event_id = m.old AND e.payload->>'eventId' = m.old",
    *(
        f"UPDATE {table} t SET event_id = m.new FROM id_map m WHERE t.event_id = m.old"
        for table in ("events", "event_keys", "rejected_deliveries")
    ),
    *(
        f"UPDATE {table} t SET {column} = left(t.{column}, 21) || m.new FROM id_map m "
        f"WHERE substr(t.{column}, 22) = m.old"
        for table, column in (
            ("subscriptions", "lifecycle_version"),
            ("domains", "version"),
            ("order_domains", "succeeded_version"),
        )
    ),
    """UPDATE mailboxes SET field_versions = (
        SELECT jsonb_object_agg(f.key, coalesce(left(f.value, 21) || m.new, f.value))
        FROM jsonb_each_text(field_versions) AS f
        LEFT JOIN id_map m ON substr(f.value, 22) = m.old)
    WHERE field_versions::text LIKE '%sha256:%'""",
)


def downgrade() -> None:
    # The plain hashes cannot be recovered from the keyed ones (that is the point).
    op.drop_table("ui_sessions")
    op.drop_table("server_keys")
