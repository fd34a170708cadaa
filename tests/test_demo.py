"""`python -m eqpar.demo`: what a person sees. It runs (small) into the folder it is
given, writes its two PNGs there and nothing anywhere else, reports median times and
what simulated devices can show, prints no carriage returns into a pipe, and its
`--help` shows every default. `import eqpar` leaves the demo out, and its optical
model (shared with an example and the benchmarks) comes without the rest."""

import io
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from tqdm import tqdm

from eqpar.demo import __main__ as cli, optics, report, training

from ._repo import ROOT


SMALL = ["--devices", "4", "--size", "32", "--planes", "8", "--steps", "5"]
REPEATS = 3


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo as a person runs it, its stdout a pipe (not a terminal), from a
    fresh folder, writing into `out/` there."""
    cwd = tmp_path_factory.mktemp("demo")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "eqpar.demo", *SMALL]
        + ["--repeats", str(REPEATS), "--out", "out"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, cwd


@pytest.mark.programs
def test_demo_matches_one_device(demo_run):
    proc, _ = demo_run
    assert "eqpar demo on 4 CPU devices" in proc.stdout
    assert "All results match one device." in proc.stdout
    assert "MISMATCH" not in proc.stdout


@pytest.mark.programs
def test_demo_writes_its_pngs_only_into_out(demo_run):
    proc, cwd = demo_run
    assert sorted(p.name for p in cwd.iterdir()) == ["out"]
    wrote = [line.split()[1] for line in proc.stdout.splitlines() if "  wrote " in line]
    assert wrote == ["out/microscope.png", "out/training.png"]
    assert sorted(p.name for p in (cwd / "out").iterdir()) == [
        "microscope.png",
        "training.png",
    ]
    from matplotlib.image import imread

    for name in ("microscope.png", "training.png"):
        path = cwd / "out" / name
        assert path.stat().st_size > 10_000, name
        pixels = imread(path)[..., :3]
        # Not blank: many distinct colours, and both dark and light pixels.
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100, name
        assert pixels.min() < 0.2 and pixels.max() > 0.8, name


@pytest.mark.programs
def test_demo_summary_reports_medians_and_what_simulated_devices_show(demo_run):
    out = demo_run[0].stdout
    header = next(line for line in out.splitlines() if line.startswith("| what ran"))
    assert "1 device: median (min-max)" in header
    assert "4 devices: median (min-max)" in header
    assert "ratio of medians" in header
    rows = [
        line
        for line in out.splitlines()
        if line.startswith("| ") and not line.startswith(("| what", "|---"))
    ]
    assert [row.split(" | ")[0] for row in rows] == [
        "| PSF over planes",
        "| image (sensor_sum)",
        "| training step (params after 5)",
    ]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[1]) < 1e-4, row
        medians = []
        for cell in cells[2:4]:
            median, low, high = map(
                float, re.fullmatch(r"(\S+) ms \((\S+)-(\S+)\)", cell).groups()
            )
            assert 0 <= low <= median <= high, row  # rounding keeps the order
            medians.append(median)
        # The ratio is of the unrounded medians (test_summary_table checks it
        # exactly): it lies within what medians printed to 0.01 ms allow.
        assert cells[4].endswith("x"), row
        ratio = float(cells[4][:-1])
        (m1, mn), half = medians, 0.005  # half of the last printed digit
        assert ratio + half >= (m1 - half) / (mn + half), row
        if mn > half:
            assert ratio - half <= (m1 + half) / (mn - half), row
    assert f"over {REPEATS} runs after compiling" in out
    assert "simulated by XLA" in out and "cannot show a speedup" in out


def test_summary_table():
    rows = [
        report.Row("fast", 3e-7, [0.003, 0.001, 0.002], [0.004, 0.0041, 0.0039]),
        report.Row("slow", 2e-5, [0.01234], [0.00617]),
    ]
    assert report.summary(rows, 8).splitlines() == [
        "| what ran | max rel. diff vs 1 device | 1 device: median (min-max) "
        "| 8 devices: median (min-max) | ratio of medians |",
        "|---|---:|---:|---:|---:|",
        "| fast | 3.00e-07 | 2.00 ms (1.00-3.00) | 4.00 ms (3.90-4.10) | 0.50x |",
        "| slow | 2.00e-05 | 12.34 ms (12.34-12.34) | 6.17 ms (6.17-6.17) | 2.00x |",
    ]
    assert report.all_match(rows)
    assert not report.all_match([*rows, report.Row("off", 2e-4, [1.0], [1.0])])


@pytest.mark.programs
def test_demo_prints_no_carriage_returns_into_a_pipe(demo_run):
    proc, _ = demo_run
    assert "\r" not in proc.stdout and "\r" not in proc.stderr
    assert "training step 5/5 loss=" in proc.stdout


def test_progress_is_plain_lines_off_a_terminal_and_a_bar_on_one():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    plain, terminal = io.StringIO(), Terminal()
    for stream in (plain, terminal):
        bar = training.progress(10, stream)
        for step in range(10):
            bar.set_postfix(loss=f"{1 / (step + 1):.4f}")
            bar.update(1)
        bar.close()
    lines = plain.getvalue().splitlines()
    assert "\r" not in plain.getvalue()
    assert lines == [
        f"  training step {k}/10 loss={1 / k:.4f}" for k in (2, 4, 6, 8, 10)
    ]
    assert "\r" in terminal.getvalue()  # redrawn in place, on a terminal only
    assert isinstance(training.progress(10, Terminal()), tqdm)


def test_timing_note_on_cpu_and_elsewhere():
    cpu = report.timing_note("cpu", 8, 7, 30)
    assert "median" in cpu and "7 runs" in cpu and "30 steps" in cpu
    assert "8 devices are simulated" in cpu and "cannot show a speedup" in cpu
    gpu = report.timing_note("gpu", 8, 7, 30)
    assert "median" in gpu and "simulated" not in gpu


def test_demo_help_shows_every_default(capsys):
    with pytest.raises(SystemExit) as raised:
        cli.main(["--help"])
    assert raised.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    parser = cli.parser()
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert {a.dest for a in options} >= {"devices", "size", "planes", "steps", "out"}
    for action in options:
        assert f"(default: {action.default})" in text, action.dest


@pytest.mark.parametrize("flag", ["--devices", "--size", "--steps", "--repeats"])
def test_demo_rejects_counts_below_one(flag, capsys):
    with pytest.raises(SystemExit) as raised:
        cli.main([flag, "0"])
    assert raised.value.code == 2
    assert f"{flag} must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("planes, size, grid", [(32, 128, 4), (8, 32, 2), (3, 16, 4)])
def test_bead_volume(planes, size, grid):
    volume, beads = optics.bead_volume(planes, size, grid=grid)
    volume = np.asarray(volume)
    assert volume.shape == (planes, size, size) and beads.shape == (grid**2, 3)
    # One bright pixel per bead, exactly where `beads` says, and nothing else.
    expected = np.zeros_like(volume)
    expected[beads[:, 2], beads[:, 0], beads[:, 1]] = 1.0
    np.testing.assert_array_equal(volume, expected)
    assert len({(r, c) for r, c, _ in beads}) == grid**2  # distinct positions
    # The beads step through the depths from the first plane to the last.
    assert beads[0, 2] == 0 and beads[-1, 2] == planes - 1
    assert (np.diff(beads[:, 2]) >= 0).all()


@pytest.mark.parametrize("size, factor", [(32, 4), (16, 8)])
def test_fine_psf_is_the_psf_sampled_more_finely(size, factor):
    """The PSF drawn in the demo: every `factor`-th pixel of it is the computed PSF
    (the pupil is zero-padded: exact, not interpolated), over the same field."""
    import jax.numpy as jnp

    scope = optics.make_microscope(size)
    zs = jnp.array([-1.0, 0.0, 2.5])
    fine = np.asarray(optics.fine_psf(scope, zs, factor))
    coarse = np.asarray(jax.vmap(scope.psf)(zs))
    assert fine.shape == (3, size * factor, size * factor)
    np.testing.assert_allclose(
        fine[:, ::factor, ::factor], coarse, rtol=1e-4, atol=1e-6 * coarse.max()
    )
    # Finer: the in-focus core (about λ / (2 NA) = 0.33 µm, one computed pixel of
    # 0.3 µm) spans several drawn pixels above half its peak.
    focus = fine[1]
    assert (focus > focus.max() / 2).sum() >= factor**2 // 2


def test_log_psf_panels_have_colourbars():
    plt = pytest.importorskip("matplotlib.pyplot")
    from eqpar.demo import plots

    fig, axes = plt.subplots(1, 2)
    psf = np.random.default_rng(0).random((8, 64, 64)) + 1e-4
    plots.draw_psf(axes[0], axes[1], psf, np.linspace(-4, 4, 8), 0.1)
    titles = [ax.get_title() for ax in axes]
    assert all("(log)" in t for t in titles)
    bars = [ax for ax in fig.axes if ax not in axes]
    assert [ax.get_ylabel() for ax in bars] == ["intensity / peak (log)"] * 2
    plt.close(fig)


@pytest.mark.programs
def test_import_eqpar_leaves_the_demo_out_and_optics_comes_alone():
    code = (
        "import sys\n"
        "import eqpar\n"
        "print(sorted(m for m in sys.modules if m.startswith('eqpar.demo')))\n"
        "import eqpar.demo.optics\n"
        "print(sorted(m for m in sys.modules if m.startswith('eqpar.demo')\n"
        "    or m.split('.')[0] in ('matplotlib', 'tqdm')))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == ["[]", "['eqpar.demo', 'eqpar.demo.optics']"]
