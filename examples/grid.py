"""A function on a grid: Python loops, meshgrid, nested vmap, chunked vmap.

    python examples/grid.py --devices 8 [--n 6000 --loop-n 80 --chunk 500 --budget 36]

After QuantEcon's lecture on loops vs meshgrid vs vmap, for
f(x, y) = cos(x^2 + y^2) / (1 + x^2 + y^2) on a grid z[i, j] = f(x[i], y[j]):

(a) a pure-Python double loop (on the small `--loop-n` grid only);
(b) `jnp.meshgrid(x, y, indexing="ij")` and f on the two n x n grids;
(c) nested `eqpar.filter_vmap`: inner over y (`in_axes=(None, 0)`), outer over x
    (`in_axes=(0, None)`): f is written for scalars and sees flat vectors only;
(d) the same with the outer map chunked (`chunk_size=--chunk` rows at a time);
(e) max_y f(x, y) for every x, reducing each row as it is computed;
(f) (e) under a stated memory budget (`--budget` MB; default a quarter of the
    n x n grid) that the unchunked map exceeds: `chunk_size="auto"` picks the
    largest chunk whose compiled temporaries fit it, and prints the chunk chosen
    and the temporaries measured.

All agree on the small grid and on a non-square, non-symmetric one (a transposed
result would not match). For n = `--n` the program times (b)-(e) and reads the
compiled programs' memory (`jax.jit(...).lower(...).compile().memory_analysis()`).
What it shows: the meshgrid *inputs* alone are 2 n^2 x 4 bytes (288 MB for
n = 6000) against 2 n x 4 bytes (48 KB) for the flat vectors; once inside one
compiled program XLA fuses the broadcasts and f into the output, so (b), (c) and
(d) all need just the n^2 output (chunking cannot shrink an output that is itself
n x n). Chunking pays off when the n x n array is an intermediate, as in the
reduction (e): unchunked, XLA materialises the whole grid; chunked, only `--chunk`
rows of it are alive at a time.
"""

import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from _common import (
    out_dir,
    parser,
    rel_diff,
    report,
    save_figure,
    setup_devices,
    timed,
)
from jaxtyping import Array, Float

import eqpar


# ---------------------------------------------------------------------------------
# The function, and the ways of putting it on a grid.


def f(x: Float[Array, "*shape"], y: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    """cos(x^2 + y^2) / (1 + x^2 + y^2), elementwise (scalars or equal shapes)."""
    r2 = x**2 + y**2
    return jnp.cos(r2) / (1 + r2)


def f_python(x: float, y: float) -> float:
    r2 = x * x + y * y
    return math.cos(r2) / (1.0 + r2)


def grid_loops(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(a) The pure-Python double loop: z[i, j] = f(x[i], y[j])."""
    xs, ys = [float(v) for v in x], [float(v) for v in y]
    z = np.empty((len(xs), len(ys)), dtype=np.float64)
    for i, xi in enumerate(xs):
        for j, yj in enumerate(ys):
            z[i, j] = f_python(xi, yj)
    return z


def make_grids(
    x: Float[Array, " nx"], y: Float[Array, " ny"]
) -> tuple[Float[Array, "nx ny"], Float[Array, "nx ny"]]:
    """The two n x n meshgrid inputs ("ij" indexing, so z[i, j] = f(x[i], y[j]);
    numpy's default "xy" indexing would give the transpose)."""
    xm, ym = jnp.meshgrid(x, y, indexing="ij")
    return xm, ym


def grid_meshgrid(
    x: Float[Array, " nx"], y: Float[Array, " ny"]
) -> Float[Array, "nx ny"]:
    """(b) meshgrid inside one program (XLA is free to fuse the broadcasts)."""
    return f(*make_grids(x, y))


# (c) nested filter_vmap: f only ever sees two scalars.
grid_vmap = eqpar.filter_vmap(
    eqpar.filter_vmap(f, in_axes=(None, 0)),  # over y, x broadcast: one row
    in_axes=(0, None),  # over x, y broadcast: the rows
)


def grid_chunked(chunk: int) -> Callable[..., Any]:
    """(d) the rows `chunk` at a time (`lax.map` over vmapped chunks)."""
    return eqpar.filter_vmap(
        eqpar.filter_vmap(f, in_axes=(None, 0)), in_axes=(0, None), chunk_size=chunk
    )


def row_max(x: Float[Array, ""], y: Float[Array, " ny"]) -> Float[Array, ""]:
    """max_j f(x, y[j]): one row of the grid, reduced."""
    return jnp.max(eqpar.filter_vmap(f, in_axes=(None, 0))(x, y))


def max_over_y(chunk: int | None) -> Callable[..., Any]:
    """(e) max_y f(x, y) for each x; with `chunk`, only `chunk` rows at a time."""
    return eqpar.filter_vmap(row_max, in_axes=(0, None), chunk_size=chunk)


def max_over_y_within(budget: int) -> Callable[..., Any]:
    """(f) (e) with the chunk chosen from a memory budget in bytes."""
    return eqpar.filter_vmap(
        row_max, in_axes=(0, None), chunk_size="auto", memory_budget=budget
    )


def max_over_y_meshgrid(
    x: Float[Array, " nx"], y: Float[Array, " ny"]
) -> Float[Array, " nx"]:
    """(e) the textbook way: the whole grid, then its max along y."""
    return jnp.max(grid_meshgrid(x, y), axis=1)


# ---------------------------------------------------------------------------------
# Memory arithmetic and measurement.


def input_bytes(n: int, itemsize: int = 4) -> tuple[int, int]:
    """(meshgrid inputs, flat inputs) in bytes for an n x n grid: the two n x n grids
    against the two length-n vectors."""
    return 2 * n * n * itemsize, 2 * n * itemsize


def fmt_bytes(b: int) -> str:
    """Decimal units, as in "288 MB" and "48 KB"."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if b >= scale:
            value = b / scale
            return f"{value:.0f} {unit}" if value >= 10 else f"{value:.1f} {unit}"
    return f"{b} B"


def compiled_memory(fn: Callable[..., Any], *args: Any) -> dict[str, int]:
    """Bytes of the arguments, outputs and temporaries of `fn` compiled for `args`;
    `peak` is their sum (an upper bound: XLA may alias buffers)."""
    m = jax.jit(fn).lower(*args).compile().memory_analysis()
    row = {
        "argument": int(m.argument_size_in_bytes),
        "temp": int(m.temp_size_in_bytes),
        "output": int(m.output_size_in_bytes),
    }
    row["peak"] = row["argument"] + row["temp"] + row["output"]
    return row


def _close(a: Any, b: Any, tol: float = 1e-5) -> bool:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=tol, atol=tol))


# ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=6000, help="grid size for timing/memory")
    p.add_argument("--loop-n", type=int, default=80, help="grid size for Python loops")
    p.add_argument("--chunk", type=int, default=500, help="rows per chunk")
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="memory budget for (f) in MB (default: a quarter of the n x n grid)",
    )
    args = p.parse_args(argv)
    devices = setup_devices(args.devices)
    n, loop_n, chunk = args.n, args.loop_n, args.chunk
    device = devices[0]  # a single-device example: everything on the first
    print(f"grid: f(x, y) = cos(x^2+y^2)/(1+x^2+y^2), on {device} (float32)")

    def vec(lo: float, hi: float, size: int) -> Float[Array, " size"]:
        return jax.device_put(jnp.linspace(lo, hi, size, dtype=jnp.float32), device)

    checks: dict[str, bool] = {}
    small_chunk = max(1, min(chunk, loop_n // 3))  # so that the check really chunks

    # Agreement on small grids: a square one, and a non-square, non-symmetric one.
    agree: dict[str, dict[str, bool]] = {}
    loop_time = 0.0
    for label, (xs, ys) in {
        "square": (vec(-3.0, 3.0, loop_n), vec(-3.0, 3.0, loop_n)),
        "non-symmetric": (vec(-3.0, 2.0, loop_n), vec(-1.0, 4.0, loop_n + 7)),
    }.items():
        t0 = time.perf_counter()
        z_loop = grid_loops(np.asarray(xs), np.asarray(ys))
        if label == "square":
            loop_time = time.perf_counter() - t0
        full_max = z_loop.max(axis=1)
        agree[label] = {
            "meshgrid": _close(f(*make_grids(xs, ys)), z_loop),
            "nested filter_vmap": _close(grid_vmap(xs, ys), z_loop),
            f"chunked (chunk={small_chunk})": _close(
                grid_chunked(small_chunk)(xs, ys), z_loop
            ),
            "max_y unchunked": _close(max_over_y(None)(xs, ys), full_max),
            f"max_y chunked (chunk={small_chunk})": _close(
                max_over_y(small_chunk)(xs, ys), full_max
            ),
        }
        shape = f"{len(xs)}x{len(ys)}"
        for method, ok in agree[label].items():
            checks[f"{method} == Python loops ({label} {shape} grid)"] = ok
    print(
        f"\n(a) Python loops, {loop_n}x{loop_n}: {loop_time * 1e3:.1f} ms "
        f"({loop_time / loop_n**2 * 1e6:.2f} us/point; "
        f"~{loop_time * (n / loop_n) ** 2:.1f} s extrapolated to {n}x{n})"
    )
    print(
        f"    (b)-(e) agree with the loops on the {loop_n}x{loop_n} grid and on a "
        f"{loop_n}x{loop_n + 7} grid with different x and y ranges: "
        f"{all(all(v.values()) for v in agree.values())}"
    )

    # Timing and memory at size n ------------------------------------------------------
    x, y = vec(-3.0, 3.0, n), vec(-3.0, 3.0, n)
    mesh_in, flat_in = input_bytes(n)
    print(
        f"\nn = {n}: meshgrid inputs 2*n*n*4 = {fmt_bytes(mesh_in)}, flat inputs "
        f"2*n*4 = {fmt_bytes(flat_in)}, the grid itself n*n*4 = {fmt_bytes(n * n * 4)}"
    )
    f_jit = jax.jit(f)
    chunked, max_full, max_chunked = (
        grid_chunked(chunk),
        max_over_y(None),
        max_over_y(chunk),
    )
    xm, ym = make_grids(x, y)
    memory = {
        "(b) meshgrid, grids built first": compiled_memory(f, xm, ym),
        "(b) meshgrid inside jit": compiled_memory(grid_meshgrid, x, y),
        "(c) nested filter_vmap": compiled_memory(grid_vmap, x, y),
        f"(d) filter_vmap chunk={chunk}": compiled_memory(chunked, x, y),
        "(e) max_y, meshgrid then max": compiled_memory(max_over_y_meshgrid, x, y),
        "(e) max_y, filter_vmap": compiled_memory(max_full, x, y),
        f"(e) max_y, filter_vmap chunk={chunk}": compiled_memory(max_chunked, x, y),
    }
    del xm, ym
    z_mesh, t_mesh = timed(lambda: f_jit(*make_grids(x, y)))
    del z_mesh
    z_vmap, t_vmap = timed(lambda: grid_vmap(x, y))
    z_chunk, t_chunk = timed(lambda: chunked(x, y))
    m_full, t_max_full = timed(lambda: max_full(x, y))
    m_chunk, t_max_chunk = timed(lambda: max_chunked(x, y))
    times = {
        "(b) meshgrid, grids built first": t_mesh,
        "(b) meshgrid inside jit": timed(lambda: grid_meshgrid(x, y))[1],
        "(c) nested filter_vmap": t_vmap,
        f"(d) filter_vmap chunk={chunk}": t_chunk,
        "(e) max_y, meshgrid then max": timed(lambda: max_over_y_meshgrid(x, y))[1],
        "(e) max_y, filter_vmap": t_max_full,
        f"(e) max_y, filter_vmap chunk={chunk}": t_max_chunk,
    }
    print(
        f"\n{'':38s} {'time':>8s} {'arguments':>10s} {'temps':>10s} "
        f"{'output':>10s} {'sum':>10s}"
    )
    for name, row in memory.items():
        print(
            f"{name:38s} {times[name] * 1e3:6.1f}ms "
            + " ".join(
                f"{fmt_bytes(row[k]):>10s}"
                for k in ("argument", "temp", "output", "peak")
            )
        )
    print(
        "  (b) as in the lecture passes the two n x n grids in; under one jit, XLA"
        "\n  fuses meshgrid, f and the loops, so (b), (c) and (d) all cost one n x n"
        "\n  output. In the reduction (e) the grid is an intermediate: only chunking"
        "\n  bounds it."
    )

    rows_full = memory["(e) max_y, filter_vmap"]["temp"]
    rows_chunk = memory[f"(e) max_y, filter_vmap chunk={chunk}"]["temp"]
    checks["(b) == (c) == (d) at n"] = (
        rel_diff(z_vmap, z_chunk) < 1e-6
        and rel_diff(f_jit(*make_grids(x, y)), z_vmap) < 1e-5
    )
    checks["(e) chunked == unchunked == max of the grid, at n"] = (
        rel_diff(m_chunk, m_full) < 1e-6
        and rel_diff(m_chunk, jnp.max(z_vmap, 1)) < 1e-6
    )
    checks["meshgrid inputs are 2*n*n*4 bytes"] = (
        memory["(b) meshgrid, grids built first"]["argument"] == mesh_in
    )
    checks["flat inputs are 2*n*4 bytes"] = (
        memory["(c) nested filter_vmap"]["argument"] == flat_in
    )
    checks["(e) chunked temps < n*n*4 bytes (never the whole grid)"] = (
        chunk >= n or rows_chunk < n * n * 4
    )
    checks["(e) chunked temps < unchunked temps"] = chunk >= n or rows_chunk < rows_full
    print(
        f"(e) temps: {fmt_bytes(rows_chunk)} chunked vs {fmt_bytes(rows_full)} "
        f"unchunked ({rows_chunk / max(rows_full, 1):.2f}x; "
        f"{rows_chunk / max(min(chunk, n) * n * 4, 1):.1f} x chunk*n*4 bytes)"
    )

    # (f) The reduction under a memory budget it does not fit unchunked ------------
    budget = int(args.budget * 1e6) if args.budget else n * n * 4 // 4
    within = max_over_y_within(budget)
    chosen = eqpar.chosen_chunk_size(within, x, y)
    auto_memory = compiled_memory(within, x, y)
    m_auto, t_auto = timed(lambda: within(x, y))
    print(
        f"\n(f) memory budget {fmt_bytes(budget)}: unchunked (e) needs "
        f"{fmt_bytes(rows_full)} of temporaries; chunk_size='auto' chose {chosen} "
        f"rows per chunk: {fmt_bytes(auto_memory['temp'])} of temporaries (peak "
        f"with arguments and output {fmt_bytes(auto_memory['peak'])}), "
        f"{t_auto * 1e3:.1f} ms vs {t_max_full * 1e3:.1f} ms unchunked"
    )
    checks["(f) unchunked (e) exceeds the budget"] = rows_full > budget
    checks["(f) chunk_size='auto' temps within the budget"] = (
        auto_memory["temp"] <= budget
    )
    checks["(f) chunk_size='auto' == unchunked"] = rel_diff(m_auto, m_full) < 1e-6

    # PNG: the function on a coarse view of the grid, and the memory per method.
    png = _plot(out_dir(args.out), np.asarray(z_vmap), n, memory)
    if png:
        print(f"\nwrote {png}")
    report(checks)
    return {
        "n": n,
        "loop_n": loop_n,
        "chunk": chunk,
        "agree": agree,
        "input_bytes": {"meshgrid": mesh_in, "flat": flat_in},
        "auto": {
            "budget": budget,
            "chunk": chosen,
            "memory": auto_memory,
            "time": t_auto,
        },
        "memory": memory,
        "times": {"(a) Python loops": loop_time, **times},
        "checks": checks,
    }


def _plot(out: Any, z: np.ndarray, n: int, memory: dict[str, dict[str, int]]) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no PNG)")
        return ""
    step = max(1, n // 300)
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.5))
    im = ax0.imshow(
        z[::step, ::step].T, origin="lower", extent=(-3, 3, -3, 3), cmap="RdBu_r"
    )
    fig.colorbar(im, ax=ax0)
    ax0.set(xlabel="x", ylabel="y", title=f"f(x, y), {n}x{n} grid")
    names = list(memory)
    bottom = np.zeros(len(names))
    for kind in ("argument", "temp", "output"):
        values = np.array([memory[k][kind] for k in names]) / 1e6
        ax1.barh(names, values, left=bottom, label=kind)
        bottom += values
    ax1.invert_yaxis()
    ax1.set(xlabel="MB (compiled program)", title="memory by method")
    ax1.legend()
    fig.tight_layout()
    path = out / "grid.png"
    saved = save_figure(fig, path, dpi=100)
    return str(saved)


if __name__ == "__main__":
    raise SystemExit(0 if all(main()["checks"].values()) else 1)
