"""Distributed FFTs: `eqpar.fft.fftn` against `jnp.fft.fftn` of the same sharded
array, and against one device.

A complex64 field of S x S split by rows over the devices (`P("d")`), for S up to
the largest that fits comfortably here. Three programs, each compiled once:

- **eqpar.fft**: `eqpar.fft.fftn(x)`: each device transforms its rows along the
  columns, an all-to-all makes the rows whole (columns split), the transform along
  the rows runs, an all-to-all puts the rows back; the result is split by rows.
- **jnp.fft (XLA)**: `jax.jit(jnp.fft.fftn, out_shardings=<split by rows>)` on the
  same array: XLA does not partition FFTs, so it all-gathers the field onto every
  device, transforms it whole there, and keeps each device's rows.
- **one device**: `jnp.fft.fftn` of the whole field on one device.

Measured: per-device temporaries and collectives from the compiled programs
(XLA's `memory_analysis()` and HLO text), and times (medians of interleaved
rounds). Goals: eqpar's per-device temporaries at most 3x the local block, and
faster than the all-gathering program at every size. Simulated CPU devices share
this machine's cores, so the times compare the programs' work and data movement on
one host, not a multi-GPU speedup.
"""

import functools
import statistics
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import eqpar

from ._common import (
    blocking,
    collectives,
    Goal,
    interleaved,
    ratio_goal,
    Result,
    table,
)


PROGRAMS = ("eqpar.fft", "jnp.fft (XLA)", "one device")


def _field(size: int) -> np.ndarray:
    rng = np.random.default_rng(size)
    return (
        rng.standard_normal((size, size)) + 1j * rng.standard_normal((size, size))
    ).astype(np.complex64)


def measure(size: int, calls: int, rounds: int) -> dict[str, Any]:
    n = jax.device_count()
    mesh = jax.make_mesh((n,), ("d",), axis_types=(AxisType.Auto,))
    rows = NamedSharding(mesh, P("d"))
    host = _field(size)
    x = jax.device_put(host, rows)
    x1 = jax.device_put(host, jax.devices()[0])
    with jax.set_mesh(mesh):
        programs = {
            "eqpar.fft": jax.jit(functools.partial(eqpar.fft.fftn, spec=P("d")))
            .lower(x)
            .compile(),
            "jnp.fft (XLA)": jax.jit(jnp.fft.fftn, out_shardings=rows)
            .lower(x)
            .compile(),
        }
    programs["one device"] = jax.jit(jnp.fft.fftn).lower(x1).compile()
    inputs = {"eqpar.fft": x, "jnp.fft (XLA)": x, "one device": x1}
    reference = np.fft.fftn(host.astype(np.complex128))
    scale = float(np.abs(reference).max())
    out: dict[str, Any] = {"block": host.nbytes // n}
    for name, compiled in programs.items():
        result = np.asarray(compiled(inputs[name]))
        stats = compiled.memory_analysis()
        out[name] = {
            "temp": stats.temp_size_in_bytes,
            "argument": stats.argument_size_in_bytes,
            "collectives": collectives(compiled.as_text()),
            "error": float(np.abs(result - reference).max()) / scale,
        }
    fns = {  # each call waits for its result: compute and data movement, timed
        name: blocking(lambda c=c, a=inputs[name]: c(a)) for name, c in programs.items()
    }
    times = interleaved(
        fns,
        calls=calls,
        rounds=rounds,
        block=jax.block_until_ready,
        warmup=2,
        alternate=True,
        settle=1,
    )
    for name in programs:
        out[name]["times"] = times[name]
    return out


def _collectives_text(found: dict[str, tuple[int, int]]) -> str:
    if not found:
        return "none"
    return ", ".join(f"{c} {k} ({b / 2**20:.2f} MiB)" for k, (c, b) in found.items())


def run(quick: bool = False) -> Result:
    sizes = (32, 64) if quick else (256, 512, 1024, 2048)
    calls, rounds = (2, 2) if quick else (3, 7)
    n = jax.device_count()
    figures = {s: measure(s, calls, rounds) for s in sizes}
    rows = []
    for s, f in figures.items():
        for name in PROGRAMS:
            g = f[name]
            rows.append(
                [
                    f"{s}x{s}" if name == PROGRAMS[0] else "",
                    name,
                    f"{g['argument'] / 2**20:.3f}",
                    f"{g['temp'] / 2**20:.3f}",
                    f"{g['temp'] / f['block']:.1f}x",
                    f"{statistics.median(g['times']) * 1e3:.2f}",
                    _collectives_text(g["collectives"]),
                    f"{g['error']:.1e}",
                ]
            )
    body = (
        f"A complex64 field split by rows over {n} simulated CPU devices; per-device "
        "figures from each compiled program (the one-device program holds the whole "
        "field); times are medians of interleaved rounds.\n\n"
        + table(
            [
                "field",
                "program",
                "input per device MiB",
                "temporaries MiB",
                "temporaries / local block",
                "time ms",
                "collectives (per device results)",
                "max error / max",
            ],
            rows,
            align="llrrrrlr",
        )
    )
    goals: list[Goal] = []
    for s, f in figures.items():
        ours = f["eqpar.fft"]
        goals.append(
            Goal(
                f"{s}x{s}: eqpar.fft per-device temporaries / local block",
                "<= 3",
                ours["temp"] / f["block"],
                ours["temp"] <= 3 * f["block"],
                unit="x",
            )
        )
        goals.append(
            Goal(
                f"{s}x{s}: eqpar.fft never gathers (all-gathers in its program)",
                "0",
                ours["collectives"].get("all-gather", (0, 0))[0],
                "all-gather" not in ours["collectives"],
                unit="count",
            )
        )
        goals.append(
            ratio_goal(
                f"{s}x{s}: eqpar.fft time / jnp.fft (XLA, all-gathering) time",
                ours["times"],
                f["jnp.fft (XLA)"]["times"],
                at_most=1.0,
            )
        )

    def plot(fig: Any) -> None:
        ax1, ax2 = fig.subplots(1, 2)
        xs = list(figures)
        for name, style in zip(PROGRAMS, ("-", "--", ":")):
            ax1.plot(
                xs,
                [figures[s][name]["temp"] / 2**20 for s in xs],
                ls=style,
                marker="o",
                label=name,
            )
            ax2.plot(
                xs,
                [statistics.median(figures[s][name]["times"]) * 1e3 for s in xs],
                ls=style,
                marker="o",
                label=name,
            )
        ax1.plot(
            xs,
            [3 * figures[s]["block"] / 2**20 for s in xs],
            color="grey",
            lw=0.8,
            label="3x local block",
        )
        for ax, label in ((ax1, "temporaries per device (MiB)"), (ax2, "time (ms)")):
            ax.set(
                xscale="log", yscale="log", xlabel="field side S (S x S)", ylabel=label
            )
            ax.set_xticks(xs, [str(s) for s in xs])
            ax.tick_params(axis="x", which="minor", labelbottom=False)
        ax1.legend(fontsize=7)
        ax1.set_title(f"FFT of a field split by rows over {n} devices", fontsize=9)

    return Result("fft", "distributed FFTs against XLA's all-gather", body, goals, plot)
