"""`coldmail-webhooks`: serve, migrate, generate-key, rotate-keys, replay, reconcile, erase,
simulate, outbound (dispatch, replay, enable), db stop."""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import signal
import socket
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Each command imports what it uses, so that `--help` answers at once (pydantic,
# SQLAlchemy and asyncpg take most of a second to import).
if TYPE_CHECKING:
    from app.config import Settings


def resolve(settings: Settings) -> tuple[Settings, bool]:
    """Production settings as they are; without DATABASE_URL, local mode fills them in.

    The values go into the environment so that every uvicorn worker sees the same ones.
    """
    from app.config import ConfigError, get_settings
    from app.operations import local

    if settings.database_url:
        settings.check_complete()
        return settings, False
    if not local.available():
        raise ConfigError(
            "DATABASE_URL is not set (local mode without it needs the 'local' extra: "
            "pip install 'coldmail-webhooks[local]')"
        )
    url = local.start_database(settings.data_dir)
    generated = local.load_or_create_secrets(settings.data_dir)
    env = {"DATABASE_URL": url, "DATA_DIR": str(settings.data_dir)}
    env |= {k: v for k, v in generated.items() if not getattr(settings, k.lower())}
    if "LOG_FORMAT" not in os.environ:
        env["LOG_FORMAT"] = "console"
    os.environ.update(env)
    get_settings.cache_clear()
    resolved = get_settings()
    resolved.check_complete()
    return resolved, True


@contextmanager
def database_settings() -> Iterator[Settings]:
    """For commands that need only the database: DATABASE_URL, or else local mode's
    embedded database, stopped afterwards if this command started it (a `serve` already
    running on it keeps it)."""
    from app.config import load_settings
    from app.operations import local

    settings = load_settings()
    if settings.database_url:
        yield settings
        return
    running = local.is_running(settings.data_dir)
    resolved, _ = resolve(settings)
    try:
        yield resolved
    finally:
        if not running:
            local.stop_database(resolved.data_dir)


def fernet_keys(settings: Settings) -> list[str]:
    from app.config import ConfigError

    if not settings.fernet_key_list:
        raise ConfigError("FERNET_KEYS is not set (make a key: coldmail-webhooks generate-key)")
    return settings.fernet_key_list


def announce_local_mode(settings: Settings, host: str, port: int) -> None:
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    base = f"http://{shown}:{port}"
    simulate = "coldmail-webhooks simulate" + ("" if port == 8000 else f" {base}/webhooks/cmr")
    if settings.data_dir != Path(".data"):
        simulate = f"DATA_DIR={shlex.quote(str(settings.data_dir))} {simulate}"
    print(
        "coldmail-webhooks is running in LOCAL MODE: embedded PostgreSQL and generated secrets\n"
        f"under {settings.data_dir.resolve()} (not for production: set DATABASE_URL and the\n"
        "secrets for that).\n"
        f"  Dashboard: {base}/ui  (sign in with the ops token)\n"
        f"  Ops API token: {settings.ops_token_list[0]}\n"
        f"  Credentials token: {settings.credentials_token_list[0]}\n"
        f"  Send demo traffic: {simulate}\n"
        f"  Webhook URL: {base}/webhooks/cmr?token={settings.webhook_token_list[0]}\n"
        "  Cold Mail Reseller cannot reach that loopback address: give it a public HTTPS URL\n"
        "  (a tunnel or a TLS proxy in front of this port) with the same path and token.\n"
        f"  Stop the database after a crash: coldmail-webhooks db stop",
        flush=True,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.config import ConfigError, load_settings
    from app.logs import configure_logging
    from app.operations import local
    from app.operations.migrations import upgrade
    from app.operations.startup import (
        check_keys,
        check_spool_writable,
        prepare_multiprocess_metrics,
        wait_for_database,
    )
    from app.receiving.edge import say_if_capped

    check_port_free(args.host, args.port)
    loaded = load_settings()
    if not loaded.database_url and (pid := local.serving_pid(loaded.data_dir)):
        raise ConfigError(
            f"a serve (pid {pid}) already runs on {loaded.data_dir.resolve()}: use it, or stop "
            "it first (another DATA_DIR gives another local service)"
        )
    settings, is_local = resolve(loaded)
    if is_local:
        local.claim(settings.data_dir)
    configure_logging(level=settings.log_level, fmt=settings.log_format)
    usable_destinations(settings)
    # uvicorn re-raises SIGTERM once it has shut down; exit normally then, so that the
    # finally below stops the embedded database instead of the signal killing us first.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        check_spool_writable(settings.spool_path)
        # Migrating needs the database; without it, serve at once and spool if it is away.
        if not args.no_migrate:
            url = settings.database_url or ""
            asyncio.run(wait_for_database(url, settings.database_wait_seconds))
            upgrade(url)
            asyncio.run(check_keys(url, settings.fernet_key_list))
        if is_local:
            announce_local_mode(settings, args.host, args.port)
        prepare_multiprocess_metrics(args.workers)
        say_if_capped()
        uvicorn.run(
            "app.main:create_app",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            **uvicorn_options(settings),
        )
    finally:
        if is_local:
            local.stop_database(settings.data_dir)
            local.release(settings.data_dir)
    return 0


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """How `serve` runs uvicorn, beside the app, the address and the workers; the tests of
    the wire's bounds run the app under uvicorn with these same options, in-process."""
    from app.receiving.edge import GuardedHttp

    return {
        "log_config": None,
        "access_log": False,  # ours logs the path without the query string (the token)
        "proxy_headers": True,
        "forwarded_allow_ips": settings.forwarded_allow_ips,
        "timeout_graceful_shutdown": 30,
        "timeout_keep_alive": settings.keep_alive_timeout_seconds,
        # deadlines on request and answer, the connection cap: app/receiving/edge.py
        "http": GuardedHttp,
    }


def usable_destinations(settings: Settings) -> list[Any]:
    """DESTINATIONS_FILE's destinations, each checked down to the addresses its host
    resolves to; ConfigError (one line) for the first that cannot be used."""
    from app.destinations import check_network, load

    destinations = load(settings.destinations_file)
    check_network(destinations)
    return destinations


def cmd_outbound_dispatch(args: argparse.Namespace) -> int:
    """Send outbound messages until SIGTERM or SIGINT: Kubernetes' own deployment (serve
    then runs with OUTBOUND_DISPATCH=false)."""
    from app.config import ConfigError, load_settings
    from app.db import make_engine
    from app.logs import configure_logging
    from app.outbound.dispatch import Dispatcher

    settings = load_settings()
    if not settings.database_url:
        raise ConfigError("DATABASE_URL is not set")
    destinations = usable_destinations(settings)
    if not destinations:
        raise ConfigError("DESTINATIONS_FILE declares no destination: nothing to dispatch")
    configure_logging(level=settings.log_level, fmt=settings.log_format)

    async def run() -> None:
        engine = make_engine(settings.database_url or "", pool_size=args.workers + 1)
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(signum, stop.set)
        dispatcher = Dispatcher(
            engine, destinations, public_url=settings.public_url, workers=args.workers
        )
        try:
            await dispatcher.run(stop)
        finally:
            await engine.dispose()

    asyncio.run(run())
    return 0


def cmd_outbound_replay(args: argparse.Namespace) -> int:
    from app.outbound.dead_letters import Window, replay

    window = Window(since=args.since, until=args.until)
    with database_settings() as settings:
        count = asyncio.run(
            _with_engine(
                settings, lambda e: replay(e, args.destination, window, dry_run=args.dry_run)
            )
        )
    verb = "would be sent again" if args.dry_run else "pending again, due now"
    print(f"{args.destination}: {count} dead letters {verb}")
    return 0


def cmd_outbound_enable(args: argparse.Namespace) -> int:
    from app.outbound.dead_letters import enable

    with database_settings() as settings:
        changed = asyncio.run(_with_engine(settings, lambda e: enable(e, args.destination)))
    state = "enabled, circuit closed" if changed else "was neither disabled nor open"
    print(f"{args.destination}: {state}")
    return 0


def check_port_free(host: str, port: int) -> None:
    """Before anything starts: a second serve must not touch the first one's database."""
    from app.config import ConfigError

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            raise ConfigError(
                f"{host}:{port} is already in use (another coldmail-webhooks serve?): "
                "stop it, or choose --port"
            ) from None


def cmd_migrate(args: argparse.Namespace) -> int:
    from app.operations.migrations import upgrade

    with database_settings() as settings:
        upgrade(settings.database_url or "", args.revision)
    print(f"database upgraded to {args.revision}")
    return 0


def cmd_generate_key(args: argparse.Namespace) -> int:
    from app.crypto import generate_key

    print(generate_key())
    return 0


async def _with_engine(settings: Settings, job: Any) -> Any:
    from app.db import make_engine

    engine = make_engine(settings.database_url or "", pool_size=2)
    try:
        return await job(engine)
    finally:
        await engine.dispose()


def cmd_rotate_keys(args: argparse.Namespace) -> int:
    from cryptography.fernet import InvalidToken

    from app.config import ConfigError, load_settings
    from app.hashing import KEYS_DO_NOT_FIT
    from app.operations import local
    from app.operations.keys import rotate_keys, rotate_spool
    from app.receiving.spool import SPOOL_FILE, Spool

    is_local = not load_settings().database_url
    with database_settings() as settings:
        keys = fernet_keys(settings)
        try:
            counts = asyncio.run(
                _with_engine(settings, lambda e: rotate_keys(e, keys, batch=args.batch))
            )
        except InvalidToken:
            raise ConfigError(f"{KEYS_DO_NOT_FIT}; what was re-encrypted stays so") from None
        if is_local and local.save_fernet_keys(settings.data_dir, keys):
            print(
                f"{settings.data_dir / local.SECRETS_FILE} now holds these FERNET_KEYS "
                "(local mode): restart serve to use them"
            )
    for column, count in counts.items():
        print(f"{column:45} re-encrypted {count.rotated:8}   already current {count.current:8}")
    if (settings.spool_path / SPOOL_FILE).exists():
        spool = Spool(settings.spool_path, max_bytes=settings.spool_max_bytes)
        try:
            spooled = asyncio.run(rotate_spool(spool, keys))
        finally:
            spool.close()
        print(f"{'spool (deliveries waiting for the database)':45} re-encrypted {spooled:8}")
    print("done: every stored secret is now encrypted under the first key of FERNET_KEYS")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from app.config import ConfigError
    from app.crypto import Vault
    from app.operations.replay import Selection, UnknownIds, replay

    selection = Selection(
        event_ids=args.event,
        rejected_ids=args.rejected,
        since=args.since,
        until=args.until,
        everything=args.all,
    )
    if not (args.event or args.rejected or args.since or args.until or args.all):
        raise ConfigError("say what to replay: --event, --rejected, --since/--until or --all")
    with database_settings() as settings:
        vault = Vault(fernet_keys(settings))
        try:
            events, rejected = asyncio.run(
                _with_engine(settings, lambda e: replay(e, vault, selection, dry_run=args.dry_run))
            )
        except UnknownIds as error:
            raise ConfigError(f"{error}; nothing replayed") from None
    verb = "would apply" if args.dry_run else "applied"
    print(
        f"events:   {verb} {events.applied}, not handled yet {events.unhandled}, "
        f"body deleted {events.without_body}"
    )
    print(f"rejected: {verb} {rejected.applied}, still invalid {rejected.still_invalid}")
    for line in rejected.errors:
        print(f"  {line}")
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    """0: no drift; 1: drift remains (the report says what to do); 2: could not run."""
    from app.config import ConfigError, load_settings
    from app.operations.reconcile import ReconcileError, SenderApi, reconcile

    if not load_settings().api_key:
        raise ConfigError("CMR_API_KEY is not set (your partner API key, for the sender's API)")

    async def run(engine: Any, settings: Settings) -> Any:
        from app.destinations import load
        from app.outbound.outbox import DestinationsOutbox

        api = SenderApi(settings.cmr_api_url, settings.api_key or "")
        outbox = DestinationsOutbox(engine, load(settings.destinations_file))
        try:
            return await reconcile(engine, api, dry_run=args.dry_run, outbox=outbox)
        finally:
            await api.close()

    with database_settings() as settings:
        try:
            report = asyncio.run(_with_engine(settings, lambda e: run(e, settings)))
        except ReconcileError as error:
            raise ConfigError(str(error)) from None
    print_report(report)
    return 1 if report.drift else 0


def print_report(report: Any) -> None:
    verb = "would apply" if report.dry_run else "applied"
    print(
        f"reconciled {report.subscriptions} subscriptions in {report.pages} pages; "
        f"{verb} the sender's status and period to {report.applied}"
    )
    for item in report.unknown:
        print(
            f"  unknown: {item['subscriptionId']} ({item['domain']}): the sender has it, we "
            "never heard of it; retry its deliveries from the sender's dashboard"
        )
    for item in report.missing_mailboxes:
        print(
            f"  missing mailboxes: {item['subscriptionId']} has {item['mailboxes']} of "
            f"{item['expected']}; retry its mailbox.created deliveries from the dashboard"
        )
    for item in report.differences:
        print(f"  differs: {item['subscriptionId']} ours {item['ours']} theirs {item['theirs']}")
    print(f"drift: {report.drift}" if report.drift else "no drift")


def cmd_erase(args: argparse.Namespace) -> int:
    from app.config import ConfigError
    from app.crypto import Vault
    from app.operations.privacy import erase_mailbox

    with database_settings() as settings:
        vault = Vault(fernet_keys(settings))
        erased = asyncio.run(
            _with_engine(settings, lambda e: erase_mailbox(e, vault, args.mailbox))
        )
    if erased is None:
        raise ConfigError(f"no mailbox {args.mailbox!r}")
    print(
        f"mailbox {args.mailbox} erased: credentials and personal fields removed from it, "
        f"from {erased.events} stored events and {erased.rejected} rejected deliveries"
    )
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from app.simulation.simulate import run_simulation

    if args.token is None:
        args.token = local_webhook_token()
    return run_simulation(args)


def local_webhook_token() -> str | None:
    """Without --token: the first of WEBHOOK_TOKENS, else the one local mode generated, so
    that `coldmail-webhooks simulate` next to a local `serve` works as typed."""
    from app.config import load_settings
    from app.operations import local

    settings = load_settings()
    if settings.webhook_token_list:
        return settings.webhook_token_list[0]
    secrets_file = settings.data_dir / local.SECRETS_FILE
    if secrets_file.exists():
        for line in secrets_file.read_text().splitlines():
            name, _, value = line.partition("=")
            if name == "WEBHOOK_TOKENS" and value:
                return value.split(",")[0]
    return None


def cmd_db_stop(args: argparse.Namespace) -> int:
    from app.config import ConfigError, load_settings
    from app.operations import local

    data_dir = args.data_dir or load_settings().data_dir
    if (pid := local.serving_pid(data_dir)) and not args.force:
        raise ConfigError(
            f"a serve (pid {pid}) uses the database under {data_dir.resolve()}: stop that serve "
            "(it stops its database), or db stop --force"
        )
    stopped = local.stop_database(data_dir)
    where = data_dir.resolve()
    print(
        f"embedded database under {where} stopped"
        if stopped
        else f"no embedded database runs under {where} (DATA_DIR, or --data-dir, names another)"
    )
    return 0


def utc_time(text: str) -> datetime:
    from app.receiving.payloads import assume_utc

    return assume_utc(datetime.fromisoformat(text))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coldmail-webhooks",
        description="Receive Cold Mail Reseller webhooks, store them exactly once, serve them.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve", help="migrate, then serve HTTP (local mode without DATABASE_URL)"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    serve.add_argument("--no-migrate", action="store_true", help="skip applying migrations")
    serve.set_defaults(func=cmd_serve)

    migrate = commands.add_parser("migrate", help="upgrade the database schema")
    migrate.add_argument("revision", nargs="?", default="head", help="target (default head)")
    migrate.set_defaults(func=cmd_migrate)

    key = commands.add_parser("generate-key", help="print a new Fernet key for FERNET_KEYS")
    key.set_defaults(func=cmd_generate_key)

    rotate = commands.add_parser(
        "rotate-keys", help="re-encrypt every stored secret under the first FERNET_KEYS key"
    )
    rotate.add_argument("--batch", type=int, default=500, help="rows per batch (default 500)")
    rotate.set_defaults(func=cmd_rotate_keys)

    replay = commands.add_parser(
        "replay", help="re-apply stored events and retry rejected deliveries"
    )
    replay.add_argument(
        "--event",
        type=int,
        action="append",
        default=[],
        metavar="ID",
        help="an event's id (GET /api/v1/events); repeatable",
    )
    replay.add_argument(
        "--rejected",
        type=int,
        action="append",
        default=[],
        metavar="ID",
        help="a rejected delivery's id (GET /api/v1/rejected); repeatable",
    )
    replay.add_argument("--since", type=utc_time, help="received at or after (UTC if no offset)")
    replay.add_argument("--until", type=utc_time, help="received before (UTC if no offset)")
    replay.add_argument("--all", action="store_true", help="every event and rejected delivery")
    replay.add_argument("--dry-run", action="store_true", help="report, change nothing")
    replay.set_defaults(func=cmd_replay)

    recon = commands.add_parser(
        "reconcile", help="compare with the sender's subscriptions API; repair and report drift"
    )
    recon.add_argument("--dry-run", action="store_true", help="report only, change nothing")
    recon.set_defaults(func=cmd_reconcile)

    erase = commands.add_parser(
        "erase", help="remove one mailbox's credentials and personal fields everywhere"
    )
    erase.add_argument("--mailbox", required=True, metavar="ID", help="the mailboxId")
    erase.set_defaults(func=cmd_erase)

    simulate = commands.add_parser(
        "simulate", help="send a realistic story (or load) of signed deliveries to a URL"
    )
    add_simulate_arguments(simulate)
    simulate.set_defaults(func=cmd_simulate)

    add_outbound_commands(commands)

    db = commands.add_parser("db", help="the local mode's embedded database")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    stop = db_commands.add_parser("stop", help="stop the embedded database under DATA_DIR")
    stop.add_argument(
        "--data-dir", type=Path, help="local mode's folder (default: DATA_DIR, else ./.data)"
    )
    stop.add_argument("--force", action="store_true", help="stop it even while a serve is using it")
    stop.set_defaults(func=cmd_db_stop)
    return parser


def add_outbound_commands(commands: Any) -> None:
    outbound = commands.add_parser(
        "outbound", help="outbound messages to DESTINATIONS_FILE's destinations"
    )
    actions = outbound.add_subparsers(dest="outbound_command", required=True, metavar="ACTION")
    dispatch = actions.add_parser("dispatch", help="send outbound messages until stopped")
    dispatch.add_argument("--workers", type=int, default=4, help="concurrent batches (default 4)")
    dispatch.set_defaults(func=cmd_outbound_dispatch)
    replay = actions.add_parser("replay", help="send a destination's dead letters again")
    replay.add_argument("--destination", required=True, metavar="NAME", help="its name")
    replay.add_argument("--since", type=utc_time, help="created at or after (UTC if no offset)")
    replay.add_argument("--until", type=utc_time, help="created before (UTC if no offset)")
    replay.add_argument("--dry-run", action="store_true", help="count them, change nothing")
    replay.set_defaults(func=cmd_outbound_replay)
    enable = actions.add_parser(
        "enable", help="send to a destination again after it answered 410 Gone"
    )
    enable.add_argument("--destination", required=True, metavar="NAME", help="its name")
    enable.set_defaults(func=cmd_outbound_enable)


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "url",
        nargs="?",
        default="http://127.0.0.1:8000/webhooks/cmr",
        help="the webhook URL (default http://127.0.0.1:8000/webhooks/cmr)",
    )
    parser.add_argument(
        "--token",
        help="webhook token, sent as ?token= (default: WEBHOOK_TOKENS, else local mode's)",
    )
    parser.add_argument("--signing-key", help="sign deliveries with this CMR API key")
    parser.add_argument(
        "--story",
        action="store_true",
        help="tell the demo story (the default without --events, --duration, --single-mailbox)",
    )
    parser.add_argument(
        "--events", type=int, help="send load: about this many deliveries, in whole orders"
    )
    parser.add_argument("--duration", type=float, help="send load for this many seconds instead")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent senders")
    parser.add_argument(
        "--mix", default="standard=70,prewarmup=30", help="share of standard and prewarmup orders"
    )
    parser.add_argument(
        "--mailboxes-per-domain", type=int, default=3, help="mailboxes in each ordered domain"
    )
    parser.add_argument(
        "--domains-per-prewarmup", type=int, default=3, help="domains in each prewarmup order"
    )
    parser.add_argument(
        "--failure-rate", type=float, default=0.2, help="share of prewarmup domains reported failed"
    )
    parser.add_argument("--duplicates", type=float, default=0.1, help="share sent twice")
    parser.add_argument("--shuffle", type=float, default=0.2, help="share sent out of order")
    parser.add_argument(
        "--single-mailbox",
        action="store_true",
        help="only mailbox.created events, one mailbox each (benchmarks)",
    )
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--wait",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="wait this long for a service that is still starting (default 30)",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from app.config import ConfigError

    try:
        return int(args.func(args))
    except ConfigError as error:
        print(f"coldmail-webhooks: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # noqa: BLE001 - an operator gets one line, not a traceback
        if os.environ.get("LOG_LEVEL", "").upper() == "DEBUG":
            traceback.print_exc()
        print(f"coldmail-webhooks: {describe_failure(error)}", file=sys.stderr)
        return 2


def describe_failure(error: Exception) -> str:
    """One line for an error no command expected: the database's own words if it was the
    database, never a traceback (LOG_LEVEL=DEBUG prints one)."""
    from app.db import pooler_hint

    if hint := pooler_hint(error):
        return hint
    cause = getattr(error, "orig", None) or error
    first = (str(cause).strip().splitlines() or [""])[0]
    if isinstance(cause, OSError | TimeoutError) or "asyncpg" in type(cause).__module__:
        return f"database: {type(cause).__name__}: {first}"
    return f"{type(cause).__name__}: {first}"


if __name__ == "__main__":
    sys.exit(main())
