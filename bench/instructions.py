"""What the delivery statement costs PostgreSQL, in instructions, which load does not move.

    python bench/instructions.py                       # the work tree
    python bench/instructions.py --baseline 4f460bf    # that commit, then the work tree

bench/run.py's `DB ceiling` and `physical limit` rows time the service's mailbox.created
statement with 32 senders; on a shared two-core box they move by a third from run to run.
This counts what one execution costs instead: each side's own statement (rendered by its
own bench/run.py, as its pgbench script, fresh keys each time) is PREPAREd and EXECUTEd in a
single-user `postgres` under `valgrind --tool=callgrind`, each statement its own transaction,
on a cluster of its own migrated by the side's own code. Two runs per count, a short one
(WARM executions) and a long one (WARM + STATEMENTS), each from a fresh copy of the
migrated cluster; their difference over STATEMENTS is the figure. The same side measured
twice differs by well under 1 %. Any statement that fails (an ERROR in the backend's
output) makes the run print it and exit 1.

Needs valgrind and PostgreSQL's server binaries (PG_BIN, default /usr/lib/postgresql/15/bin);
the cluster runs as the `postgres` user when started by root.
"""

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
WARM = 20
STATEMENTS = 500
DATABASE = "cmw"
# Run in a side's own checkout with its own Python: its bench/run.py renders its statement
# as its pgbench script (run.out / "pgbench.sql") without running pgbench, then its own
# migrations make the schema on the given server.
RENDER = textwrap.dedent(
    """
    import contextlib, subprocess, sys
    from pathlib import Path
    from bench import run as r

    out, url = Path(sys.argv[1]), sys.argv[2]
    subprocess.run([*r.CLI, "migrate"], env=r.service_env(url), check=True, cwd=r.ROOT)
    r.scratch_database = lambda *a, **k: contextlib.nullcontext(url)
    r.subprocess.run = lambda *a, **k: subprocess.CompletedProcess(a, 0, "", "")
    r.bench_physical_limit(r.Run(out, 1), r.service_writes(1)[0])
    """
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def as_postgres(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@contextmanager
def cluster(folder: Path) -> Iterator[tuple[Path, str]]:
    """A new cluster in `folder`, running until the block ends; its data folder and URL."""
    data = folder / "data"
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
    subprocess.run(
        as_postgres([str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust"]),
        check=True,
        capture_output=True,
    )
    port = free_port()
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
    start = [str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-w"]
    start += ["-o", options, "start"]
    subprocess.run(as_postgres(start), check=True, capture_output=True)
    try:
        subprocess.run(
            as_postgres([str(PG_BIN / "createdb"), "-h", str(folder), "-p", str(port), DATABASE]),
            check=True,
        )
        yield data, f"postgresql://postgres@127.0.0.1:{port}/{DATABASE}"
    finally:
        stop = [str(PG_BIN / "pg_ctl"), "-D", str(data), "-w", "-m", "fast", "stop"]
        subprocess.run(as_postgres(stop), check=True, capture_output=True)


def prepared(pgbench_script: str) -> str:
    """The pgbench script's statement as a PREPARE whose one argument is pgbench's `:n`."""
    statement = pgbench_script.split("\n", 1)[1].strip().rstrip(";")
    return f"PREPARE delivery(text) AS {statement.replace(':n', '$1')};\n\n"


def instructions(data: Path, folder: Path, script: str, executions: int) -> int:
    """Instructions a single-user backend takes for the PREPARE and `executions` EXECUTEs
    (fresh keys each), from a fresh copy of the migrated cluster."""
    copy = folder / f"copy-{executions}"
    shutil.copytree(data, copy, symlinks=True)
    if os.geteuid() == 0:
        subprocess.run(["chown", "-R", "postgres", str(copy)], check=True)
    calls = "".join(f"EXECUTE delivery('{n}');\n\n" for n in range(1, executions + 1))
    counted = folder / f"callgrind-{executions}.out"
    if os.geteuid() == 0:
        counted.touch()
        shutil.chown(counted, "postgres")
    command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={counted}"]
    command += [str(PG_BIN / "postgres"), "--single", "-j", "-D", str(copy)]
    command += ["-c", "fsync=off", DATABASE]
    stdin = script + calls
    done = subprocess.run(as_postgres(command), input=stdin, capture_output=True, text=True)
    shutil.rmtree(copy)
    errors = [line for line in (done.stdout + done.stderr).splitlines() if "ERROR" in line]
    if done.returncode or errors:
        raise RuntimeError((errors or [done.stderr.strip()[-300:]])[0])
    summary = re.search(r"^summary: (\d+)$", counted.read_text(), re.MULTILINE)
    if summary is None:
        raise RuntimeError(f"callgrind wrote no summary in {counted}")
    return int(summary[1])


def measure(python: Path, tree: Path, runs: int) -> list[int]:
    """Instructions a statement, `runs` times, for the side checked out in `tree`."""
    with tempfile.TemporaryDirectory(prefix="cmw-instructions-") as name:
        folder = Path(name)
        os.chmod(folder, 0o755)
        with cluster(folder) as (data, url):
            subprocess.run([str(python), "-c", RENDER, str(folder), url], cwd=tree, check=True)
        script = prepared((folder / "pgbench.sql").read_text())
        figures = []
        for _ in range(runs):
            short = instructions(data, folder, script, WARM)
            long = instructions(data, folder, script, WARM + STATEMENTS)
            figures.append(round((long - short) / STATEMENTS))
        return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", metavar="COMMIT", help="also measure COMMIT, first")
    parser.add_argument("--runs", type=int, default=2, help="measurements per side")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        print("FAILED: valgrind not found (Debian: valgrind)")
        return 1
    sides: list[tuple[str, list[int]]] = []
    try:
        if args.baseline:
            from bench import compare  # after sys.path holds the checkout

            with tempfile.TemporaryDirectory(prefix="cmw-instructions-base-") as folder:
                with compare.baseline_checkout(args.baseline, Path(folder)) as base:
                    sides.append((base.label, measure(base.python, base.root, args.runs)))
        sides.append(("work tree", measure(Path(sys.executable), ROOT, args.runs)))
    except (RuntimeError, subprocess.CalledProcessError) as error:
        print(f"FAILED: {error}")
        return 1
    for label, figures in sides:
        print(f"{label:<28} {' / '.join(f'{f:,}' for f in figures)} instructions a statement")
    if len(sides) == 2:
        before, after = (min(figures) for _, figures in sides)
        print(f"work tree / baseline: {after / before:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
