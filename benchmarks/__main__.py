"""`python -m benchmarks [names...] [--quick]`: the suite (or the named benchmarks),
each against its baseline in the same process; the markdown report is printed, each
benchmark's section of benchmarks/RESULTS.md is replaced by today's (one current
section per benchmark: history lives in git, not in the file), and each benchmark's
plot is saved next to it as benchmarks/<name>.png."""

import argparse
import datetime
import gc
import importlib
import pathlib
import re
import sys
import time
import traceback

from . import BENCHMARKS
from ._common import Goal, machine, Result, save_plot, setup_devices, table


HERE = pathlib.Path(__file__).parent


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "names",
        nargs="*",
        metavar="name",
        help=f"benchmarks to run (default: all): {', '.join(BENCHMARKS)}",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes, few rounds (a smoke test)"
    )
    parser.add_argument(
        "--devices", type=int, default=8, help="simulated CPU devices (default 8)"
    )
    parser.add_argument(
        "--no-append",
        "--no-write",
        dest="no_append",
        action="store_true",
        help="print only; leave RESULTS.md alone",
    )
    parser.add_argument("--no-plots", action="store_true", help="draw no PNGs")
    parser.add_argument(
        "--plots-dir",
        type=pathlib.Path,
        default=HERE,
        help="where to draw the PNGs (default: benchmarks/)",
    )
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {BENCHMARKS}")
    return args


def run_one(name: str, quick: bool) -> Result:
    module = importlib.import_module(f".{name}", __package__)
    t0 = time.perf_counter()
    try:
        result = module.run(quick=quick)
    except Exception:
        trace = traceback.format_exc()
        print(trace, file=sys.stderr)
        result = Result(
            name,
            "FAILED",
            f"```\n{trace.strip()[-3000:]}\n```",
            [Goal("the benchmark ran", "no error", 0, False, unit="count")],
        )
    result.seconds = time.perf_counter() - t0
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    setup_devices(args.devices)  # before anything starts JAX's backend

    import jax

    names = args.names or list(BENCHMARKS)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join(["python -m benchmarks", *argv])
    results = []
    for name in names:
        print(f"=== {name}{' (quick)' if args.quick else ''}", flush=True)
        result = run_one(name, args.quick)
        if not args.no_plots:
            size = save_plot(result, args.plots_dir / f"{name}.png")
            if size is not None:
                print(f"(plot: {args.plots_dir / name}.png, {size // 1024} KB)")
        print(result.markdown(), flush=True)
        results.append(result)
        jax.clear_caches()
        gc.collect()

    rows = [
        [r.name, g.what, g.target, g.measured(), g.spread(), g.verdict()]
        for r in results
        for g in r.goals
    ]
    met = sum(g.met for r in results for g in r.goals)
    total = sum(len(r.goals) for r in results)
    quick = (
        "\n\n**--quick run: small sizes and few rounds, a smoke test; the figures "
        "are indicative only.**"
        if args.quick
        else ""
    )
    sections = []
    for r in results:
        text = r.markdown()
        if not args.no_plots and r.plot is not None:
            text += f"\n![{r.name}]({r.name}.png)\n"
        sections.append(text)
    report = (
        f"## Suite ({stamp})\n\n{machine()}\n\nCommand: `{command}`{quick}\n\n"
        f"### Goals: {met} of {total} met\n\n"
        + table(
            ["benchmark", "goal", "target", "measured", "spread", "verdict"],
            rows,
            "lllrrl",
        )
        + "\n\nMeasured values are medians of per-round ratios (contenders "
        "interleaved in the same process), spreads their min-max over rounds; "
        "counts and compiled-memory figures are exact.\n\n" + "\n".join(sections)
    )
    print(f"\n### Goals: {met} of {total} met")
    if not args.no_append:
        results_md = HERE / "RESULTS.md"
        header = f"{machine()}\n\nCommand: `{command}` ({stamp}){quick}\n\n"
        new = {name: header + text for name, text in zip(names, sections)}
        old = results_md.read_text() if results_md.exists() else ""
        results_md.write_text(update_results(old, new))
        print(f"replaced the sections of {', '.join(names)} in {results_md}")
    del report
    return 0 if all(r.title != "FAILED" for r in results) else 1


INTRO = """# Benchmark results

One current section per benchmark, replaced by each run of `nox -s bench` /
`python -m benchmarks [names...]` (history is in git). Ratios are medians of
per-round ratios, the contenders measured back to back in the same process; spreads
are their min-max over rounds; counts and compiled-memory figures are exact.
"""
_SECTION = re.compile(r"<!-- bench:(\w+) -->\n(.*?)<!-- /bench:\1 -->\n?", re.S)
_SUMMARY = re.compile(r"<!-- summary -->.*?<!-- /summary -->\n?", re.S)
_GOAL_LINE = re.compile(r"^- .*?goal .*?: (met|\*\*NOT met\*\*)$", re.M)


def update_results(old: str, new: dict[str, str]) -> str:
    """RESULTS.md with the sections in `new` replaced (or added), the others and
    the notes after them kept, and the goal summary recounted."""
    sections = {m.group(1): m.group(2) for m in _SECTION.finditer(old)}
    ends = [m.end() for m in _SECTION.finditer(old)]
    notes = old[ends[-1] :] if ends else ""
    sections.update(new)
    order = [n for n in BENCHMARKS if n in sections]
    order += [n for n in sections if n not in order]
    met = total = 0
    rows = []
    for name in order:
        verdicts = _GOAL_LINE.findall(sections[name])
        m = sum(v == "met" for v in verdicts)
        met, total = met + m, total + len(verdicts)
        rows.append([f"[{name}](#{name})", f"{m} of {len(verdicts)}"])
    summary = (
        "<!-- summary -->\n## Goals: "
        f"{met} of {total} met\n\n"
        + table(["benchmark", "goals met"], rows, "lr")
        + "\n<!-- /summary -->\n"
    )
    body = "".join(
        f'<!-- bench:{n} -->\n<a id="{n}"></a>\n\n{_strip_anchor(sections[n])}'
        f"<!-- /bench:{n} -->\n"
        for n in order
    )
    return f"{INTRO}\n{summary}\n{body}{notes}"


def _strip_anchor(text: str) -> str:
    text = re.sub(r"^<a id=\"\w+\"></a>\n\n", "", text)
    return text if text.endswith("\n") else text + "\n"


if __name__ == "__main__":
    sys.exit(main())
