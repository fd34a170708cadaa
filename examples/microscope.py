"""A microscope across devices (after Chromatix's parallelism guide).

    python examples/microscope.py --devices 8 [--size 256 --planes 32 --z-psf 128]

(a) The widefield PSF of a point source over `--z-psf` depths in [-4, 4] µm, the
    depths split across devices; equal to the single-device PSF.
(b) Imaging: a volume of `--planes` planes (a test object: point beads, each at its
    own depth), each plane convolved with its PSF; the sensor sums the local planes
    and then across devices (`eqpar.sensor_sum`), so every device holds the
    identical full image, equal to one device's.
(c) A trainable phase mask: one gradient step through the parallel imaging model on
    a batch of volumes, on a ("data", "planes") mesh: samples split over "data",
    planes over "planes". The loss is a mean over samples, so the gradient is
    averaged over "data" with `eqpar.filter_value_and_grad_mean(..., "data")`, and
    autodiff sums it over "planes" (each device holds part of one image); equal to
    the single-device gradient step.

Optics from the guide: wavelength 0.532 µm, n = 1.33, NA = 0.8, pupil sampling
0.3 µm. `--size 1536 --z-psf 128` is the guide's full problem (meant for a GPU).
Writes OUT/microscope.png: the PSF (zoomed on the focus), the image of the beads,
and the phase-mask update.
"""

from typing import Any

from _common import (
    out_dir,
    parser,
    rel_diff,
    report,
    save_figure,
    setup_devices,
    timed,
    TIMING_NOTE,
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=256, help="field size in pixels")
    p.add_argument("--planes", type=int, default=32, help="planes in the volume")
    p.add_argument("--z-psf", type=int, default=128, help="depths for the PSF")
    p.add_argument("--lr", type=float, default=1e5, help="phase-mask step size")
    args = p.parse_args(argv)
    devices = setup_devices(args.devices)

    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import PartitionSpec as P
    from jaxtyping import Array, Float

    import eqpar
    from eqpar.demo.optics import (
        bead_volume,
        image,
        image_programs,
        make_microscope,
        Microscope,
        psf_programs,
    )

    n = len(devices)
    scope = make_microscope(args.size)
    print(
        f"microscope: {args.size}x{args.size} field, {n} devices "
        f"({devices[0].platform})"
    )

    # (a) PSF over depths, split across devices -------------------------------------
    z_psf = jnp.linspace(-4.0, 4.0, args.z_psf)
    mesh = jax.make_mesh((n,), ("planes",), devices=devices)
    psf_single, psf_sharded = psf_programs(mesh)
    psf1, t_psf1 = timed(lambda: psf_single(scope, z_psf))
    psfn, t_psfn = timed(lambda: psf_sharded(scope, z_psf))
    psf_err = rel_diff(psfn, psf1)
    print(
        f"(a) PSF, {args.z_psf} depths: 1 device {t_psf1 * 1e3:.1f} ms, {n} devices "
        f"{t_psfn * 1e3:.1f} ms ({t_psf1 / t_psfn:.2f}x), rel. diff {psf_err:.1e}"
    )

    # (b) imaging: every device ends with the same full image ------------------------
    planes = args.planes
    zs = jnp.linspace(-4.0, 4.0, planes)
    volume, beads = bead_volume(planes, args.size)

    image_single, image_sharded = image_programs(mesh)
    img1, t_img1 = timed(lambda: image_single(scope, volume, zs))
    imgs, t_imgn = timed(lambda: image_sharded(scope, volume, zs))
    per_device = np.asarray(imgs)
    img_err = max(rel_diff(im, img1) for im in per_device)
    identical = bool((per_device == per_device[:1]).all())
    print(
        f"(b) image of {planes} planes: 1 device {t_img1 * 1e3:.1f} ms, {n} devices "
        f"{t_imgn * 1e3:.1f} ms ({t_img1 / t_imgn:.2f}x); identical on all "
        f"{n} devices: {identical}; rel. diff vs 1 device {img_err:.1e}"
    )
    if devices[0].platform == "cpu":
        print(f"    {TIMING_NOTE}")

    # (c) one gradient step on the phase mask ---------------------------------------
    data = 2 if n % 2 == 0 else 1
    grid = jax.make_mesh((data, n // data), ("data", "planes"), devices=devices)
    samples = 2 * data
    volumes = (
        jax.random.uniform(jax.random.key(1), (samples, planes, args.size, args.size))
        ** 8
    )
    # Targets: what a microscope with an astigmatic phase mask would record. The step
    # moves the flat mask towards it; the loss is relative, so the step is O(lr).
    u = jnp.linspace(-1.0, 1.0, args.size)
    true_scope = eqx.tree_at(
        lambda s: s.phase, scope, 2.0 * (u[:, None] ** 2 - u[None, :] ** 2)
    )
    targets = eqpar.filter_jit(jax.vmap(image, in_axes=(None, 0, None)))(
        true_scope, volumes, zs
    )
    scale = jnp.mean(targets**2)

    def single_step(s: Microscope) -> Microscope:
        def total(s: Microscope) -> Any:
            imgs = jax.vmap(lambda v: image(s, v, zs))(volumes)
            return jnp.mean((imgs - targets) ** 2) / scale

        grads = eqx.filter_grad(total)(s)
        return eqx.apply_updates(s, jax.tree.map(lambda g: -args.lr * g, grads))

    def parallel_step(
        s: Microscope, vols: Any, tgts: Any, z: Float[Array, " p"], scale: Any
    ) -> Microscope:
        def local(s: Microscope) -> Any:
            imgs = jax.vmap(lambda v: image(s, v, z, axis_name="planes"))(vols)
            return jnp.mean((imgs - tgts) ** 2) / scale  # this data shard's samples

        # Each data shard's loss is its own (the mean over its samples): the mean
        # over "data" of those losses is the mean over all samples. The planes'
        # contributions meet in the sensor's sum, and autodiff adds them back up.
        grads = eqpar.filter_grad_mean(local, "data")(s)
        return eqx.apply_updates(s, jax.tree.map(lambda g: -args.lr * g, grads))

    step_sharded = eqpar.filter_shard_map(
        parallel_step,
        mesh=grid,
        in_specs=(P(), P("data", "planes"), P("data"), P("planes"), P()),
        out_specs=P(),
    )
    new1 = eqpar.filter_jit(single_step)(scope)
    newn = step_sharded(scope, volumes, targets, zs, scale)
    step1 = np.asarray(new1.phase - scope.phase)
    stepn = np.asarray(newn.phase - scope.phase)
    grad_err = rel_diff(stepn, step1)
    print(
        f"(c) phase-mask step on a {data}x{n // data} ('data', 'planes') mesh, "
        f"{samples} samples: |step| max {np.abs(step1).max():.2e}, rel. diff vs 1 "
        f"device {grad_err:.1e}"
    )

    checks = {
        "PSF across devices equals one device": psf_err < 1e-5,
        "every device holds the identical image": identical,
        "image equals one device's": img_err < 1e-5,
        "phase-mask gradient step equals one device's": grad_err < 1e-4,
        "the gradient step is not zero": bool(np.abs(step1).max() > 0),
    }
    report(checks)
    path = _plot(
        out_dir(args.out),
        np.asarray(psf1),
        np.asarray(z_psf),
        np.asarray(img1),
        beads,
        np.asarray(zs),
        stepn,
        scope.spacing,
    )
    if path:
        print(f"\nwrote {path}")
    return {
        "checks": checks,
        "psf_rel_diff": psf_err,
        "image_rel_diff": img_err,
        "grad_rel_diff": grad_err,
        "times_ms": {
            "psf_1": t_psf1 * 1e3,
            "psf_n": t_psfn * 1e3,
            "image_1": t_img1 * 1e3,
            "image_n": t_imgn * 1e3,
        },
        "devices": n,
    }


def _plot(
    folder: Any,
    psf: Any,
    z_psf: Any,
    img: Any,
    beads: Any,
    zs: Any,
    step: Any,
    spacing: float,
) -> Any:
    """microscope.png: the PSF in focus and along z (zoomed on the focus, log scale),
    the image of the beads, and the phase-mask update."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no PNG)")
        return None
    import numpy as np

    from eqpar.demo.plots import draw_image, draw_psf

    fig, axes = plt.subplots(1, 4, figsize=(17, 4.6), layout="constrained")
    draw_psf(axes[0], axes[1], psf, z_psf, spacing)
    axes[0].set_ylabel("y (µm)")
    draw_image(axes[2], img, beads, zs, spacing)
    axes[2].set(title="image of beads (sensor_sum over devices)", ylabel="y (µm)")
    for ax in axes[:3]:
        ax.set_xlabel("x (µm)")
    axes[2].set_xlabel("x (µm); cyan: bead depth z (µm); display γ 0.4")
    bound = float(np.abs(step).max()) or 1.0
    shown = axes[3].imshow(np.fft.fftshift(step), cmap="RdBu", vmin=-bound, vmax=bound)
    axes[3].set(title="phase-mask update (pupil, centred)", xlabel="pupil pixel")
    fig.colorbar(shown, ax=axes[3], fraction=0.046, pad=0.04, label="radians")
    path = folder / "microscope.png"
    saved = save_figure(fig, path, dpi=72)
    return saved


if __name__ == "__main__":
    raise SystemExit(0 if all(main()["checks"].values()) else 1)
