"""credentials sealed as one token per event

A mailbox's password, app password and authenticator secret were each a Fernet token of
their own: a 1,000-mailbox prewarmup order spent most of its time on 3,000 encryptions.
From here on the credentials one event carries are one token, a JSON object of them
(app/crypto.py, Vault.seal), stored in the column of each credential it carries, so the
merge rules and erasure still take each credential on its own. The credentials already
stored are sealed the same way, one token per mailbox, in place. That takes FERNET_KEYS,
but only when credentials are stored; a token no key opens stops the migration.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-05 21:20:00
"""

from collections.abc import Callable, Sequence

import sqlalchemy as sa

from alembic import op
from app.config import get_settings
from app.crypto import Vault

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Each credential's name in the sealed token, and its column.
COLUMNS = {
    "password": "password_encrypted",
    "app_password": "app_password_encrypted",
    "authenticator_secret": "authenticator_secret_encrypted",
}
BATCH = 1000
SELECT = sa.text(
    f"SELECT id, {', '.join(COLUMNS.values())} FROM mailboxes"
    f" WHERE id > :last AND num_nonnulls({', '.join(COLUMNS.values())}) > 0"
    " ORDER BY id LIMIT :size"
)
UPDATE = sa.text(
    "UPDATE mailboxes SET "
    + ", ".join(f"{column} = :{name}" for name, column in COLUMNS.items())
    + " WHERE id = :id"
)
Tokens = dict[str, bytes | None]


def upgrade() -> None:
    rewrite(seal)


def downgrade() -> None:
    rewrite(unseal)


def seal(vault: Vault, tokens: Tokens) -> Tokens:
    """A token per credential made one token per mailbox."""
    return vault.seal(
        {n: None if t is None else vault.decrypt(t).decode() for n, t in tokens.items()}
    )


def unseal(vault: Vault, tokens: Tokens) -> Tokens:
    """One token per mailbox made a token per credential, as before."""
    values = vault.unseal(tokens)
    return {n: None if v is None else vault.encrypt(v.encode()) for n, v in values.items()}


def rewrite(change: Callable[[Vault, Tokens], Tokens]) -> None:
    bind = op.get_bind()
    last, vault = 0, None
    while rows := bind.execute(SELECT, {"last": last, "size": BATCH}).all():
        vault = vault or open_vault()
        changed = []
        for row_id, *stored in rows:
            stored_tokens = zip(COLUMNS, stored, strict=True)
            tokens = {name: None if t is None else bytes(t) for name, t in stored_tokens}
            changed.append({"id": row_id, **change(vault, tokens)})
        bind.execute(UPDATE, changed)
        last = rows[-1][0]


def open_vault() -> Vault:
    keys = get_settings().fernet_key_list
    if not keys:
        raise SystemExit("migration 0018 seals the credentials already stored: set FERNET_KEYS")
    return Vault(keys)
