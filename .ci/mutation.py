#!/usr/bin/env python3
"""Mutation testing (mutmut 3) of the modules a change touches, within a time budget.

    python .ci/mutation.py                       # scoped modules changed since main
    python .ci/mutation.py --base HEAD~3         # ... since another base
    python .ci/mutation.py app/config.py         # these modules
    python .ci/mutation.py --budget 600 --update # raise the ratchet where a score went up

It copies the checkout (tracked files, as they are now) to a scratch folder, so mutmut's
`mutants/` never lands in the checkout, and runs `mutmut run` there on the modules, with
the tests TESTS names for each (else all of tests/), under the budget. Then, per module:
killed / (killed + survived + reached by no test), leaving out the mutants listed in
.ci/mutation-equivalent.txt (one name a line, `# why` after it) and those mutmut cannot
run, in .ci/mutation-untestable.txt (globs). One migrated template database serves every
mutant's tests (TEST_TEMPLATE_DATABASE).
.ci/mutation-scores.json is the ratchet: a module measured in full (every mutant checked
within the budget) may not score below it; one cut short by the budget is reported, not
judged. Exit 1 when a score went down.
Needs TEST_DATABASE_URL like the tests (a PostgreSQL server).
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path

import tomlkit

ROOT = Path(__file__).resolve().parent.parent
RATCHET = ROOT / ".ci" / "mutation-scores.json"
EQUIVALENT = ROOT / ".ci" / "mutation-equivalent.txt"
UNTESTABLE = ROOT / ".ci" / "mutation-untestable.txt"
# The modules that hold a promise, and the tests that pin each one's promises; mutmut
# runs, per mutant, those of them that reach it. A changed module not named here is not
# mutated. Tests that run the CLI in a subprocess do not see mutants: name in-process ones.
RECORDING = [
    "tests/test_recording_rules.py",
    "tests/test_erasure.py",
    "tests/test_lifecycle.py",
    "tests/test_ingestion.py",
    "tests/test_promises_state.py::test_a_conflict_mark_lost_between_two_statements_is_mended_by_the_retry",
    "tests/test_promises_state.py::test_a_prewarmup_domains_quantity_counts_its_own_mailboxes",
    "tests/test_webhook_contract.py",
    "tests/test_promises_edge.py::test_past_the_bound_the_oldest_rejected_bodies_go_and_the_newest_stay",
]
# The spool and the drainer: outages in-process (tests/reliability/proxy.py), then the drain.
# A few tests: every test that starts the app reaches the drainer, and a
# surviving mutant runs every test that reaches it.
SPOOLING = [
    "tests/test_receiving_outage.py",
    "tests/test_webhook_contract.py::test_new_event_is_processed_and_committed",
    "tests/test_webhook_contract.py::test_database_unreachable_queues_the_delivery_in_the_spool",
    "tests/test_webhook_contract.py::test_database_unreachable_and_spool_full_is_503_with_retry_after",
    "tests/test_leniency.py::test_a_failure_a_retry_will_not_cure_is_kept_then_answered_500",
    "tests/reliability/test_spool.py::test_a_torn_spool_row_is_set_aside_and_the_rest_drain",
    "tests/test_cockpit_pages.py::test_every_page_says_the_database_is_away_and_shows_the_spool",
]
LIFECYCLE_EFFECTS = [
    "the_later_edit_wins_even_with_the_smaller_event_id",
    "simultaneous_deliveries_sharing_an_event_id_are_always_flagged",
    "two_contents_of_one_event_id_sent_at_one_time_end_the_same_in_either_order",
    "without_period_data_the_later_event_wins_and_the_name_implies_the_state",
    "a_failed_renewal_is_a_risk_until_a_later_success_or_period",
    "a_subscription_that_never_failed_a_renewal_shows_no_such_risk",
    "warmup_follows_the_later_event_and_an_export_replaces_credentials",
    "a_second_order_adds_to_the_subscription_without_overwriting_the_first",
    "domain_events_set_the_domain_state_on_its_subscriptions",
    "a_re_registered_domain_takes_the_later_registration_in_either_order",
    "a_domain_first_known_by_name_then_by_id_ends_the_same_in_either_order",
]
TESTS = {
    "app/config.py": [
        "tests/test_config_and_schema.py",
        "tests/test_config_promises.py",
        "tests/test_promises_edge.py::test_every_token_of_a_list_typed_with_spaces_works_in_its_role",
    ],
    "app/hashing.py": ["tests/test_vectors.py", "tests/test_keyed_hashes.py"],
    "app/crypto.py": ["tests/test_vectors.py"],
    "app/receiving/signing.py": ["tests/test_vectors.py", "tests/test_promises_edge.py"],
    # few files, so that each mutant's run stays short: these pin every promise of theirs
    "app/receiving/payloads.py": [
        "tests/test_payload_rules.py",
        "tests/test_leniency.py",
        "tests/test_webhook_contract.py",
    ],
    "app/receiving/route.py": [
        "tests/test_route_outcomes.py",
        "tests/test_webhook_contract.py",
        "tests/test_signature_forms.py",
    ],
    # SPOOLING, and the drainer's pace on a test clock (batches back to back, idle looks apart)
    "app/receiving/receiver.py": [
        *SPOOLING,
        "tests/reliability/test_batches.py::test_a_backlog_drains_batch_after_batch_and_an_idle_drainer_looks_twice_a_second",
        "tests/reliability/test_batches.py::test_a_drainer_whose_keys_cannot_read_the_hashing_key_waits_and_does_not_spin",
    ],
    # the spool's own promises besides the receiver's (a full spool's 503): its exact bound,
    # a refused write, a take-out or a set-aside that fails, a new folder, one drainer per file
    "app/receiving/spool.py": [
        *SPOOLING,
        "tests/reliability/test_spool.py::test_a_full_spool_answers_503_and_keeps_what_it_holds",
        "tests/reliability/test_spool.py::test_a_spool_filled_to_exactly_its_bound_keeps_what_fills_it_then_says_it_is_full",
        "tests/reliability/test_spool.py::test_a_write_the_spool_refuses_is_answered_503_and_the_next_is_kept",
        "tests/reliability/test_spool.py::test_rows_the_spool_cannot_take_out_are_applied_once_when_it_can",
        "tests/reliability/test_spool.py::test_a_torn_row_that_cannot_be_set_aside_yet_waits_and_nothing_is_lost",
        "tests/reliability/test_spool.py::test_a_new_spool_makes_its_folder_and_is_empty_with_room",
        "tests/reliability/test_spool.py::test_one_worker_drains_a_shared_spool_and_another_takes_over_when_it_stops",
    ],
    "app/receiving/pinning.py": [
        "tests/test_signature_forms.py",
        "tests/test_webhook_contract.py::test_database_unreachable_queues_the_delivery_in_the_spool",
    ],
    # the app under uvicorn with GuardedHttp in-process (tests/servers.py), raw sockets; the
    # HTTPS rule for private and public client addresses through the ASGI transport
    "app/receiving/edge.py": [
        "tests/test_edge_wire.py",
        "tests/test_promises_edge.py::test_credentials_go_only_over_https_or_to_a_loopback_client_without_a_proxy",
    ],
    "app/recording/merge.py": [
        *RECORDING,
        "tests/test_migrations.py",
        "tests/test_search_index.py",
        "tests/test_statement_cost.py::test_whether_a_mailbox_completes_anything_is_read_only_for_an_outbox",
        # the live group's insert-only mailbox (Upsert.sql's insert_only)
        "tests/test_statement_cost.py::test_only_a_group_that_tells_nothing_inserts_the_mailbox_without_its_merge",
    ],
    # test_recording_rules.py pins every field each event kind writes; the lifecycle tests
    # named here pin what it writes for ordering (versions), renewals and domains. Not all of
    # RECORDING: a surviving mutant runs every test that reaches it, and 538 mutants must
    # finish within a run.
    "app/recording/effects.py": [
        "tests/test_recording_rules.py",
        *(f"tests/test_lifecycle.py::test_{name}" for name in LIFECYCLE_EFFECTS),
        "tests/test_promises_state.py::test_a_prewarmup_domains_quantity_counts_its_own_mailboxes",
    ],
    # RECORDING without most of test_lifecycle.py: its either-order tests (3-12 s each, two
    # fresh databases apiece) pin merge.py's rules and reach every function of record.py,
    # so each of its mutants ran them; these pin what record.py itself does there (a race's
    # conflict, replay of a stored event and of an order, a second order's derived values)
    "app/recording/record.py": [
        *(t for t in RECORDING if t != "tests/test_lifecycle.py"),
        "tests/test_lifecycle.py::test_simultaneous_deliveries_sharing_an_event_id_are_always_flagged",
        # delivery_version hands effects.version the content: a tie ends the same either way
        "tests/test_lifecycle.py::test_two_contents_of_one_event_id_sent_at_one_time_end_the_same_in_either_order",
        "tests/test_lifecycle.py::test_events_stored_as_ignored_by_an_older_release_are_counted_and_replayed",
        "tests/test_lifecycle.py::test_an_order_stored_as_ignored_by_an_older_release_is_replayed_with_its_mailboxes",
        "tests/test_lifecycle.py::test_a_second_order_adds_to_the_subscription_without_overwriting_the_first",
        # a rejected delivery is told in the transaction that stores it
        "tests/test_outbound_derived.py::test_rejected_deliveries_are_told_once_per_cause_and_window",
        "tests/test_promises_edge.py::test_a_rejected_delivery_is_kept_only_with_its_telling",
        # what a new event causes is forwarded and told in its transaction (an order alone,
        # each delivery alone without a window), and what is forwarded carries the event
        "tests/test_group_commit.py::test_each_new_event_and_what_it_completes_is_told_once",
        "tests/test_outbound_derived.py::test_a_prewarmup_order_is_ready_with_its_one_delivery",
        "tests/test_outbound_delivery.py::test_every_event_is_forwarded_once_signed_in_our_names_without_credentials",
        "tests/test_outbound_delivery.py::test_a_forwarded_order_carries_its_fields_as_we_keep_them",
        # an order (recorded alone) goes to its customer as we keep it (record's model)
        "tests/test_outbound_delivery.py::test_types_wildcards_and_customers_choose_what_each_destination_gets",
        # an outbox that may tell of a mailbox asks the statement whether it completes anything
        "tests/test_statement_cost.py::test_whether_a_mailbox_completes_anything_is_read_only_for_an_outbox",
        # a failure between an order's parts waits for the part in flight (write_with_mailboxes)
        "tests/test_leniency.py::test_an_order_failing_while_a_part_is_written_is_kept_with_its_own_cause",
        # an outcome names the event that holds it (replay links a rejection to it)
        "tests/test_replay_selection.py::test_a_replayed_rejection_of_an_event_already_recorded_points_at_that_event",
        "tests/test_replay_selection.py::test_fixed_rejections_each_become_the_event_a_live_delivery_records",
        # which effect a live group writes insert-only (record.insert_only)
        "tests/test_statement_cost.py::test_only_a_group_that_tells_nothing_inserts_the_mailbox_without_its_merge",
    ],
    # the batched drain and the group commit of live deliveries
    # (not test_batches' drain_forever test: a mutant that stops the drain hangs it)
    "app/recording/batches.py": [
        "tests/test_group_commit.py",
        "tests/reliability/test_batches.py::test_a_batched_drain_commits_its_batch_at_once_and_tells_each_outcome_apart",
        "tests/reliability/test_batches.py::test_one_failing_delivery_in_a_batched_drain_is_set_aside_alone",
        "tests/reliability/test_batches.py::test_a_batched_drain_forwards_each_new_event_and_tells_what_it_completes_once",
        # the default window (2 ms) records live deliveries through prepare(): `when` is kept
        "tests/test_recording_rules.py::test_an_export_sets_its_time_and_credentials_and_a_warmup_event_its_status",
        # ... and forwards each to its customer as we keep it (prepare's model)
        "tests/test_outbound_delivery.py::test_types_wildcards_and_customers_choose_what_each_destination_gets",
    ],
    "app/reading/exports.py": [
        "tests/test_cockpit_api.py",
        "tests/test_promises_state.py",
        "tests/test_cockpit_pages.py",
    ],
    "app/reading/renewals.py": [
        "tests/test_renewal_queue.py",
        "tests/test_renewal_totals.py",
        "tests/test_promises_state.py",
        "tests/test_cockpit_api.py",
        "tests/test_api.py",
    ],
    # the read side's paging and search (cursors, filters, the literal-search escaping)
    "app/reading/queries/paging.py": [
        "tests/test_promises_state.py",
        "tests/test_search_limits.py",
        "tests/test_search_index.py",
        "tests/test_query_plans.py",
        "tests/test_read_side.py",
        "tests/test_cockpit_api.py",
        "tests/test_api.py",
        "tests/test_dashboard_now.py",
    ],
    # the lease itself (taken, passed over while held, taken once expired, lost mid-run)
    # and a periodic run that passes its turn while another holds it
    "app/operations/leases.py": [
        "tests/test_reconcile.py::test_a_lease_its_holder_left_to_expire_is_taken_and_a_lost_one_stops_the_run",
        "tests/test_reconcile.py::test_one_periodic_run_at_a_time_and_the_next_once_it_has_ended",
    ],
    # what a forwarded event's message is and the data built from its stored copy (in
    # process: data_of per kind, byte for byte; user filters; extra fields; an erasure)
    "app/recording/forwarding.py": [
        "tests/test_outbound_messages.py",
        "tests/test_outbound_delivery.py::test_types_wildcards_and_customers_choose_what_each_destination_gets",
        "tests/test_outbound_delivery.py::test_a_forwarded_mailbox_created_goes_out_byte_for_byte_as_before",
        "tests/test_outbound_delivery.py::test_a_forwarded_message_names_its_event_and_copies_none_of_its_data",
        "tests/test_outbound_delivery.py::test_a_field_the_sender_added_is_never_forwarded",
    ],
    # the dispatcher driven on a test clock against real receivers: schedule, jitter,
    # circuit and probe, 410, Retry-After, redirects, rebinding, replicas, a database away
    "app/outbound/dispatch.py": [
        "tests/test_outbound_delivery.py",
        "tests/test_outbound_seen.py::test_a_real_dispatch_to_a_failing_receiver_is_counted_and_opens_the_circuit",
    ],
    "app/operations/keys.py": ["tests/test_promises_state.py", "tests/test_keyed_hashes.py"],
    "app/operations/privacy.py": [
        "tests/test_privacy.py",
        "tests/test_erasure.py",
        "tests/test_retention_task.py",
    ],
    "app/operations/replay.py": [
        "tests/test_replay_selection.py",
        "tests/test_replay.py",
        "tests/test_lifecycle.py::test_events_stored_as_ignored_by_an_older_release_are_counted_and_replayed",
    ],
}
KILLED = {"killed", "timeout", "caught by type check", "segfault"}


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout


def changed_modules(base: str) -> list[str]:
    """The scoped modules changed since the merge base with `base`, and in the working tree;
    on `base` itself (nothing since the merge base), those the last commit changed."""
    since = git("merge-base", base, "HEAD").strip() or "HEAD~1"
    if since == git("rev-parse", "HEAD").strip():
        since = "HEAD~1"
    changed = set(git("diff", "--name-only", since, "--", "app/").split())
    return sorted(p for p in changed if p in TESTS and (ROOT / p).is_file())


def scratch_copy() -> Path:
    """The tracked files as they are in the checkout now, in a folder of their own."""
    folder = Path(tempfile.mkdtemp(prefix="cmw-mutation-"))
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, files):
        source = ROOT / name.decode()
        if source.is_file():
            target = folder / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return folder


def configure(
    folder: Path, modules: list[str], only: list[str] | None = None, timeout: float = 15.0
) -> None:
    """mutmut reads [tool.mutmut] from pyproject.toml: this run's modules and tests, and
    how long a mutant may run: (its tests' time + 5 s) x `timeout` (wall clock)."""
    named = set(only) if only else {t for m in modules for t in TESTS.get(m, ["tests/"])}
    tests = sorted(t for t in named if (folder / t.split("::")[0]).exists())
    pyproject = folder / "pyproject.toml"
    settings = tomlkit.parse(pyproject.read_text())
    settings["tool"]["mutmut"] = {
        "source_paths": ["app"],
        "only_mutate": modules,
        "also_copy": ["alembic", "alembic.ini"],
        "pytest_add_cli_args_test_selection": tests,
        "pytest_add_cli_args": ["-p", "no:randomly", "-x", "-q"],
        # A mutant's wall-clock limit is (its tests' time + timeout_constant) x the multiplier,
        # where mutmut counts only the tests' calls, not each test's fresh database and app
        # (1-3 s on a busy box): at 1 s, record.store_rejected's survivors (14 tests: 1.3 s
        # of calls, 26-31 s in all) came within seconds of their 35 s limit, past which they
        # would count as killed.
        "timeout_constant": 5.0,
        "timeout_multiplier": timeout,
    }
    pyproject.write_text(tomlkit.dumps(settings))


UPGRADE = """import sys
from app.config import normalize_database_url
from app.operations.migrations import upgrade
upgrade(normalize_database_url(sys.argv[1]))"""


def psql(sql: str) -> None:
    url = os.environ["TEST_DATABASE_URL"].replace("+asyncpg", "")
    subprocess.run(["psql", "-q", "-X", url, "-c", sql], check=True, capture_output=True)


@contextmanager
def template(folder: Path) -> Iterator[None]:
    """One migrated database that every mutant's tests copy (tests/conftest.py reads
    TEST_TEMPLATE_DATABASE), instead of migrating and dropping one per mutant (~10 s each).
    The migrations run unmutated: merge.apply_functions' mutants are tested by
    tests/test_migrations.py, which migrates databases of its own."""
    name = f"cmw_mutation_template_{os.getpid()}"
    psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    psql(f"CREATE DATABASE {name}")
    url = os.environ["TEST_DATABASE_URL"].rsplit("/", 1)[0] + "/" + name
    try:
        subprocess.run(
            [sys.executable, "-c", UPGRADE, url],
            cwd=folder, check=True,
        )  # fmt: skip
        os.environ["TEST_TEMPLATE_DATABASE"] = name
        yield
    finally:
        os.environ.pop("TEST_TEMPLATE_DATABASE", None)
        psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def run(folder: Path, budget: int, children: int) -> dict[str, Counter[str]]:
    mutmut = [sys.executable, "-m", "mutmut"]
    with template(folder):
        # A session of its own, so that the budget ends mutmut's workers too.
        command = [*mutmut, "run", "--max-children", str(children)]
        process = subprocess.Popen(command, cwd=folder, start_new_session=True)
        try:
            process.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            print(f"budget of {budget}s spent: unchecked mutants count as such")
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    return results(folder)


def results(folder: Path) -> dict[str, Counter[str]]:
    """Each module's mutants by status, from mutmut's results in `folder`."""
    mutmut = [sys.executable, "-m", "mutmut"]
    out = subprocess.run(
        [*mutmut, "results", "--all", "true"], cwd=folder, capture_output=True, text=True
    ).stdout
    equivalent = listed(EQUIVALENT)
    untestable = listed(UNTESTABLE)
    by_module: dict[str, Counter[str]] = {}
    for name, status in re.findall(r"^\s+(\S+): (.+)$", out, flags=re.MULTILINE):
        module = name.split(".x")[0].split(".x_")[0]
        path = module.replace(".", "/") + ".py"
        counts = by_module.setdefault(path, Counter())
        if status in {"survived", "no tests"} and any(fnmatch(name, g) for g in untestable):
            status = "untestable"
        elif status == "survived" and name in equivalent:
            status = "equivalent"
        counts[status] += 1
        if status in {"survived", "no tests"}:
            print(f"{status}: {name}  (mutmut show {name})")
    return by_module


def listed(path: Path) -> set[str]:
    """The names (or globs) a list holds, one a line, `# why` after each."""
    return {line.split("#")[0].strip() for line in path.read_text().splitlines()} - {""}


def score(counts: Counter[str]) -> float:
    """Mutants no test reaches ("no tests") count as survivors: nothing pins that code."""
    killed = sum(counts[s] for s in KILLED)
    judged = killed + counts["survived"] + counts["no tests"]
    return round(100 * killed / judged, 1) if judged else 100.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help="default: app/ modules changed since --base")
    parser.add_argument("--base", default="main")
    parser.add_argument("--budget", type=int, default=900, help="seconds for mutmut run")
    parser.add_argument("--children", type=int, default=1, help="mutants tested at once")
    parser.add_argument(
        "--tests", nargs="+", help="these tests instead of TESTS' (a score before new tests)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=15.0,
        help="a mutant times out (counted killed) after its tests' time + 1 s, times this",
    )
    parser.add_argument("--update", action="store_true", help="raise the ratchet")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args()
    modules = args.modules or changed_modules(args.base)
    if not modules:
        print("no scoped app/ module changed: nothing to mutate")
        return 0
    folder = scratch_copy()
    try:
        configure(folder, modules, args.tests, args.timeout)
        by_module = run(folder, args.budget, args.children)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    ratchet = json.loads(RATCHET.read_text()) if RATCHET.exists() else {}
    worse = []
    for module in modules:
        counts = by_module.get(module, Counter())
        unchecked = counts["not checked"]
        measured = score(counts)
        floor = ratchet.get(module)
        detail = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        print(f"{module}: {measured}% (ratchet {floor}) [{detail}]")
        if unchecked:
            print(f"  {unchecked} mutants unchecked within the budget: not judged")
            continue
        if args.tests:  # another selection than TESTS': a measure, not the ratchet's
            continue
        if floor is not None and measured < floor:
            worse.append(module)
        elif args.update and (floor is None or measured > floor):
            ratchet[module] = measured
    if args.update:
        RATCHET.write_text(json.dumps(dict(sorted(ratchet.items())), indent=2) + "\n")
    if worse:
        print("mutation score went down: " + ", ".join(worse))
        return 1
    return 0


if __name__ == "__main__":
    # A CI timeout's SIGTERM still drops the template database (run's `finally`).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.environ.setdefault("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    sys.exit(main())
