"""bench's scratch databases are each run's own: two at once get different names, and each
drops only its own, even when its row fails."""

import asyncio

import asyncpg
import pytest

from bench import run as bench
from tests.conftest import asyncpg_dsn, with_database


@pytest.fixture(autouse=True)
def bench_server(server_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """bench's server is the tests' own."""
    monkeypatch.setattr(bench, "SERVER", asyncpg_dsn(with_database(server_url, "postgres")))


def databases() -> set[str]:
    async def names() -> set[str]:
        conn = await asyncpg.connect(bench.SERVER)
        try:
            return {r["datname"] for r in await conn.fetch("SELECT datname FROM pg_database")}
        finally:
            await conn.close()

    return asyncio.run(names())


def test_two_scratch_databases_at_once_have_names_of_their_own_and_drop_only_their_own():
    with bench.scratch_database("api") as first:
        with bench.scratch_database("api") as second:
            one, two = first.rsplit("/", 1)[1], second.rsplit("/", 1)[1]
            assert one != two
            assert one.startswith("cmw_bench_api_") and two.startswith("cmw_bench_api_")
            assert {one, two} <= databases()
        assert one in databases() and two not in databases()
    assert one not in databases()


def test_a_failed_row_still_drops_its_scratch_database():
    with pytest.raises(RuntimeError), bench.scratch_database("db") as url:
        name = url.rsplit("/", 1)[1]
        assert name in databases()
        raise RuntimeError("the row failed")
    assert name not in databases()


def test_leftovers_are_the_scratch_databases_of_runs_no_longer_running():
    names = [
        "cmw_bench_api_111_0a1b2c",  # its run is gone
        "cmw_bench_service_1_222_3d4e5f",  # its run still runs
        "cmw_bench_scale",  # kept on purpose (--keep)
        "cmw_bench_search",
        "postgres",
    ]
    found = bench.leftovers(names, running=lambda pid: pid == 222)
    assert found == ["cmw_bench_api_111_0a1b2c"]


def test_a_scratch_name_is_a_leftover_only_once_its_run_is_gone():
    name = bench.scratch_name("outbound_dispatch")
    assert bench.leftovers([name], running=bench.pid_running) == []
    assert bench.leftovers([name], running=lambda pid: False) == [name]
