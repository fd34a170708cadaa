"""The benchmark suite stays runnable: one smoke run of every benchmark in one
process (`--quick`, with XLA's cheapest compilation: the figures are not checked
here; goals live in benchmarks/RESULTS.md, never in timed tests). It writes nothing
into the repository: no report into RESULTS.md, no plots there (they are drawn into
a temporary folder), no other files."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

import benchmarks

from ._repo import leaves_repository_alone


ROOT = pathlib.Path(__file__).parent.parent
BENCH = ROOT / "benchmarks"
# A smoke run compiles a few hundred small programs: unoptimised code compiles in
# about half the time, and its speed does not matter here.
FAST_COMPILE = (
    " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
)
GOAL_LINE = re.compile(r"^- .*goal .*: (met|\*\*NOT met\*\*)$", re.M)


def run(*args: str) -> str:
    # RESULTS.md and the committed plots, and every plot a benchmark could draw.
    watched = {BENCH / "RESULTS.md", *BENCH.glob("*.png")}
    watched |= {BENCH / f"{name}.png" for name in benchmarks.BENCHMARKS}
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + FAST_COMPILE)
    with leaves_repository_alone(*sorted(watched)):
        proc = subprocess.run(
            [sys.executable, "-m", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.programs
def test_every_benchmark_runs_and_reports_goals(tmp_path):
    plots = tmp_path / "plots"
    plots.mkdir()
    out = run("benchmarks", "--quick", "--no-append", "--plots-dir", str(plots))
    assert "FAILED" not in out
    sections = re.split(r"^=== ", out, flags=re.M)[1:]
    assert [s.split(" ", 1)[0] for s in sections] == list(benchmarks.BENCHMARKS)
    for name, section in zip(benchmarks.BENCHMARKS, sections):
        assert f"### {name}: " in section, section[:500]
        goals = section.split("#### Goals", 1)[-1]
        assert GOAL_LINE.search(goals), f"{name} reported no goals"
    assert "### Goals:" in out
    # Exact counts are not timings: dispatch's (threads' errors and results unlike
    # serial calls', traces per signature) hold even in a smoke run.
    dispatch = sections[list(benchmarks.BENCHMARKS).index("dispatch")]
    counts = [ln for ln in dispatch.splitlines() if "(spread exact)" in ln]
    assert counts and all(ln.endswith(": met") for ln in counts), counts
    drawn = {p.name for p in plots.iterdir()}
    assert drawn <= {f"{name}.png" for name in benchmarks.BENCHMARKS}
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert "dispatch.png" in drawn


def test_every_benchmark_module_is_registered():
    modules = {p.stem for p in BENCH.glob("*.py") if not p.stem.startswith("_")}
    assert modules == set(benchmarks.BENCHMARKS)


def test_results_keep_one_current_section_per_benchmark():
    from benchmarks.__main__ import update_results

    first = update_results(
        "", {"scaling": "old scaling\n- a: **1x**; goal <= 2x: met\n"}
    )
    first += "\n## Notes\n\nkept\n"
    second = update_results(
        first,
        {
            "scaling": "new scaling\n- a: **3x**; goal <= 2x: **NOT met**\n",
            "dispatch": "dispatch\n- b: **1x**; goal <= 2x: met\n",
        },
    )
    assert "old scaling" not in second and second.count("new scaling") == 1
    assert second.index("<!-- bench:dispatch -->") < second.index("<!-- bench:scal")
    assert second.endswith("\n## Notes\n\nkept\n")
    assert "## Goals: 1 of 2 met" in second
    assert update_results(second, {}) == second
