"""`python -m eqpar.demo`: a short tour of eqpar on simulated CPU devices.

1. A microscope: the point-spread function of 32 depth planes, the planes split
   across devices with `filter_shard_map`, imaged by a sensor that sums the planes
   locally and across devices (`sensor_sum`). Checked against one device.
2. Data-parallel training: an MLP trained with `filter_shard_map` + `grad_mean` on a
   batch that does not divide over the devices (padded, count-weighted). Checked
   against training on one device.

Run `python -m eqpar.demo --help` for the flags. The optical model here is also what
`examples/microscope.py` runs at the guide's full size. Importing this module starts
no JAX backend: `main` configures the simulated devices first.
"""

import argparse
import math
import os
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Complex, Float

import eqpar


# ---------------------------------------------------------------- the microscope


class Microscope(eqx.Module):
    """A widefield microscope: a point at depth z, a pupil with an NA cutoff and a
    (trainable) phase mask, and a lens that Fourier-transforms the pupil field."""

    phase: Float[Array, "h w"]
    size: int = eqx.field(static=True)
    spacing: float = eqx.field(static=True)  # µm per pixel in the pupil plane
    wavelength: float = eqx.field(static=True)  # µm
    n: float = eqx.field(static=True)  # refractive index
    na: float = eqx.field(static=True)

    def pupil(self, z: Float[Array, ""]) -> Complex[Array, "h w"]:
        f = jnp.fft.fftfreq(self.size, d=self.spacing)  # spatial frequencies, 1/µm
        fx, fy = jnp.meshgrid(f, f, indexing="ij")
        rho2 = (fx**2 + fy**2) * self.wavelength**2
        inside = rho2 <= self.na**2  # |f| <= NA / wavelength
        kz = (
            2
            * jnp.pi
            * self.n
            / self.wavelength
            * jnp.sqrt(jnp.clip(1.0 - rho2 / self.n**2, 0.0, None))
        )
        angle = kz * z + self.phase
        field = jax.lax.complex(jnp.cos(angle), jnp.sin(angle))
        return jnp.where(inside, field, jnp.zeros_like(field))

    def psf(self, z: Float[Array, ""]) -> Float[Array, "h w"]:
        field = jnp.fft.fftshift(jnp.fft.ifft2(self.pupil(z)))
        intensity = jnp.abs(field) ** 2
        return intensity / self.size**2


def make_microscope(size: int) -> Microscope:
    return Microscope(
        phase=jnp.zeros((size, size)),
        size=size,
        spacing=0.3,
        wavelength=0.532,
        n=1.33,
        na=0.8,
    )


def image(
    scope: Microscope,
    volume: Float[Array, "p h w"],
    zs: Float[Array, " p"],
    axis_name: str | None = None,
) -> Float[Array, "h w"]:
    """Each plane convolved with its PSF (via FFT), then the sensor: summed over the
    local planes and, with `axis_name`, over the devices holding the other planes."""
    psfs = jax.vmap(scope.psf)(zs)
    blurred = jnp.real(
        jnp.fft.ifft2(
            jnp.fft.fft2(volume) * jnp.fft.fft2(jnp.fft.ifftshift(psfs, axes=(-2, -1)))
        )
    )
    return eqpar.sensor_sum(blurred, axis=0, axis_name=axis_name)


def psf_programs(mesh: Any) -> tuple[Callable, Callable]:
    """`(single, sharded)`: the PSF over depths `z` on one device, and with the
    depths split over `mesh`'s `"planes"` axis. Both take `(scope, z)`."""
    single = eqpar.filter_jit(lambda s, z: jax.vmap(s.psf)(z))
    sharded = eqpar.filter_shard_map(
        lambda s, z: jax.vmap(s.psf)(z),
        mesh=mesh,
        in_specs=(P(), P("planes")),
        out_specs=P("planes"),
    )
    return single, sharded


def image_programs(mesh: Any) -> tuple[Callable, Callable]:
    """`(single, sharded)`: `image` on one device, and with the planes split over
    `mesh`'s `"planes"` axis. Both take `(scope, volume, z)`; the sharded one returns
    every device's image, stacked `(devices, h, w)`, to show they are identical."""
    single = eqpar.filter_jit(image)
    sharded = eqpar.filter_shard_map(
        lambda s, v, z: image(s, v, z, axis_name="planes")[None],
        mesh=mesh,
        in_specs=(P(), P("planes"), P("planes")),
        out_specs=P("planes"),
    )
    return single, sharded


# ---------------------------------------------------------------- training


def loss_fn(
    model: eqx.nn.MLP, x: Float[Array, "b i"], y: Float[Array, "b o"], mask: Any
) -> Float[Array, ""]:
    err = jnp.sum((jax.vmap(model)(x) - y) ** 2, axis=-1)
    count = jnp.maximum(jnp.sum(mask, dtype=jnp.float32), 1.0)
    return jnp.sum(jnp.where(mask, err, 0.0)) / count


def train(
    step: Callable, model: eqx.nn.MLP, opt_state: Any, steps: int, progress: bool
) -> tuple[eqx.nn.MLP, list[float]]:
    losses = []
    bar = _progress(steps) if progress else None
    for _ in range(steps):
        model, opt_state, loss = step(model, opt_state)
        losses.append(float(loss))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    if bar is not None:
        bar.close()
    return model, losses


class _Bar:
    def __init__(self, total: int):
        self.total, self.n, self.post = total, 0, ""

    def update(self, k: int) -> None:
        self.n += k
        done = int(30 * self.n / self.total)
        print(
            f"\r  training [{'#' * done}{'.' * (30 - done)}] {self.n}/{self.total} "
            f"{self.post}",
            end="",
            flush=True,
        )

    def set_postfix(self, **kw: str) -> None:
        self.post = " ".join(f"{k}={v}" for k, v in kw.items())

    def close(self) -> None:
        print()


def _progress(total: int) -> Any:
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc="  training", ncols=80)
    except ImportError:
        return _Bar(total)


def _rel(a: Any, b: Any) -> float:
    """Largest difference relative to the reference's largest magnitude."""
    return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))


def _timed(fn: Callable[[], Any], repeat: int = 3) -> tuple[Any, float]:
    out = jax.block_until_ready(fn())  # compile
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return out, best


def run(args: argparse.Namespace) -> int:
    """The tour; returns the exit status (0 when everything matched one device)."""
    n = jax.device_count()
    print(
        f"eqpar demo on {n} {jax.devices()[0].platform.upper()} devices "
        f"(jax {jax.__version__})\n"
    )
    rows = []
    out_dir = pathlib.Path(args.out)

    # 1. microscope --------------------------------------------------------------
    planes = args.planes - args.planes % n or n
    print(
        f"[1/2] microscope: {planes} planes of {args.size}x{args.size}, split over "
        f"{n} devices"
    )
    scope = make_microscope(args.size)
    zs = jnp.linspace(-4.0, 4.0, planes)
    key = jax.random.key(0)
    volume = jax.random.uniform(key, (planes, args.size, args.size)) ** 8
    mesh = jax.make_mesh((n,), ("planes",))

    single_psf, sharded_psf = psf_programs(mesh)
    psf1, t_psf1 = _timed(lambda: single_psf(scope, zs))
    psfn, t_psfn = _timed(lambda: sharded_psf(scope, zs))
    rows.append(("PSF over planes", _rel(psfn, psf1), t_psf1, t_psfn))

    single_image, sharded_image = image_programs(mesh)
    img1, t_img1 = _timed(lambda: single_image(scope, volume, zs))
    images, t_imgn = _timed(lambda: sharded_image(scope, volume, zs))
    imgn = np.asarray(images)
    if not (imgn == imgn[:1]).all():
        print("  the devices' images differ!")
        imgn = imgn + np.inf
    imgn = imgn[0]
    rows.append(("image (sensor_sum)", _rel(imgn, img1), t_img1, t_imgn))
    _save_pngs(out_dir, np.asarray(psf1), np.asarray(img1))

    # 2. data-parallel training ---------------------------------------------------
    examples = 37
    print(
        f"[2/2] data-parallel training: {examples} examples over {n} devices "
        f"(padded to {math.ceil(examples / n) * n})"
    )
    kx, km = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (examples, 4))
    y = jnp.stack([jnp.sin(x[:, 0]) + x[:, 1] * x[:, 2], jnp.cos(x[:, 3])], axis=1)
    model0 = eqx.nn.MLP(4, 2, 32, 2, key=km)
    optimiser = optax.adam(1e-2)
    pad = (-examples) % n
    xp = jnp.pad(x, ((0, pad), (0, 0)))
    yp = jnp.pad(y, ((0, pad), (0, 0)))
    mask = jnp.arange(examples + pad) < examples

    @eqpar.filter_jit
    def single_step(model, opt_state):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(
            model, x, y, jnp.ones(examples, bool)
        )
        updates, opt_state = optimiser.update(grads, opt_state, model)
        return eqx.apply_updates(model, updates), opt_state, loss

    def per_device(model, opt_state, x, y, mask):
        # Per-device parameters (pcast to varying): local gradients, weighted by count.
        local = eqpar.mark_varying(model, "data")
        loss, grads = eqx.filter_value_and_grad(loss_fn)(local, x, y, mask)
        count = jnp.sum(mask)
        grads = eqpar.grad_mean(grads, "data", count=count)
        loss = eqpar.psum(loss * count, "data") / eqpar.psum(count, "data")
        updates, opt_state = optimiser.update(grads, opt_state, model)
        return eqx.apply_updates(model, updates), opt_state, loss

    sharded = eqpar.filter_shard_map(
        per_device,
        mesh=jax.make_mesh((n,), ("data",)),
        in_specs=(P(), P(), P("data"), P("data"), P("data")),
        out_specs=P(),
    )

    def parallel_step(model, opt_state):
        return sharded(model, opt_state, xp, yp, mask)

    params0 = eqx.filter(model0, eqx.is_inexact_array)
    for step in (single_step, parallel_step):  # compile outside the timings
        # Twice: the second call sees inputs placed by the first (outputs live on
        # the mesh), a new input sharding that jit compiles for once more.
        warm_model, warm_state, _ = step(model0, optimiser.init(params0))
        jax.block_until_ready(step(warm_model, warm_state))
    t0 = time.perf_counter()
    model1, losses1 = train(
        single_step, model0, optimiser.init(params0), args.steps, progress=False
    )
    t_train1 = time.perf_counter() - t0
    t0 = time.perf_counter()
    modeln, lossesn = train(
        parallel_step, model0, optimiser.init(params0), args.steps, progress=True
    )
    t_trainn = time.perf_counter() - t0
    diff = max(
        _rel(b, a)
        for a, b in zip(
            jax.tree.leaves(eqx.filter(model1, eqx.is_array)),
            jax.tree.leaves(eqx.filter(modeln, eqx.is_array)),
        )
    )
    rows.append((f"training {args.steps} steps (params)", diff, t_train1, t_trainn))
    print(
        f"  loss {losses1[0]:.4f} -> {losses1[-1]:.4f} (one device), "
        f"{lossesn[0]:.4f} -> {lossesn[-1]:.4f} ({n} devices)"
    )

    # summary ---------------------------------------------------------------------
    print(
        f"\n| what ran | max rel. diff vs 1 device | 1 device | {n} devices | speedup |"
    )
    print("|---|---:|---:|---:|---:|")
    ok = True
    for name, d, t1, tn in rows:
        print(
            f"| {name} | {d:.2e} | {t1 * 1e3:.1f} ms | {tn * 1e3:.1f} ms | "
            f"{t1 / tn:.2f}x |"
        )
        ok &= d < 1e-4
    print("\nAll results match one device." if ok else "\nMISMATCH against one device!")
    print(
        "(Simulated CPU devices share this machine's cores: the speedups show the "
        "overhead, not real scaling.)"
    )
    return 0 if ok else 1


def _save_pngs(out_dir: pathlib.Path, psf: np.ndarray, img: np.ndarray) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (matplotlib not installed: no PNGs; pip install 'eqpar[examples]')")
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    mid = psf.shape[0] // 2
    axes[0].imshow(psf[mid] ** 0.5, cmap="magma")
    axes[0].set_title("PSF at z = 0 (sqrt)")
    axes[1].imshow(psf[:, psf.shape[1] // 2, :].T ** 0.5, cmap="magma", aspect="auto")
    axes[1].set_title("PSF x-z section (sqrt)")
    axes[2].imshow(img, cmap="gray")
    axes[2].set_title("image: planes summed by sensor_sum")
    for ax in axes:
        ax.set_axis_off()
    fig.tight_layout()
    path = out_dir / "microscope.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    print(f"  wrote {path}")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m eqpar.demo", description="A short tour of eqpar."
    )
    parser.add_argument(
        "--devices", type=int, default=8, help="simulated CPU devices (default 8)"
    )
    parser.add_argument("--size", type=int, default=128, help="field size in pixels")
    parser.add_argument("--planes", type=int, default=32, help="depth planes")
    parser.add_argument("--steps", type=int, default=30, help="training steps")
    parser.add_argument("--out", default="eqpar-demo-out", help="folder for PNGs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    # Simulated devices must be configured before JAX initialises a backend.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={args.devices}"
    )
    try:
        jax.config.update("jax_num_cpu_devices", args.devices)
    except RuntimeError:  # already started (e.g. called from a running program)
        pass
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
