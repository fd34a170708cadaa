"""The benchmark suite stays runnable: a --quick smoke run of every benchmark (its
figures are not checked here; goals live in benchmarks/RESULTS.md, never in timed
tests), and the dispatch profile. Neither writes into the repository: no report
appended to RESULTS.md, no plots, no other files."""

import pathlib
import subprocess
import sys

import benchmarks

from ._repo import leaves_repository_alone


ROOT = pathlib.Path(__file__).parent.parent
BENCH = ROOT / "benchmarks"


def run(*args: str) -> str:
    # RESULTS.md and the committed plots, and every plot a benchmark could draw.
    watched = {BENCH / "RESULTS.md", *BENCH.glob("*.png")}
    watched |= {BENCH / f"{name}.png" for name in benchmarks.BENCHMARKS}
    with leaves_repository_alone(*sorted(watched)):
        proc = subprocess.run(
            [sys.executable, "-m", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_suite_runs_quick():
    out = run("benchmarks", "--quick", "--no-append", "--no-plots")
    for name in benchmarks.BENCHMARKS:
        assert f"=== {name} (quick)" in out
    assert "FAILED" not in out
    assert "### Goals:" in out


def test_dispatch_profile_runs():
    out = run("benchmarks.dispatch_profile", "--leaves", "10", "--calls", "200")
    assert "| part: flatten (fun, args, kwargs) |" in out
