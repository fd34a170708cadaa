"""How the demo measures and reports: two programs timed alternately, each result's
largest difference from one device, and the summary table, with a note on what the
times mean (on simulated CPU devices: the same results, not a speedup).
"""

import os
import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


TOLERANCE = 1e-4  # the largest relative difference from one device that matches


class Row(NamedTuple):
    """One line of the summary: a program's largest relative difference from one
    device, and its wall times in seconds on one device and on all of them."""

    name: str
    diff: float
    times1: list[float]
    timesn: list[float]


def rel_diff(a: Any, b: Any) -> float:
    """Largest difference relative to the reference's largest magnitude."""
    return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))


def timed_pair(
    single: Callable[[], Any], sharded: Callable[[], Any], repeats: int
) -> tuple[Any, Any, list[float], list[float]]:
    """Runs both once (compiling them), then times each `repeats` times, alternating
    so that changes in the machine's load hit both alike. Returns both outputs and
    both lists of wall times in seconds."""
    out1 = jax.block_until_ready(single())
    outn = jax.block_until_ready(sharded())
    times1, timesn = [], []
    for _ in range(repeats):
        for fn, times in ((single, times1), (sharded, timesn)):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times.append(time.perf_counter() - t0)
    return out1, outn, times1, timesn


def summary(rows: list[Row], n: int) -> str:
    """The summary table (Markdown): per row, the difference, `median ms (min-max)`
    on 1 and on `n` devices, and the ratio of the (unrounded) medians."""
    lines = [
        f"| what ran | max rel. diff vs 1 device | 1 device: median (min-max) "
        f"| {n} devices: median (min-max) | ratio of medians |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        ratio = statistics.median(row.times1) / statistics.median(row.timesn)
        lines.append(
            f"| {row.name} | {row.diff:.2e} | {_ms(row.times1)} | {_ms(row.timesn)} "
            f"| {ratio:.2f}x |"
        )
    return "\n".join(lines)


def all_match(rows: list[Row]) -> bool:
    return all(row.diff < TOLERANCE for row in rows)


def _ms(times: list[float]) -> str:
    """`median ms (min-max)`."""
    return (
        f"{statistics.median(times) * 1e3:.2f} ms "
        f"({min(times) * 1e3:.2f}-{max(times) * 1e3:.2f})"
    )


def timing_note(platform: str, n: int, repeats: int, steps: int) -> str:
    """What the summary's times mean, and on simulated CPU devices what they cannot
    show."""
    how = (
        f"Times: median (min-max) over {repeats} runs after compiling; for training, "
        f"over its {steps} steps."
    )
    if platform != "cpu":
        return how
    return how + (
        f"\nThese {n} devices are simulated by XLA on this machine's {_cores()} CPU "
        "core(s) and share them. They show that the parallel programs compute what "
        "one device computes (the difference column) and what splitting the work and "
        "the collectives cost. They cannot show a speedup: a ratio near or below 1x "
        "is expected, and one above 1x reflects how XLA uses the same cores, not "
        "more hardware. Run the same code on several GPUs or TPUs to measure scaling."
    )


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
