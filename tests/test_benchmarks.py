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
    assert "| fast: lookup |" in out


def test_results_keep_one_current_section_per_benchmark():
    from benchmarks.__main__ import update_results

    first = update_results("", {"paths": "old paths\n- a: **1x**; goal <= 2x: met\n"})
    first += "\n## Notes\n\nkept\n"
    second = update_results(
        first,
        {
            "paths": "new paths\n- a: **3x**; goal <= 2x: **NOT met**\n",
            "dispatch": "dispatch\n- b: **1x**; goal <= 2x: met\n",
        },
    )
    assert "old paths" not in second and second.count("new paths") == 1
    assert second.index("<!-- bench:dispatch -->") < second.index("<!-- bench:paths")
    assert second.endswith("\n## Notes\n\nkept\n")
    assert "## Goals: 1 of 2 met" in second
    assert update_results(second, {}) == second
