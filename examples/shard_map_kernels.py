"""Custom kernels with `eqpar.filter_shard_map`: ring matmul, halo-exchange stencils.

    python examples/shard_map_kernels.py --devices 8 [--size 512 --iters 20]

(a) A ring all-gather matmul C = A @ B with A and B both sharded by rows over a 1-D
    mesh: each device multiplies the B block it holds by the matching columns of
    its A rows, then passes the block on with `eqpar.ring_shift`. No device ever
    holds all of B (an all-gather version is timed beside it for contrast).
(b) Diffusion on a 2-D field sharded over a 2-D ("rows", "cols") mesh: a 5-point
    Laplacian stencil, iterated, with the neighbours' edges fetched by
    `eqpar.halo_exchange` along each mesh axis; periodic and zero boundaries, equal
    to the unsharded computation with `jnp.roll` / zero padding, edges and block
    seams included.
(c) A 1-D convolution with a 7-tap kernel (an `eqx.Module`, its kernel replicated)
    on a sharded signal, with halos of width 3; zero and periodic boundaries.
"""

import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from _common import finish, parser, rel_diff, setup_devices, timed
from jax.sharding import Mesh, PartitionSpec as P
from jaxtyping import Array, Float

import eqpar


def used_devices(x: Array) -> list[int]:
    return sorted(d.id for d in x.sharding.device_set)


# ---------------------------------------------------------------- (a) ring matmul


def ring_matmul_block(
    a_rows: Float[Array, "m k"], b_rows: Float[Array, "kb n"]
) -> Float[Array, "m n"]:
    """One device's rows of A @ B, from its rows of A and a ring of B's row blocks.

    At step s device i holds B's row block (i - s) mod d, which multiplies columns
    of the same block of its A rows; the next block arrives from device i - 1 while
    this one is multiplied.
    """
    d = eqpar.axis_size("x")
    index = jax.lax.axis_index("x")
    kb = b_rows.shape[0]
    acc = jnp.zeros((a_rows.shape[0], b_rows.shape[1]), a_rows.dtype)
    block = b_rows
    for step in range(d):
        incoming = eqpar.ring_shift(block, "x") if step < d - 1 else block
        source = (index - step) % d  # whose rows of B `block` is
        a_cols = jax.lax.dynamic_slice_in_dim(a_rows, source * kb, kb, axis=1)
        acc = acc + a_cols @ block
        block = incoming
    return acc


def gather_matmul_block(
    a_rows: Float[Array, "m k"], b_rows: Float[Array, "kb n"]
) -> Float[Array, "m n"]:
    """The same with all of B gathered on every device first (for the timings)."""
    return a_rows @ eqpar.all_gather(b_rows, "x", tiled=True)


def ring_matmul(mesh: Mesh, size: int) -> dict[str, Any]:
    d = mesh.shape["x"]
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (size, size))
    b = jax.random.normal(kb, (size, size))
    specs = dict(mesh=mesh, in_specs=(P("x"), P("x")), out_specs=P("x"))
    ring = eqpar.filter_shard_map(ring_matmul_block, **specs)
    gather = eqpar.filter_shard_map(gather_matmul_block, **specs)
    dense = eqpar.filter_jit(jnp.matmul)
    a_s, b_s = eqpar.filter_device_put((a, b), P("x"), mesh=mesh)
    reference, t_dense = timed(lambda: dense(a, b))
    c, t_ring = timed(lambda: ring(a_s, b_s))
    c_gather, t_gather = timed(lambda: gather(a_s, b_s))
    err = rel_diff(c, reference)
    err_gather = rel_diff(c_gather, reference)
    program = str(jax.make_jaxpr(ring)(a_s, b_s))
    # (on one device the ring has nothing to pass)
    ring_only = ("ppermute" in program or d == 1) and "all_gather" not in program
    print(
        f"(a) ring all-gather matmul: ({size}, {size}) @ ({size}, {size}), A and B "
        f"row-sharded over {d} devices ({size // d} rows each)"
    )
    print(f"    {'':<28} {'time':>9}  rel. diff vs A @ B")
    print(f"    {'unsharded A @ B':<28} {t_dense * 1e3:7.2f} ms")
    print(f"    {'ring (ring_shift of B)':<28} {t_ring * 1e3:7.2f} ms  {err:.1e}")
    print(
        f"    {'all_gather of B, then @':<28} {t_gather * 1e3:7.2f} ms  "
        f"{err_gather:.1e}"
    )
    print(
        f"    (the {d} simulated devices share this machine's CPU cores: the "
        "times show overhead, not scaling)"
    )
    return {
        "matmul": {
            "size": size,
            "rel_err": err,
            "rel_err_gather": err_gather,
            "time_dense_s": t_dense,
            "time_ring_s": t_ring,
            "time_gather_s": t_gather,
            "devices_used": used_devices(c),
        },
        "checks": {
            "a: ring matmul equals A @ B (rel 1e-4)": err < 1e-4,
            "a: all-gather matmul equals A @ B (rel 1e-4)": err_gather < 1e-4,
            "a: the ring passes blocks (ppermute), gathers nothing": ring_only,
        },
    }


# ---------------------------------------------------------------- (b) 2-D stencil


def laplacian(ext: Float[Array, "h2 w2"]) -> Float[Array, "h w"]:
    """5-point Laplacian of the interior of a block extended by one on each side."""
    centre = ext[1:-1, 1:-1]
    return (
        ext[:-2, 1:-1] + ext[2:, 1:-1] + ext[1:-1, :-2] + ext[1:-1, 2:] - 4.0 * centre
    )


class Diffusion(eqx.Module):
    """`iters` explicit steps u <- u + rate * laplacian(u) (stable for rate <= 1/4)."""

    rate: float = eqx.field(static=True)
    iters: int = eqx.field(static=True)
    periodic: bool = eqx.field(static=True)

    def reference(self, u: Float[Array, "h w"]) -> Float[Array, "h w"]:
        """Unsharded: neighbours from `jnp.roll` (periodic) or zero padding."""

        def step(_: int, u: Float[Array, "h w"]) -> Float[Array, "h w"]:
            if self.periodic:
                up, down = jnp.roll(u, 1, axis=0), jnp.roll(u, -1, axis=0)
                left, right = jnp.roll(u, 1, axis=1), jnp.roll(u, -1, axis=1)
            else:
                padded = jnp.pad(u, 1)
                up, down = padded[:-2, 1:-1], padded[2:, 1:-1]
                left, right = padded[1:-1, :-2], padded[1:-1, 2:]
            return u + self.rate * (up + down + left + right - 4.0 * u)

        return jax.lax.fori_loop(0, self.iters, step, u)

    def block(self, u: Float[Array, "h w"]) -> Float[Array, "h w"]:
        """One device's block of the field, under `filter_shard_map`."""

        def step(_: int, u: Float[Array, "h w"]) -> Float[Array, "h w"]:
            ext = eqpar.halo_exchange(
                u, "rows", width=1, axis=0, periodic=self.periodic
            )
            ext = eqpar.halo_exchange(
                ext, "cols", width=1, axis=1, periodic=self.periodic
            )
            return u + self.rate * laplacian(ext)

        return jax.lax.fori_loop(0, self.iters, step, u)


def stencil(mesh: Mesh, size: int, iters: int) -> dict[str, Any]:
    rows, cols = mesh.shape["rows"], mesh.shape["cols"]
    h, w = size - size % rows, size - size % cols
    u0 = jax.random.normal(jax.random.key(1), (h, w))
    # Where the halos matter: the field's edges and the seams between blocks.
    r, c = np.arange(h) % (h // rows), np.arange(w) % (w // cols)
    seam = np.logical_or.outer(
        (r == 0) | (r == h // rows - 1), (c == 0) | (c == w // cols - 1)
    )
    print(
        f"\n(b) diffusion: {iters} steps of a 5-point Laplacian on a ({h}, {w}) field,"
        f" ({h // rows}, {w // cols}) blocks on a {rows} x {cols} (rows, cols) mesh"
    )
    print(
        f"    {'boundary':<10} {'rel. diff':>9} {'at edges+seams':>15} "
        f"{'unsharded':>10} {'sharded':>10}"
    )
    out: dict[str, Any] = {"mesh": (rows, cols)}
    checks: dict[str, bool] = {}
    for periodic in (False, True):
        model = Diffusion(rate=0.2, iters=iters, periodic=periodic)
        reference_fn = eqpar.filter_jit(model.reference)
        sharded_fn = eqpar.filter_shard_map(
            model.block,
            mesh=mesh,
            in_specs=P("rows", "cols"),
            out_specs=P("rows", "cols"),
        )
        u_s = eqpar.filter_device_put(u0, P("rows", "cols"), mesh=mesh)
        reference, t_ref = timed(lambda: reference_fn(u0))
        u, t_sharded = timed(lambda: sharded_fn(u_s))
        err = rel_diff(u, reference)
        err_seams = rel_diff(np.asarray(u)[seam], np.asarray(reference)[seam])
        name = "periodic" if periodic else "zero"
        print(
            f"    {name:<10} {err:9.1e} {err_seams:15.1e} {t_ref * 1e3:7.2f} ms "
            f"{t_sharded * 1e3:7.2f} ms"
        )
        out[f"stencil_{name}"] = {
            "rel_err": err,
            "rel_err_edges_seams": err_seams,
            "time_unsharded_s": t_ref,
            "time_sharded_s": t_sharded,
            "devices_used": used_devices(u),
        }
        checks[f"b: {name}-boundary stencil equals unsharded (rel 1e-5)"] = (
            err < 1e-5 and err_seams < 1e-5
        )
    return {**out, "checks": checks}


# ---------------------------------------------------------------- (c) 1-D conv


class Conv1D(eqx.Module):
    """`jnp.convolve(signal, kernel, mode="same")` on a sharded signal."""

    kernel: Float[Array, " k"]  # odd length; replicated on every device
    periodic: bool = eqx.field(static=True)

    def __call__(self, block: Float[Array, " n"]) -> Float[Array, " n"]:
        half = self.kernel.shape[0] // 2
        ext = eqpar.halo_exchange(block, "x", width=half, periodic=self.periodic)
        return jnp.convolve(ext, self.kernel, mode="valid")

    def reference(self, signal: Float[Array, " n"]) -> Float[Array, " n"]:
        if not self.periodic:
            return jnp.convolve(signal, self.kernel, mode="same")
        half = self.kernel.shape[0] // 2
        return jnp.convolve(jnp.pad(signal, half, mode="wrap"), self.kernel, "valid")


def conv1d(mesh: Mesh, size: int, taps: int = 7) -> dict[str, Any]:
    d = mesh.shape["x"]
    length = 8 * size - (8 * size) % d
    ks, kk = jax.random.split(jax.random.key(2))
    signal = jax.random.normal(ks, (length,))
    kernel = jax.random.normal(kk, (taps,))  # not symmetric: orientation matters
    print(
        f"\n(c) 1-D convolution: {taps} taps on a signal of {length}, "
        f"{length // d} per device, halos of {taps // 2}"
    )
    out: dict[str, Any] = {}
    checks: dict[str, bool] = {}
    for periodic in (False, True):
        conv = Conv1D(kernel, periodic=periodic)
        sharded = eqpar.filter_shard_map(
            conv, mesh=mesh, in_specs=P("x"), out_specs=P("x")
        )
        y = sharded(signal)
        err = rel_diff(y, eqpar.filter_jit(conv.reference)(signal))
        name = "periodic" if periodic else "zero"
        print(f"    {name:<10} rel. diff vs jnp.convolve: {err:.1e}")
        out[f"conv1d_{name}_rel_err"] = err
        checks[f"c: {name}-boundary 1-D convolution equals jnp.convolve"] = err < 1e-5
    return {**out, "checks": checks}


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=512, help="matrix and field size")
    p.add_argument("--iters", type=int, default=20, help="diffusion steps")
    args = p.parse_args(argv)
    devices = setup_devices(args.devices)
    n = len(devices)
    # A 1-D mesh for the ring and the signal; a 2-D one (1-D in effect when the
    # device count is odd) for the field. Only the devices asked for.
    line = jax.make_mesh((n,), ("x",), devices=devices)
    grid_shape = (n // 2, 2) if n % 2 == 0 else (n, 1)
    grid = jax.make_mesh(grid_shape, ("rows", "cols"), devices=devices)
    size = max(args.size - args.size % n, n)
    print(
        f"shard_map kernels on {n} {devices[0].platform.upper()} devices "
        f"(jax {jax.__version__})\n"
    )
    results: dict[str, Any] = {"devices": n, "device_ids": [d.id for d in devices]}
    checks: dict[str, bool] = {}
    t0 = time.perf_counter()
    for part in (
        lambda: ring_matmul(line, size),
        lambda: stencil(grid, args.size, args.iters),
        lambda: conv1d(line, args.size),
    ):
        out = part()
        checks.update(out.pop("checks"))
        results.update(out)
    used = {
        i
        for v in results.values()
        if isinstance(v, dict)
        for i in v.get("devices_used", [])
    }
    checks["only the devices asked for are used"] = used == set(results["device_ids"])
    return finish(results, checks, t0)


if __name__ == "__main__":
    raise SystemExit(0 if all(main()["checks"].values()) else 1)
