"""bench/instructions.py counts what the service's own delivery statement costs, and a
statement that fails is never a figure."""

import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from bench import instructions
from bench import run as bench

NEEDS_VALGRIND = pytest.mark.skipif(
    shutil.which("valgrind") is None or not (instructions.PG_BIN / "postgres").exists(),
    reason="needs valgrind and PostgreSQL's server binaries",
)


def test_the_benchmarks_measure_the_live_group_statement():
    """bench/run.py's DB ceiling, pgbench and bench/instructions.py run what a live group
    sends: the insert-only mailbox (kept out of test_statement_cost, which mutmut runs
    without bench/)."""
    sql, _ = bench.service_writes(1)[0]
    assert "ON CONFLICT (mailbox_id) DO NOTHING" in sql


@pytest.fixture
def few(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(instructions, "WARM", 2)
    monkeypatch.setattr(instructions, "STATEMENTS", 10)


@NEEDS_VALGRIND
def test_the_service_s_statement_is_counted_on_its_own_migrated_cluster(few: None):
    first, second = instructions.measure(Path(sys.executable), instructions.ROOT, runs=2)
    # each execution inserts an event, a subscription and a mailbox: far more than a SELECT
    assert first > 200_000
    assert abs(first - second) < first * 0.02


@NEEDS_VALGRIND
def test_a_statement_that_fails_is_not_a_figure():
    with tempfile.TemporaryDirectory(prefix="cmw-instructions-test-") as name:
        folder = Path(name)
        folder.chmod(0o755)  # the cluster runs as postgres
        with instructions.cluster(folder) as (data, _):
            pass
        script = "PREPARE delivery(text) AS SELECT $1;\n\n"
        assert instructions.instructions(data, folder, script, 3) > 0
        failing = "PREPARE delivery(text) AS SELECT 1 / (length($1) - 1);\n\n"
        with pytest.raises(RuntimeError, match="division by zero"):
            instructions.instructions(data, folder, failing, 3)
