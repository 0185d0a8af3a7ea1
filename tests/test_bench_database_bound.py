"""bench/run.py's database-bound rows: the database server held to a few CPUs by a cgroup
quota while the service and the DB ceiling run again, then set free; where the machine does
not allow it, the rows are left out and the run says why."""

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from bench import run as bench
from tests.conftest import asyncpg_dsn


def test_the_quota_is_cpus_times_a_short_period_in_either_cgroup_version(tmp_path: Path):
    assert bench.quota_files(0.5, tmp_path) == {
        "cpu.cfs_period_us": "5000",
        "cpu.cfs_quota_us": "2500",
    }
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    assert bench.quota_files(1.25, tmp_path) == {"cpu.max": "6250 5000"}


async def backend_cgroup(url: str) -> str:
    """The cgroup of a new backend, read while it is there."""
    conn = await asyncpg.connect(url)
    try:
        return bench.cgroup_of(await conn.fetchval("SELECT pg_backend_pid()"))
    finally:
        await conn.close()


def test_the_database_and_the_backends_it_forks_are_held_then_set_free(database_url: str):
    url = asyncpg_dsn(database_url)
    postmaster = asyncio.run(bench.postmaster(url))
    assert postmaster is not None  # the tests' server runs on this machine
    if os.geteuid() != 0 or not bench.CGROUPS.exists():
        pytest.skip("cgroups are not writable here")  # bench_database_bound says so too
    home = bench.cgroup_of(postmaster)
    with bench.database_cpus(0.5, postmaster) as group:
        quota = {name: (group / name).read_text().strip() for name in bench.quota_files(0.5)}
        inside = bench.cgroup_of(postmaster), asyncio.run(backend_cgroup(url))
    assert quota == bench.quota_files(0.5)
    held = f"{home.rstrip('/')}/{group.name}"
    assert inside == (held, held)
    assert not group.exists()
    assert bench.cgroup_of(postmaster) == home
    assert asyncio.run(backend_cgroup(url)) == home


def test_a_killed_run_s_hold_is_released_by_drop_leftovers_and_a_live_run_s_is_kept():
    if os.geteuid() != 0 or not bench.CGROUPS.exists():
        pytest.skip("cgroups are not writable here")
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    sleeper = subprocess.Popen(["sleep", "60"])
    home = bench.cgroup_of(sleeper.pid)
    hierarchy = bench.cpu_hierarchy()
    killed = hierarchy / home.lstrip("/") / f"cmw-bench-{gone.stdout.strip()}"
    live = hierarchy / home.lstrip("/") / f"cmw-bench-{os.getpid()}"
    try:
        killed.mkdir()
        live.mkdir()
        (killed / "cgroup.procs").write_text(str(sleeper.pid))
        assert bench.release_leftovers() == [killed]
        assert not killed.exists() and live.exists()
        assert bench.cgroup_of(sleeper.pid) == home
    finally:
        sleeper.kill()
        sleeper.wait()
        for group in (killed, live):
            if group.exists():
                bench.release(group)


def test_the_rows_are_left_out_with_the_reason_where_the_machine_allows_no_quota(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    run = bench.Run(tmp_path, seconds=1)
    monkeypatch.setattr(bench, "CGROUPS", tmp_path / "no-cgroups")
    bench.bench_database_bound(run, 0.5)
    assert run.rows == [] and run.failures == []
    assert "database-bound rows not measured: " in capsys.readouterr().out

    async def elsewhere(url: str) -> None:
        return None

    monkeypatch.setattr(bench, "postmaster", elsewhere)
    bench.bench_database_bound(run, 0.5)
    assert run.rows == [] and run.failures == []
    out = capsys.readouterr().out
    assert out == "database-bound rows not measured: the database server is not on this machine\n"


def test_the_database_bound_ratio_is_the_service_over_the_ceiling_held_alike():
    limited = ", database at 0.5 CPU"
    rows = [
        {"name": "service, 1 worker(s), wrk", "events_per_second": 1600},
        {"name": "DB ceiling: the service's statement, asyncpg", "events_per_second": 3200},
        {"name": f"service, 1 worker(s), wrk{limited}", "events_per_second": 1500},
        {"name": f"service, 2 worker(s), wrk{limited}", "events_per_second": 1800},
        {
            "name": f"DB ceiling: the service's statement, asyncpg{limited}",
            "events_per_second": 1200,
        },
    ]
    shown = bench.ratios(rows)
    assert shown["service(1w, wrk) / DB ceiling"] == 0.5
    assert shown[f"service(1w, wrk) / DB ceiling{limited}"] == 1.25
    assert shown[f"service(2w, wrk) / DB ceiling{limited}"] == 1.5
    rows[-1]["events_per_second"] = None  # the ceiling's row failed: no ratio from it
    assert not any(limited in label for label in bench.ratios(rows))
