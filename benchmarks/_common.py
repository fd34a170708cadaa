"""Shared benchmark plumbing: simulated devices, interleaved timing, goals, markdown
tables and plots."""

import dataclasses
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any


def setup_devices(n: int = 8) -> None:
    """Simulated CPU devices; must run before JAX initialises."""
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
    )
    import jax

    jax.config.update("jax_num_cpu_devices", n)  # affects the CPU backend only


def interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    calls: int,
    rounds: int,
    block: Callable,
    warmup: int = 20,
    alternate: bool = False,
    settle: int = 0,
) -> dict[str, list[float]]:
    """Per-call times (seconds) of each function, measured in alternating rounds so
    that machine noise hits every contender alike. Each round times `calls` calls
    back to back and records the median per-call time of that round. With
    `alternate`, odd rounds run the contenders in reverse order (no contender
    always follows the same one); with `settle`, each contender makes that many
    untimed calls before its timed ones in every round (so that none pays for
    switching from another program)."""
    for fn in fns.values():  # compile and warm up
        for _ in range(warmup):
            block(fn())
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        order = list(fns.items())
        for name, fn in order[::-1] if alternate and r % 2 else order:
            for _ in range(settle):
                block(fn())
            times = []
            for _ in range(calls):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            block(fn())
            samples[name].append(statistics.median(times))
    return samples


def blocking(fn: Callable[[], Any]) -> Callable[[], Any]:
    """`fn` that waits for its result: for timing compute, not just dispatch."""
    import jax

    return lambda: jax.block_until_ready(fn())


def machine() -> str:
    import equinox
    import jax

    devices = jax.devices()
    return (
        f"{platform.node() or 'host'} ({platform.machine()}, {os.cpu_count()} cores), "
        f"{len(devices)} x {devices[0].device_kind} ({jax.default_backend()}), "
        f"Python {sys.version.split()[0]}, jax {jax.__version__}, "
        f"equinox {equinox.__version__}"
    )


# ---------------------------------------------------------------- compiled programs


def compiled_text(fn: Callable[..., Any], *args: Any) -> str:
    """The optimised HLO of `fn(*args)`, compiled as one program: `args` may hold
    non-array leaves (they are closed over) and `fn` may return them (dropped)."""
    import equinox as eqx
    import jax

    arrays, static = eqx.partition(args, eqx.is_array)

    def wrapped(arrays: Any) -> Any:
        return eqx.filter(fn(*eqx.combine(arrays, static)), eqx.is_array)

    return jax.jit(wrapped).lower(arrays).compile().as_text()


def _instructions(text: str) -> list[str]:
    text = re.sub(r", metadata=\{[^}]*\}", "", text)
    text = re.sub(r"stack_frame_id=\d+", "", text)
    lines = [ln for ln in text.splitlines() if ln.startswith((" ", "ENTRY", "%"))]
    names = re.compile(r"%[\w.\-]+|[\w\-]+\.\d+(?=: )")  # instructions, parameters
    return sorted(names.sub("%", ln).strip() for ln in lines)


def same_program(a: str, b: str) -> bool:
    """Whether two compiled programs have the same instructions, names aside."""
    return _instructions(a) == _instructions(b)


_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1}
_BYTES.update(c64=8, c128=16)


def collectives(text: str) -> dict[str, tuple[int, int]]:
    """{collective: (instructions, bytes of their results)} in a compiled program."""
    out: dict[str, tuple[int, int]] = {}
    for kind in ("all-reduce", "all-gather", "collective-permute", "all-to-all"):
        count = total = 0
        for line in text.splitlines():
            head, sep, _ = line.partition(f" {kind}(")
            if not sep or "=" not in head:
                continue
            count += 1
            for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", head.split("=", 1)[1]):
                size = math.prod(int(d) for d in dims.split(",") if d)
                total += size * _BYTES.get(dtype, 4)
        if count:
            out[kind] = (count, total)
    return out


# ---------------------------------------------------------------- goals and reports


@dataclasses.dataclass
class Goal:
    """One goal of a benchmark: what was compared, the target, the measured value
    (a median of per-round ratios, or an exact count) and its spread over rounds."""

    what: str
    target: str
    value: float
    met: bool
    lo: float | None = None
    hi: float | None = None
    unit: str = "x"

    def measured(self) -> str:
        if self.unit == "x":
            return f"{self.value:.2f}x" if self.value >= 0.1 else f"{self.value:.2g}x"
        if self.unit == "count":
            return f"{self.value:g}"
        return f"{self.value:.3g} {self.unit}"

    def spread(self) -> str:
        if self.lo is None or self.hi is None:
            return "exact"
        return f"{self.lo:.2f}-{self.hi:.2f}"

    def verdict(self) -> str:
        return "met" if self.met else "**NOT met**"

    def line(self) -> str:
        return (
            f"- {self.what}: **{self.measured()}** (spread {self.spread()}); "
            f"goal {self.target}: {self.verdict()}"
        )


def ratios(num: Sequence[float], den: Sequence[float]) -> tuple[float, float, float]:
    """Median, min and max of the per-round ratios num[i] / den[i] (both measured in
    the same round, back to back)."""
    r = sorted(a / b for a, b in zip(num, den))
    return statistics.median(r), r[0], r[-1]


def ratio_goal(
    what: str,
    num: Sequence[float],
    den: Sequence[float],
    *,
    at_most: float | None = None,
    within: float | None = None,
) -> Goal:
    """`num / den <= at_most`, or `|num / den - 1| <= within`, on the median of the
    per-round ratios."""
    med, lo, hi = ratios(num, den)
    if at_most is not None:
        return Goal(what, f"<= {at_most:g}x", med, med <= at_most, lo, hi)
    assert within is not None
    return Goal(
        what,
        f"within {within:.0%} (ratio {1 - within:g}-{1 + within:g})",
        med,
        abs(med - 1) <= within,
        lo,
        hi,
    )


@dataclasses.dataclass
class Result:
    """What a benchmark hands the runner: a markdown body (headings from `####`), its
    goals, and optionally a function drawing its plot on a matplotlib Figure."""

    name: str
    title: str
    body: str
    goals: list[Goal]
    plot: Callable[[Any], None] | None = None
    seconds: float = 0.0

    def markdown(self) -> str:
        goals = "\n".join(g.line() for g in self.goals)
        return (
            f"### {self.name}: {self.title}\n\n{self.body.strip()}\n\n"
            f"#### Goals\n\n{goals}\n\n(ran in {self.seconds:.0f} s)\n"
        )


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> str:
    """A markdown table; `align` has one letter per column, `l` or `r` (default: the
    first column left, the others right)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def spread(samples: Sequence[float], scale: float = 1e6, fmt: str = ".1f") -> str:
    return f"{min(samples) * scale:{fmt}}-{max(samples) * scale:{fmt}}"


def time_rows(
    samples: dict[str, list[float]], names: Sequence[str], unit: str = "us"
) -> list[list[str]]:
    """`[name, median, min-max]` rows in µs (or ms)."""
    scale, fmt = (1e6, ".1f") if unit == "us" else (1e3, ".2f")
    rows = []
    for name in names:
        med = statistics.median(samples[name])
        rows.append([name, f"{med * scale:{fmt}}", spread(samples[name], scale, fmt)])
    return rows


def save_plot(result: Result, path: Any) -> int | None:
    """Draws `result.plot` into a small PNG at `path` (Agg, 72 dpi); returns its size
    in bytes, or None without a plot or without matplotlib."""
    if result.plot is None:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plots; pip install -e '.[bench]')")
        return None
    fig = plt.figure(figsize=(8, 3.2))
    try:
        result.plot(fig)
        fig.tight_layout()
        fig.savefig(path, dpi=72)
    finally:
        plt.close(fig)
    return os.path.getsize(path)
