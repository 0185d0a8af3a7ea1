"""Async Alembic environment. The URL comes from the caller (app.operations.migrations)
or from the settings."""

import asyncio

from sqlalchemy import text
from sqlalchemy.engine import Connection

from alembic import context
from app.config import get_settings, normalize_database_url
from app.db import make_engine
from app.models import Base

config = context.config
target_metadata = Base.metadata


def database_url() -> str:
    url = config.attributes.get("database_url") or get_settings().database_url
    if not url:
        raise SystemExit("DATABASE_URL is not set")
    return normalize_database_url(url)


def run_migrations_offline() -> None:
    context.configure(
        url=database_url(), target_metadata=target_metadata, compare_type=True, literal_binds=True
    )
    with context.begin_transaction():
        context.run_migrations()


# Replicas that start together take turns: the second finds the schema at head.
MIGRATION_LOCK = 0x636D775F6D6967  # "cmw_mig"


def do_run_migrations(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)
    with context.begin_transaction():
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        context.run_migrations()


async def run_async_migrations() -> None:
    engine = make_engine(database_url(), pool_size=1)
    async with engine.connect() as connection:
        await connection.run_sync(do_run_migrations)
    await engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    asyncio.run(run_async_migrations())
