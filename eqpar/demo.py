"""`python -m eqpar.demo`: a short tour of eqpar on simulated CPU devices.

1. A microscope: the point-spread function of 32 depth planes, the planes split
   across devices with `filter_shard_map`, imaging a test object (point beads, each
   at its own depth) with a sensor that sums the planes locally and across devices
   (`sensor_sum`). Checked against one device; drawn in `OUT/microscope.png`.
2. Data-parallel training: an MLP trained with `filter_shard_map` +
   `filter_value_and_grad_mean` on a batch that does not divide over the devices
   (padded, count-weighted). Checked
   against training on one device; both loss curves in `OUT/training.png`.

The summary table gives each program's largest difference from one device and its
median time over repeats (after compilation). Simulated CPU devices share the
machine's cores: they show that the results equal one device's, not a speedup.

Run `python -m eqpar.demo --help` for the flags. The optical model here is also what
`examples/microscope.py` runs at the guide's full size. Importing this module starts
no JAX backend: `main` configures the simulated devices first.
"""

import argparse
import math
import os
import pathlib
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

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


def bead_volume(planes: int, size: int, grid: int = 4) -> tuple[Array, np.ndarray]:
    """A test object for the microscope: `grid**2` point beads on a square lattice,
    stepping through the depth planes in reading order (bead `k` in plane
    `round(k (planes - 1) / (grid**2 - 1))`), so its image shows the blur growing
    with the distance from focus.

    **Arguments:**

    - `planes`: depth planes of the volume.
    - `size`: the planes' height and width in pixels.
    - `grid`: beads per row and per column.

    **Returns:**

    `(volume, beads)`: the volume, float32 of shape `(planes, size, size)`, zero but
    for one pixel of 1 per bead, and the beads' `(row, column, plane)`, an integer
    array of shape `(grid**2, 3)`.
    """
    k = np.arange(grid * grid)
    step = size // grid
    rows, cols = (k // grid) * step + step // 2, (k % grid) * step + step // 2
    plane = np.rint(k * (planes - 1) / max(grid * grid - 1, 1)).astype(int)
    volume = np.zeros((planes, size, size), np.float32)
    volume[plane, rows, cols] = 1.0
    return jnp.asarray(volume), np.stack([rows, cols, plane], axis=1)


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


@runtime_checkable
class _Stream(Protocol):
    """Where progress goes: `sys.stdout`, a file, an `io.StringIO`."""

    def write(self, s: str, /) -> int: ...

    def flush(self) -> None: ...

    def isatty(self) -> bool: ...


def loss_fn(
    model: eqx.nn.MLP, x: Float[Array, "b i"], y: Float[Array, "b o"], mask: Any
) -> Float[Array, ""]:
    err = jnp.sum((jax.vmap(model)(x) - y) ** 2, axis=-1)
    count = jnp.maximum(jnp.sum(mask, dtype=jnp.float32), 1.0)
    return jnp.sum(jnp.where(mask, err, 0.0)) / count


def train(
    step: Callable, model: eqx.nn.MLP, opt_state: Any, steps: int, progress: bool
) -> tuple[eqx.nn.MLP, list[float], list[float]]:
    """`steps` calls of `step`; returns the model, the losses and each step's wall
    time in seconds (the step compiled beforehand: these are steady-state times)."""
    losses, times = [], []
    bar = _progress(steps, sys.stdout) if progress else None
    for _ in range(steps):
        t0 = time.perf_counter()
        model, opt_state, loss = step(model, opt_state)
        jax.block_until_ready(eqx.filter(model, eqx.is_array))
        losses.append(float(loss))
        times.append(time.perf_counter() - t0)
        if bar is not None:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    return model, losses, times


class _Bar:
    """A progress bar redrawn in place (with carriage returns): terminals only."""

    def __init__(self, total: int, stream: _Stream):
        self.total, self.n, self.post, self.stream = total, 0, "", stream

    def update(self, k: int) -> None:
        self.n += k
        done = int(30 * self.n / self.total)
        print(
            f"\r  training [{'#' * done}{'.' * (30 - done)}] {self.n}/{self.total} "
            f"{self.post}",
            end="",
            flush=True,
            file=self.stream,
        )

    def set_postfix(self, **kw: str) -> None:
        self.post = " ".join(f"{k}={v}" for k, v in kw.items())

    def close(self) -> None:
        print(file=self.stream)


class _Lines(_Bar):
    """Progress as plain lines, about five of them: for pipes and log files."""

    def update(self, k: int) -> None:
        self.n += k
        if self.n % max(self.total // 5, 1) == 0 or self.n == self.total:
            print(
                f"  training step {self.n}/{self.total} {self.post}",
                flush=True,
                file=self.stream,
            )

    def close(self) -> None:
        pass


def _progress(total: int, stream: _Stream) -> Any:
    """A progress bar (tqdm's when installed) where `stream` is a terminal, else
    plain lines with no carriage returns."""
    if not stream.isatty():
        return _Lines(total, stream)
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc="  training", ncols=80, file=stream)
    except ImportError:
        return _Bar(total, stream)


def _rel(a: Any, b: Any) -> float:
    """Largest difference relative to the reference's largest magnitude."""
    return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))


def _timed_pair(
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


def _ms(times: list[float]) -> str:
    """`median ms (min-max)`."""
    return (
        f"{statistics.median(times) * 1e3:.2f} ms "
        f"({min(times) * 1e3:.2f}-{max(times) * 1e3:.2f})"
    )


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _timing_note(platform: str, n: int, repeats: int, steps: int) -> str:
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
    beads = min(4, max(args.size // 16, 1)) ** 2
    print(
        f"[1/2] microscope: {planes} planes of {args.size}x{args.size}, split over "
        f"{n} devices; the object: {beads} beads at depths from -4 to 4 µm"
    )
    scope = make_microscope(args.size)
    zs = jnp.linspace(-4.0, 4.0, planes)
    volume, bead_rcp = bead_volume(planes, args.size, grid=math.isqrt(beads))
    mesh = jax.make_mesh((n,), ("planes",))

    single_psf, sharded_psf = psf_programs(mesh)
    psf1, psfn, t_psf1, t_psfn = _timed_pair(
        lambda: single_psf(scope, zs), lambda: sharded_psf(scope, zs), args.repeats
    )
    rows.append(("PSF over planes", _rel(psfn, psf1), t_psf1, t_psfn))

    single_image, sharded_image = image_programs(mesh)
    img1, images, t_img1, t_imgn = _timed_pair(
        lambda: single_image(scope, volume, zs),
        lambda: sharded_image(scope, volume, zs),
        args.repeats,
    )
    imgn = np.asarray(images)
    if not (imgn == imgn[:1]).all():
        print("  the devices' images differ!")
        imgn = imgn + np.inf
    imgn = imgn[0]
    img_diff = _rel(imgn, img1)
    rows.append(("image (sensor_sum)", img_diff, t_img1, t_imgn))
    _plot_microscope(
        out_dir,
        np.asarray(psf1),
        np.asarray(zs),
        np.asarray(imgn),
        bead_rcp,
        scope.spacing,
        n,
        img_diff,
    )

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
        # The loss and gradient of the mean over the real examples, weighted by count.
        loss, grads = eqpar.filter_value_and_grad_mean(loss_fn, "data")(
            model, x, y, mask, count=jnp.sum(mask)
        )
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
    model1, losses1, t_train1 = train(
        single_step, model0, optimiser.init(params0), args.steps, progress=False
    )
    modeln, lossesn, t_trainn = train(
        parallel_step, model0, optimiser.init(params0), args.steps, progress=True
    )
    diff = max(
        _rel(b, a)
        for a, b in zip(
            jax.tree.leaves(eqx.filter(model1, eqx.is_array)),
            jax.tree.leaves(eqx.filter(modeln, eqx.is_array)),
        )
    )
    rows.append(
        (f"training step (params after {args.steps})", diff, t_train1, t_trainn)
    )
    print(
        f"  loss {losses1[0]:.4f} -> {losses1[-1]:.4f} (one device), "
        f"{lossesn[0]:.4f} -> {lossesn[-1]:.4f} ({n} devices)"
    )
    _plot_training(out_dir, losses1, lossesn, n, diff)

    # summary ---------------------------------------------------------------------
    print(
        f"\n| what ran | max rel. diff vs 1 device | 1 device: median (min-max) "
        f"| {n} devices: median (min-max) | ratio of medians |"
    )
    print("|---|---:|---:|---:|---:|")
    ok = True
    for name, d, t1, tn in rows:
        ratio = statistics.median(t1) / statistics.median(tn)
        print(f"| {name} | {d:.2e} | {_ms(t1)} | {_ms(tn)} | {ratio:.2f}x |")
        ok &= d < 1e-4
    print("\nAll results match one device." if ok else "\nMISMATCH against one device!")
    print(_timing_note(jax.devices()[0].platform, n, args.repeats, args.steps))
    return 0 if ok else 1


def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, or None (with a note) without it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (matplotlib not installed: no PNGs; pip install 'eqpar[examples]')")
        return None
    return plt


def draw_psf(focus: Any, section: Any, psf: Any, zs: Any, spacing: float) -> None:
    """Draws the PSF in focus, zoomed on its centre (pixel centres at multiples of
    `spacing`), on the axes `focus`, and along z through its centre (the light cone
    around the focus) on `section`; log scale, three decades below the peak."""
    from matplotlib.colors import LogNorm

    size = psf.shape[-1]
    c = size // 2
    log = LogNorm(vmin=1e-3 * float(psf.max()), vmax=float(psf.max()), clip=True)
    r = max(size // 16, 4)
    mid = len(zs) // 2
    lo, hi = -(r + 0.5) * spacing, (r - 0.5) * spacing
    focus.imshow(
        psf[mid, c - r : c + r, c - r : c + r],
        cmap="magma",
        norm=log,
        extent=(lo, hi, hi, lo),
    )
    focus.set_title(f"PSF at z = {zs[mid]:.2f} µm (log)")
    r = max(size // 8, 4)
    lo, hi = -(r + 0.5) * spacing, (r - 0.5) * spacing
    section.imshow(
        psf[:, c, c - r : c + r],
        cmap="magma",
        norm=log,
        extent=(lo, hi, zs[0], zs[-1]),
        origin="lower",
        aspect="auto",
    )
    section.set_title("PSF x-z section (log)")
    section.set_ylabel("depth z (µm)")


def draw_image(ax: Any, img: Any, beads: Any, zs: Any, spacing: float) -> None:
    """Draws the image on the sensor (every plane blurred by its PSF, summed), each
    bead labelled with its depth."""
    from matplotlib.colors import PowerNorm

    size = img.shape[-1]
    field = size * spacing
    ax.imshow(
        img,
        cmap="gray",
        norm=PowerNorm(0.4, vmin=0.0, vmax=float(img.max())),
        extent=(0, field, field, 0),
    )
    for row, col, plane in beads:
        ax.annotate(
            f"{zs[plane]:+.1f}",
            (col * spacing, row * spacing),
            xytext=(0, -0.3 * size / len(beads) ** 0.5),
            textcoords="offset points",
            ha="center",
            va="top",
            color="tab:cyan",
            fontsize=7,
        )


def _plot_microscope(
    out_dir: pathlib.Path,
    psf: np.ndarray,
    zs: np.ndarray,
    img: np.ndarray,
    beads: np.ndarray,
    spacing: float,
    n: int,
    diff: float,
) -> pathlib.Path | None:
    """`out_dir/microscope.png`: the object, the PSF in focus and along z (zoomed on
    the focus), and the image on the sensor."""
    plt = _pyplot()
    if plt is None:
        return None
    size = img.shape[-1]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.6), layout="constrained")
    # The object: each bead where it lies, coloured by its depth.
    field = size * spacing
    ax = axes[0]
    ax.set_facecolor("black")
    dots = ax.scatter(
        beads[:, 1] * spacing,
        beads[:, 0] * spacing,
        c=zs[beads[:, 2]],
        cmap="coolwarm",
        vmin=zs[0],
        vmax=zs[-1],
        s=30,
    )
    ax.set(xlim=(0, field), ylim=(field, 0), aspect="equal")
    ax.set_title(f"object: {len(beads)} point beads")
    fig.colorbar(dots, ax=ax, fraction=0.046, pad=0.04, label="depth z (µm)")
    draw_psf(axes[1], axes[2], psf, zs, spacing)
    draw_image(axes[3], img, beads, zs, spacing)
    axes[3].set_title(
        f"image on {n} devices (sensor_sum)\nrel. diff vs 1 device {diff:.1e}"
    )
    for ax in axes:
        ax.set_xlabel("x (µm)")
    axes[3].set_xlabel("x (µm); cyan: bead depth z (µm); display γ 0.4")
    for ax in (axes[0], axes[1], axes[3]):
        ax.set_ylabel("y (µm)")
    return _save(fig, plt, out_dir / "microscope.png")


def _plot_training(
    out_dir: pathlib.Path,
    losses1: list[float],
    lossesn: list[float],
    n: int,
    diff: float,
) -> pathlib.Path | None:
    """`out_dir/training.png`: both loss curves overlaid, and their difference."""
    plt = _pyplot()
    if plt is None:
        return None
    steps = np.arange(1, len(losses1) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].semilogy(
        steps, losses1, lw=4, alpha=0.4, color="tab:blue", label="1 device"
    )
    axes[0].semilogy(
        steps, lossesn, "o--", ms=3, color="tab:orange", label=f"{n} devices"
    )
    axes[0].set(xlabel="step", ylabel="training loss (log)")
    axes[0].set_title("data-parallel training: the curves coincide")
    axes[0].legend()
    gap = np.asarray(lossesn) - np.asarray(losses1)
    axes[1].plot(steps, gap, "o-", ms=3, color="tab:green")
    axes[1].axhline(0.0, color="gray", lw=0.8)
    axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    axes[1].set(xlabel="step", ylabel=f"loss ({n} devices) - loss (1 device)")
    axes[1].set_title(f"difference; final parameters: rel. diff {diff:.1e}")
    fig.tight_layout()
    return _save(fig, plt, out_dir / "training.png")


def _save(fig: Any, plt: Any, path: pathlib.Path) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    print(f"  wrote {path}")
    return path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eqpar.demo",
        description="A short tour of eqpar.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
    parser.add_argument("--size", type=int, default=128, help="field size in pixels")
    parser.add_argument("--planes", type=int, default=32, help="depth planes")
    parser.add_argument("--steps", type=int, default=30, help="training steps")
    parser.add_argument(
        "--repeats", type=int, default=7, help="timed runs per program (medians)"
    )
    parser.add_argument(
        "--out", default="eqpar-demo-out", help="folder for the PNGs (created)"
    )
    return parser


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = _parser()
    args = parser.parse_args(argv)
    for name in ("devices", "size", "planes", "steps", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    return args


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
