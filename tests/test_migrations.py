"""Released migrations never change, and the merge rules have one source.

A database that applied a migration never runs it again, so editing a released one changes
every fresh database (and every test) but no deployed one. alembic/released.sha256 lists
each released migration's SHA-256 (`sha256sum` in alembic/versions); at a release, append
the new ones. The merge rules' SQL functions live in app/recording/merge_functions.sql, and
the newest migration that applies it names its SHA-256, so a change to the rules without a
migration that applies them again fails here.
"""

import hashlib
import importlib.util
from pathlib import Path
from types import ModuleType

from app.recording.merge import FUNCTIONS_FILE, functions_sha256

ALEMBIC = Path(__file__).resolve().parent.parent / "alembic"
VERSIONS = ALEMBIC / "versions"


def released() -> dict[str, str]:
    lines = (ALEMBIC / "released.sha256").read_text().splitlines()
    return {name: digest for digest, name in (line.split() for line in lines if line.strip())}


def load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_released_migration_was_edited_or_removed():
    changed = {
        name: digest
        for name, digest in released().items()
        if not (VERSIONS / name).is_file()
        or hashlib.sha256((VERSIONS / name).read_bytes()).hexdigest() != digest
    }
    assert changed == {}, "a released migration changed: write a new migration instead"


def test_the_newest_migration_applying_the_merge_functions_applies_them_as_they_are():
    applying = [
        module
        for path in sorted(VERSIONS.glob("[0-9]*.py"))
        if hasattr(module := load(path), "MERGE_FUNCTIONS_SHA256")
    ]
    assert applying, "no migration applies " + FUNCTIONS_FILE.name
    assert applying[-1].MERGE_FUNCTIONS_SHA256 == functions_sha256(), (
        f"{FUNCTIONS_FILE.name} changed: add a migration that applies it again"
        " (copy the newest one that names MERGE_FUNCTIONS_SHA256, with the new SHA-256)"
    )


async def test_the_migrated_database_runs_the_functions_of_the_file(db):
    defined = await db.fetchval(
        "select count(*) from pg_proc where proname = any($1)",
        ["period_wins", "lifecycle_wins", "domain_wins", "winner_first", "edit_wins"],
    )
    assert defined == 5
    source = await db.fetchval("select prosrc from pg_proc where proname = 'lifecycle_wins'")
    assert "period_wins(old, new)" in source
