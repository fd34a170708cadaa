"""Memory of a function on a grid: meshgrid vs nested `filter_vmap` vs `chunk_size`.

f(x, y) = cos(x^2 + y^2) / (1 + x^2 + y^2) on the grid x[i], y[j], reduced over y
for every x: out[i] = max_j f(x[i], y[j]). The reduction keeps XLA from fusing the
grid into the output: each row of f is a real intermediate, so the unchunked
programs hold the whole n x m grid, and a chunked map holds k rows of it. The
mapped axis is x (n points); y has a fixed m points, so one row is m floats.

- meshgrid: `jnp.meshgrid(x, y, indexing="ij")`, f on the grids, `max(axis=1)`;
- nested `eqpar.filter_vmap`: inner map over y, a `max`, outer map over x;
- `eqpar.filter_vmap(..., chunk_size=k)`: the outer map k rows at a time.

Measured with the compiled program's `memory_analysis()` (nothing is run at the
large sizes): temporaries, arguments and outputs; "peak" is their sum (an upper
bound: XLA may alias). Goal: the chunked program's temporaries scale with k, not
with n.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

import eqpar

from ._common import Goal, Result, table


def f(x: Float[Array, "*s"], y: Float[Array, "*s"]) -> Float[Array, "*s"]:
    r2 = x**2 + y**2
    return jnp.cos(r2) / (1 + r2)


def meshgrid(x: Float[Array, " n"], y: Float[Array, " m"]) -> Float[Array, " n"]:
    xm, ym = jnp.meshgrid(x, y, indexing="ij")
    return jnp.max(f(xm, ym), axis=1)


def row_max(x: Float[Array, ""], y: Float[Array, " m"]) -> Float[Array, ""]:
    return jnp.max(eqpar.filter_vmap(f, in_axes=(None, 0))(x, y))


def nested(chunk: int | None = None) -> Callable[..., Any]:
    return eqpar.filter_vmap(row_max, in_axes=(0, None), chunk_size=chunk)


def analyse(fn: Callable[..., Any], n: int, m: int) -> dict[str, int]:
    x = jax.ShapeDtypeStruct((n,), jnp.float32)
    y = jax.ShapeDtypeStruct((m,), jnp.float32)
    a = jax.jit(fn).lower(x, y).compile().memory_analysis()
    row = {
        "temp": int(a.temp_size_in_bytes),
        "argument": int(a.argument_size_in_bytes),
        "output": int(a.output_size_in_bytes),
    }
    row["peak"] = row["temp"] + row["argument"] + row["output"]
    return row


def mb(b: int) -> str:
    return f"{b / 2**20:.2f}"


def run(quick: bool = False) -> Result:
    m = 2048
    ns = (1024, 4096, 16384) if quick else (1024, 4096, 16384, 65536)
    ks = (16, 64, 256) if quick else (16, 64, 256, 1024)
    k0, n0 = 64, ns[-1]
    row_bytes = m * 4

    # Same answers first, on a grid small enough to run (k does not divide n).
    x = jnp.linspace(-3.0, 3.0, 300)
    y = jnp.linspace(-2.0, 2.5, 257)
    ref = np.max(
        np.cos(np.add.outer(np.asarray(x) ** 2, np.asarray(y) ** 2))
        / (1 + np.add.outer(np.asarray(x) ** 2, np.asarray(y) ** 2)),
        axis=1,
    )
    for fn in (meshgrid, nested(), nested(64)):
        np.testing.assert_allclose(
            np.asarray(jax.jit(fn)(x, y)), ref, rtol=1e-5, atol=1e-6
        )

    variants = {
        "meshgrid": lambda k: meshgrid,
        "nested filter_vmap": lambda k: nested(),
        "filter_vmap(chunk_size=k)": lambda k: nested(k),
    }
    over_n = {
        v: {n: analyse(make(k0), n, m) for n in ns} for v, make in variants.items()
    }
    over_k = {k: analyse(nested(k), n0, m) for k in ks}

    rows = []
    for v, by_n in over_n.items():
        for n in ns:
            a = by_n[n]
            rows.append(
                [
                    v,
                    str(n),
                    mb(a["temp"]),
                    mb(a["argument"]),
                    mb(a["output"]),
                    mb(a["peak"]),
                    f"{a['temp'] / (n * row_bytes):.2f}",
                ]
            )
    t_n = table(
        [
            "program",
            "n (x points)",
            "temp MiB",
            "argument MiB",
            "output MiB",
            "peak MiB",
            "temp / grid (n x m x 4 B)",
        ],
        rows,
    )
    rows_k = []
    for k in ks:
        a = over_k[k]
        rows_k.append(
            [
                str(k),
                mb(a["temp"]),
                mb(a["peak"]),
                f"{a['temp'] / (k * row_bytes):.2f}",
            ]
        )
    t_k = table(
        ["k (chunk_size)", "temp MiB", "peak MiB", "temp / chunk (k x m x 4 B)"], rows_k
    )

    chunked = over_n["filter_vmap(chunk_size=k)"]
    mesh_n = over_n["meshgrid"]
    growth_n = chunked[ns[-1]]["temp"] / chunked[ns[0]]["temp"]
    mesh_growth = mesh_n[ns[-1]]["temp"] / mesh_n[ns[0]]["temp"]
    growth_k = over_k[ks[-1]]["temp"] / over_k[ks[0]]["temp"]
    k_ratio = ks[-1] / ks[0]
    goals = [
        Goal(
            f"chunked temporaries, n {ns[0]} -> {ns[-1]} ({ns[-1] // ns[0]}x) at "
            f"k = {k0}: temp({ns[-1]}) / temp({ns[0]}) (meshgrid: {mesh_growth:.1f}x)",
            "<= 1.1x (independent of n)",
            growth_n,
            growth_n <= 1.1,
        ),
        Goal(
            f"chunked temporaries, k {ks[0]} -> {ks[-1]} at n = {n0}: "
            f"(temp({ks[-1]}) / temp({ks[0]})) / ({ks[-1]} / {ks[0]}) "
            f"(temp grew {growth_k:.1f}x)",
            "within 25% of 1 (proportional to k)",
            growth_k / k_ratio,
            abs(growth_k / k_ratio - 1) <= 0.25,
        ),
        Goal(
            f"chunked temporaries at n = {n0}, k = {k0} against the unchunked "
            "nested filter_vmap",
            f"<= {2 * k0 / n0:.3g}x (about k / n)",
            chunked[n0]["temp"] / over_n["nested filter_vmap"][n0]["temp"],
            chunked[n0]["temp"] / over_n["nested filter_vmap"][n0]["temp"]
            <= 2 * k0 / n0,
        ),
    ]

    def plot(fig: Any) -> None:
        ax1, ax2 = fig.subplots(1, 2)
        for (v, by_n), style in zip(over_n.items(), ("-", "--", "-")):
            temps = [by_n[n]["temp"] / 2**20 for n in ns]
            ax1.plot(ns, temps, ls=style, marker="o", label=v)
        ax1.set_xscale("log", base=2)
        ax1.set_yscale("log")
        ax1.set_xlabel(f"n (x points; m = {m}, k = {k0})")
        ax1.set_ylabel("compiled temporaries, MiB")
        ax1.legend(fontsize=7)
        ax2.plot(
            ks, [over_k[k]["temp"] / 2**20 for k in ks], marker="o", label="chunked"
        )
        ax2.plot(
            ks,
            [over_k[ks[0]]["temp"] / 2**20 * k / ks[0] for k in ks],
            ls=":",
            color="grey",
            label="proportional to k",
        )
        ax2.set_xscale("log", base=2)
        ax2.set_yscale("log")
        ax2.set_xlabel(f"k (chunk_size; n = {n0})")
        ax2.legend(fontsize=7)

    body = (
        f"m = {m} y points (one row = {row_bytes // 1024} KiB), float32. Values "
        "checked against NumPy on a 300 x 257 grid with k = 64 (k not dividing n). "
        "Unchunked, XLA materialises the grid (about 1-2 grids of temporaries); "
        "chunked, about two chunks of k rows whatever n is.\n\n"
        f"#### Over n, at k = {k0}\n\n{t_n}\n\n#### Over k, at n = {n0}\n\n{t_k}"
    )
    return Result(
        "memory",
        "grid memory: meshgrid vs nested vs chunked filter_vmap",
        body,
        goals,
        plot,
    )
