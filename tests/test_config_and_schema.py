"""Start-up refuses incomplete or malformed secrets; the migrations match the models."""

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Column, text
from sqlalchemy.ext.asyncio import create_async_engine

from app.config import ConfigError, load_settings
from app.models import Base
from tests.conftest import FERNET_KEY

COMPLETE = {
    "_env_file": None,
    "database_url": "postgres://u:p@db:5432/app",
    "fernet_keys": FERNET_KEY,
    "ops_api_tokens": "ops-token-of-16-chars",
    "webhook_tokens": "hook-token-of-16-chars",
}


@pytest.mark.parametrize(
    ("missing", "variable"),
    [
        ("database_url", "DATABASE_URL"),
        ("fernet_keys", "FERNET_KEYS"),
        ("ops_api_tokens", "OPS_API_TOKENS"),
        ("webhook_tokens", "WEBHOOK_TOKENS"),
    ],
)
def test_a_missing_required_secret_stops_start_up_naming_it(missing, variable):
    settings = load_settings(**{k: v for k, v in COMPLETE.items() if k != missing})
    with pytest.raises(ConfigError) as error:
        settings.check_complete()
    assert variable in str(error.value) and "\n" not in str(error.value)


def test_a_malformed_fernet_key_is_named_without_echoing_it():
    with pytest.raises(ConfigError) as error:
        load_settings(**COMPLETE | {"fernet_keys": f"{FERNET_KEY},not-a-key-zzz"})
    message = str(error.value)
    assert message.startswith("FERNET_KEYS:") and "key #2" in message
    assert "not-a-key-zzz" not in message and "\n" not in message


@pytest.mark.parametrize(
    "url", ["postgres://u:p@h/db", "postgresql://u:p@h/db", "postgresql+asyncpg://u:p@h/db"]
)
def test_every_database_url_spelling_is_normalised(url):
    assert load_settings(**COMPLETE | {"database_url": url}).database_url == (
        "postgresql+asyncpg://u:p@h/db"
    )


def test_an_unknown_url_scheme_is_refused():
    with pytest.raises(ConfigError, match="DATABASE_URL"):
        load_settings(**COMPLETE | {"database_url": "mysql://h/db"})


async def test_migrations_build_exactly_the_models(database_url):
    engine = create_async_engine(database_url)
    async with engine.connect() as conn:
        diff = await conn.run_sync(
            lambda sync: compare_metadata(
                MigrationContext.configure(sync, opts={"compare_type": True}), Base.metadata
            )
        )
        built = set(
            (
                await conn.execute(
                    text("SELECT indexname FROM pg_indexes WHERE schemaname = 'public'")
                )
            )
            .scalars()
            .all()
        )
    await engine.dispose()
    # Alembic compares no index on an expression (trigram search, renewals' order, events by
    # the IDs they name): it reports each as one to add or remove. Those are checked by name here
    # and by the query plans they serve (tests/test_query_plans.py).
    on_expressions = {
        index.name
        for table in Base.metadata.tables.values()
        for index in table.indexes
        if any(not isinstance(e, Column) for e in index.expressions)
    }
    assert on_expressions <= built
    diff = [
        d
        for d in diff
        if not (d[0] in ("add_index", "remove_index") and d[1].name in on_expressions)
    ]
    assert diff == []
