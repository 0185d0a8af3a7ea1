"""bench/run.py's CPU an event: each party's seconds are counted, the database's even for
backends that are gone by the time the row ends (pgbench's), and the ratio the box allows
is the DB ceiling's CPU an event over the service's."""

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import asyncpg

from bench import run as bench
from tests.conftest import asyncpg_dsn

BURN = "import time\nwhile time.process_time() < 0.3: pass"


def test_a_load_generator_s_cpu_is_counted_when_it_has_finished_and_the_rest_stays_zero():
    cpu = bench.Cpu(None)
    with cpu.measuring():
        subprocess.run([sys.executable, "-c", BURN], check=True)
    assert cpu.spent["sender"] >= 0.3
    assert cpu.spent["server"] == 0 and cpu.spent["database"] == 0
    shown = cpu.per_event(1000)
    assert shown["cpu_us_sender"] >= 300
    assert shown["cpu_us"] == shown["cpu_us_sender"]


def test_a_server_s_cpu_is_its_own_not_the_sender_s():
    # a server that, once told to, burns CPU until it has spent 0.4 s in all, then waits
    burn = BURN.replace("0.3", "0.4")
    code = f"import sys\nsys.stdin.readline()\n{burn}\nsys.stdin.readline()"
    burner = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, text=True)
    assert burner.stdin is not None
    try:
        cpu = bench.Cpu(None, server=burner.pid)
        with cpu.measuring():
            burner.stdin.write("go\n")
            burner.stdin.flush()
            while bench.process_cpu(burner.pid) < 0.35:  # ticks: 0.4 may read 0.39
                pass
        assert cpu.spent["server"] >= 0.25  # less its start-up, before
        assert cpu.spent["sender"] == 0  # no load generator of this row has finished
    finally:
        burner.communicate("")


async def burn_in_a_backend(url: str) -> tuple[int, float]:
    """A backend's pid and CPU seconds, read while it is there; then it is closed."""
    conn = await asyncpg.connect(url)
    try:
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        await conn.execute("SELECT count(*) FROM generate_series(1, 3000000)")
        return pid, bench.process_cpu(pid)
    finally:
        await conn.close()


def test_a_backend_that_exited_during_the_row_still_counts_for_the_database(database_url: str):
    url = asyncpg_dsn(database_url)
    postmaster = asyncio.run(bench.postmaster(url))
    assert postmaster is not None  # the tests' server runs on this machine
    cpu = bench.Cpu(postmaster)
    with cpu.measuring():
        pid, spent = asyncio.run(burn_in_a_backend(url))
        while Path(f"/proc/{pid}").exists():  # until the postmaster has reaped it
            time.sleep(0.01)
    assert spent > 0.05
    assert cpu.spent["database"] >= spent - 0.02
    assert cpu.spent["server"] == 0


def test_the_ratios_are_the_ceiling_s_cpu_an_event_over_the_service_s_all_and_database():
    rows = [
        {"name": "service, 1 worker(s), wrk", "events_per_second": 1000, "cpu_us": 1500}
        | {"cpu_us_database": 300},
        {"name": "service, 2 worker(s), wrk", "events_per_second": 1400, "cpu_us": 1200}
        | {"cpu_us_database": 250},
        {"name": "DB ceiling: the service's statement, asyncpg", "events_per_second": 2500}
        | {"cpu_us": 600, "cpu_us_database": 450},
    ]
    shown = bench.ratios(rows)
    assert shown["CPU an event, DB ceiling / service(1w, wrk)"] == 0.4
    assert shown["CPU an event, DB ceiling / service(2w, wrk)"] == 0.5
    assert shown["database CPU an event, DB ceiling / service(1w, wrk)"] == 1.5
    assert shown["database CPU an event, DB ceiling / service(2w, wrk)"] == 1.8
    assert shown["service(1w, wrk) / DB ceiling"] == 0.4
    del rows[2]["cpu_us"], rows[2]["cpu_us_database"]  # a server elsewhere, an older run
    assert not any("CPU" in label for label in bench.ratios(rows))
