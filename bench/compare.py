"""A baseline commit against the working tree, in alternating runs of bench/run.py.

    python bench/run.py --baseline 4f460bf --pairs 2 [--seconds 10 ...]

The baseline is checked out into a temporary worktree with a virtual environment of its
own (its own dependencies, its own migrations), so each side runs exactly its own code.
The box is noisy: the two sides take turns, and the side that goes first alternates from
pair to pair, so a drift in the background load weighs on both alike. Every row of every
run is printed side by side; a run with any failed request (or that did not finish) makes
the comparison exit 1.
"""

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
WORK = "work tree"
FIGURES = (("events_per_second", "ev/s"), ("p50_ms", "p50"), ("p99_ms", "p99"))


@dataclass(frozen=True)
class Side:
    label: str
    python: Path
    root: Path


@dataclass(frozen=True)
class Result:
    side: str
    rows: list[dict[str, Any]]
    failures: list[str]


@contextmanager
def baseline_checkout(commit: str, folder: Path) -> Iterator[Side]:
    """`commit` in a worktree of its own, with its own virtual environment; removed after."""
    tree = folder / "baseline"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), commit], check=True
    )
    try:
        venv = folder / "baseline-venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(venv / "bin" / "pip"), "install", "-q", "-e", f"{tree}[test]"], check=True
        )
        yield Side(f"base {commit}", venv / "bin" / "python", tree)
    finally:
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False
        )
        shutil.rmtree(folder / "baseline-venv", ignore_errors=True)


def run_side(side: Side, out: Path, passed: list[str]) -> Result:
    """One whole bench/run.py of one side; its results.json read back."""
    command = [str(side.python), str(side.root / "bench" / "run.py"), "--out", str(out), *passed]
    print(f"--- {side.label}: {' '.join(command)}", flush=True)
    done = subprocess.run(command, cwd=side.root)
    report = out / "results.json"
    if not report.exists():
        return Result(side.label, [], [f"{side.label}: exited {done.returncode}, no results"])
    data = orjson.loads(report.read_bytes())
    failures = [f"{side.label}: {f}" for f in data["failures"]]
    if done.returncode and not failures:
        failures.append(f"{side.label}: exited {done.returncode}")
    return Result(side.label, data["rows"], failures)


def turns(baseline: Side, work: Side, pairs: int) -> Iterator[tuple[int, Side]]:
    """Pair by pair, the two sides; the one that goes first alternates."""
    for pair in range(pairs):
        first, second = (baseline, work) if pair % 2 == 0 else (work, baseline)
        yield pair, first
        yield pair, second


def print_side_by_side(results: list[Result]) -> None:
    """Each row, then each figure with one column per run (the runs of a side together)."""
    ordered = sorted(results, key=lambda r: r.side.startswith(WORK))  # the baseline's first
    names = list(dict.fromkeys(row["name"] for r in ordered for row in r.rows))
    heads = [r.side[-17:] for r in ordered]
    print(f"\n{'row / figure':58}" + "".join(f"{h:>18}" for h in heads))
    for name in names:
        print(name)
        by_run = [{row["name"]: row for row in r.rows}.get(name, {}) for r in ordered]
        for key, label in FIGURES + tuple((k, k) for k in extra_keys(by_run)):
            values = [row.get(key) for row in by_run]
            if any(v is not None for v in values):
                print(f"    {label:54}" + "".join(f"{cell(v):>18}" for v in values))
        print(f"    {'failed':54}" + "".join(f"{cell(row.get('failed')):>18}" for row in by_run))


def extra_keys(rows: list[dict[str, Any]]) -> list[str]:
    known = {"name", "failed", *(key for key, _ in FIGURES)}
    return list(dict.fromkeys(k for row in rows for k in row if k not in known))


def cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:,.1f}" if isinstance(value, float) else str(value)


def compare(commit: str, pairs: int, passed: list[str], out: Path | None) -> int:
    folder = Path(tempfile.mkdtemp(prefix="cmw-compare-"))
    out = out or folder
    work = Side(WORK, Path(sys.executable), ROOT)
    results: list[Result] = []
    with baseline_checkout(commit, folder) as baseline:
        for pair, side in turns(baseline, work, pairs):
            kind = "base" if side is baseline else "work"
            result = run_side(side, out / f"pair{pair + 1}-{kind}", passed)
            results.append(Result(f"{result.side} p{pair + 1}", result.rows, result.failures))
    print_side_by_side(results)
    failures = [f for r in results for f in r.failures]
    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    print(f"reports in {out}")
    return 1 if failures else 0
