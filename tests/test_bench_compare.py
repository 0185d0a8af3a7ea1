"""bench/run.py --baseline: the sides take turns, the first alternating, and a run with a
failed request (or none of its results) makes the comparison a failure."""

import sys
from pathlib import Path

import orjson

from bench.compare import Side, print_side_by_side, run_side, turns


def test_the_side_that_goes_first_alternates_pair_by_pair():
    base, work = Side("base", Path("b"), Path(".")), Side("work", Path("w"), Path("."))
    order = [(pair, side.label) for pair, side in turns(base, work, 3)]
    assert order == [
        (0, "base"), (0, "work"), (1, "work"), (1, "base"), (2, "base"), (2, "work"),
    ]  # fmt: skip


def fake_side(tmp_path: Path, report: dict[str, object] | None) -> Side:
    """A checkout whose bench/run.py writes `report` as results.json (or nothing)."""
    (tmp_path / "bench").mkdir()
    body = (
        ""
        if report is None
        else f"out.joinpath('results.json').write_bytes({orjson.dumps(report)!r})"
    )
    (tmp_path / "bench" / "run.py").write_text(
        f"import sys, pathlib\nout = pathlib.Path(sys.argv[2])\nout.mkdir()\n{body}\n"
    )
    return Side("fake", Path(sys.executable), tmp_path)


def test_a_run_with_a_failed_request_is_a_failure_and_its_rows_are_kept(tmp_path, capsys):
    rows = [{"name": "DB ceiling", "events_per_second": 2500.5, "p50_ms": 9.0, "failed": 1}]
    side = fake_side(tmp_path, {"rows": rows, "failures": ["DB ceiling: 1 answered 500"]})
    result = run_side(side, tmp_path / "out", [])
    assert result.failures == ["fake: DB ceiling: 1 answered 500"]
    print_side_by_side([result])
    assert "2,500.5" in capsys.readouterr().out


def test_a_run_without_results_is_a_failure(tmp_path):
    assert run_side(fake_side(tmp_path, None), tmp_path / "out", []).failures
    clean = tmp_path / "clean"
    clean.mkdir()
    assert not run_side(fake_side(clean, {"rows": [], "failures": []}), clean / "o", []).failures
