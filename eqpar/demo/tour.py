"""The tour itself, on every device JAX has: the microscope (its PSF and an image,
the depth planes split over the devices) and data-parallel training, each checked
against one device, drawn into the PNGs and summarised in one table.
"""

import math
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from . import optics, plots, training
from .report import all_match, rel_diff, Row, summary, timed_pair, timing_note


def run(*, size: int, planes: int, steps: int, repeats: int, out: str) -> int:
    """The tour; returns the exit status (0 when everything matched one device)."""
    n = jax.device_count()
    platform = jax.devices()[0].platform
    print(f"eqpar demo on {n} {platform.upper()} devices (jax {jax.__version__})\n")
    out_dir = pathlib.Path(out)
    rows = microscope(n, size, planes, repeats, out_dir)
    rows.append(data_parallel_training(n, steps, out_dir))
    print("\n" + summary(rows, n))
    ok = all_match(rows)
    print("\nAll results match one device." if ok else "\nMISMATCH against one device!")
    print(timing_note(platform, n, repeats, steps))
    return 0 if ok else 1


def microscope(
    n: int, size: int, planes: int, repeats: int, out_dir: pathlib.Path
) -> list[Row]:
    """[1/2]: the PSF over the depth planes and the image of the beads, the planes
    split over the `n` devices; draws `microscope.png`."""
    planes = planes - planes % n or n
    beads = min(4, max(size // 16, 1)) ** 2
    print(
        f"[1/2] microscope: {planes} planes of {size}x{size}, split over "
        f"{n} devices; the object: {beads} beads at depths from -4 to 4 µm"
    )
    scope = optics.make_microscope(size)
    zs = jnp.linspace(-4.0, 4.0, planes)
    volume, bead_rcp = optics.bead_volume(planes, size, grid=math.isqrt(beads))
    mesh = jax.make_mesh((n,), ("planes",))

    single_psf, sharded_psf = optics.psf_programs(mesh)
    psf1, psfn, t_psf1, t_psfn = timed_pair(
        lambda: single_psf(scope, zs), lambda: sharded_psf(scope, zs), repeats
    )
    single_image, sharded_image = optics.image_programs(mesh)
    img1, images, t_img1, t_imgn = timed_pair(
        lambda: single_image(scope, volume, zs),
        lambda: sharded_image(scope, volume, zs),
        repeats,
    )
    imgn = np.asarray(images)
    if not (imgn == imgn[:1]).all():
        print("  the devices' images differ!")
        imgn = imgn + np.inf
    imgn = imgn[0]
    img_diff = rel_diff(imgn, img1)
    # Drawn from a PSF sampled more finely (to 512 pixels across), so that its
    # in-focus core, about one pixel of the computed one, is seen as a shape.
    factor = max(512 // size, 1)
    fine = eqx.filter_jit(optics.fine_psf)(scope, zs, factor)
    plots.microscope_png(
        out_dir,
        np.asarray(fine),
        np.asarray(zs),
        np.asarray(imgn),
        bead_rcp,
        scope.spacing,
        n,
        img_diff,
        psf_spacing=scope.spacing / factor,
    )
    return [
        Row("PSF over planes", rel_diff(psfn, psf1), t_psf1, t_psfn),
        Row("image (sensor_sum)", img_diff, t_img1, t_imgn),
    ]


def data_parallel_training(n: int, steps: int, out_dir: pathlib.Path) -> Row:
    """[2/2]: the same training on one device and on `n`; draws `training.png`."""
    print(
        f"[2/2] data-parallel training: {training.EXAMPLES} examples over {n} devices "
        f"(padded to {training.padded_size(n)})"
    )
    single, parallel = training.train_both(n, steps)
    diff = max(
        rel_diff(b, a)
        for a, b in zip(
            jax.tree.leaves(eqx.filter(single.model, eqx.is_array)),
            jax.tree.leaves(eqx.filter(parallel.model, eqx.is_array)),
        )
    )
    print(
        f"  loss {single.losses[0]:.4f} -> {single.losses[-1]:.4f} (one device), "
        f"{parallel.losses[0]:.4f} -> {parallel.losses[-1]:.4f} ({n} devices)"
    )
    plots.training_png(out_dir, single.losses, parallel.losses, n, diff)
    return Row(
        f"training step (params after {steps})", diff, single.times, parallel.times
    )
