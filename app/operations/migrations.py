"""Alembic, driven from code: `serve` and `migrate` upgrade, `/readyz` compares heads."""

from functools import lru_cache
from pathlib import Path

from alembic.config import Config
from alembic.script import ScriptDirectory

import app
from alembic import command


def script_location() -> str:
    """The top-level alembic/ folder: shipped inside the wheel as app/alembic, or beside
    app/ in a source checkout (editable installs)."""
    package_dir = Path(app.__file__).parent
    packaged = package_dir / "alembic"
    return str(packaged if packaged.is_dir() else package_dir.parent / "alembic")


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", script_location())
    config.attributes["database_url"] = url
    return config


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


@lru_cache
def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config("")).get_current_head()
