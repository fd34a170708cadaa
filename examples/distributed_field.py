"""A field split over devices by rows: multi-slice propagation with distributed FFTs.

    python examples/distributed_field.py --devices 8 [--size 512 --planes 6 --dz 2.0]

A coherent field (a Gaussian beam, complex64, `--size` x `--size` pixels of 0.3 µm)
passes through a thick sample modelled as `--planes` thin phase screens (point
beads, from `eqpar.demo.optics.bead_volume`) `--dz` µm apart: at each screen the
field takes the screen's phase, then propagates `--dz` µm by the angular-spectrum
method (`eqpar.demo.optics.transfer`: the microscope's kz, cut off at its NA). The
sensor records the intensity at every plane and sums them
(`eqpar.sensor_sum` over the plane axis).

The field, the screens, every spectrum and the image are split by rows over the
devices: each device holds 1/N of each. Every propagation is `eqpar.fft.fft2` and
`eqpar.fft.ifft2` on a device's rows (two all-to-alls each, never an all-gather),
and each device computes its own rows of the transfer function. The image equals
one device's run of the same model with `jnp.fft`; the program prints the
per-device bytes from XLA's memory analysis and the collectives in the compiled
program. Writes OUT/distributed_field.png (the image, and its difference from one
device's).
"""

from typing import Any

from _common import (
    finish,
    out_dir,
    parser,
    rel_diff,
    save_figure,
    setup_devices,
    timed,
    TIMING_NOTE,
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=512, help="field size in pixels")
    p.add_argument("--planes", type=int, default=6, help="phase screens")
    p.add_argument("--dz", type=float, default=2.0, help="plane spacing in µm")
    args = p.parse_args(argv)
    devices = setup_devices(args.devices)

    import time

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    import eqpar
    from eqpar.demo.optics import bead_volume, make_microscope, transfer

    t0 = time.perf_counter()
    n, size = len(devices), args.size
    if size % n:
        raise SystemExit(f"--size {size} must be a multiple of --devices {n}")
    scope = make_microscope(size)  # wavelength, n, NA and pixel pitch of the guide
    mesh = jax.make_mesh((n,), ("rows",), devices=devices)
    rows = NamedSharding(mesh, P("rows"))
    print(
        f"field {size}x{size} complex64 ({size * size * 8 / 2**20:.1f} MiB), "
        f"{args.planes} planes {args.dz} µm apart, split by rows over {n} devices "
        f"({devices[0].platform}): {size // n} rows each"
    )

    def beam() -> Any:
        x = (jnp.arange(size, dtype=jnp.float32) - size / 2) / (size / 4)
        amplitude = jnp.exp(-(x[:, None] ** 2) - x[None, :] ** 2)
        return jax.lax.complex(amplitude, jnp.zeros_like(amplitude))

    # Built in place: each device computes and keeps only its rows.
    field = jax.jit(beam, out_shardings=rows)()
    volume, beads = bead_volume(args.planes, size)
    screens = jax.device_put(2.0 * volume, NamedSharding(mesh, P(None, "rows")))
    freqs = jnp.fft.fftfreq(size, d=scope.spacing)  # 1/µm, a vector: tiny

    def propagate(u: Any, screen: Any, h: Any, fft2: Any, ifft2: Any) -> Any:
        u = u * jax.lax.complex(jnp.cos(screen), jnp.sin(screen))
        return ifft2(fft2(u) * h)

    def sensor(u0: Any, screens: Any, h: Any, fft2: Any, ifft2: Any) -> Any:
        def plane(u: Any, screen: Any) -> tuple[Any, Any]:
            u = propagate(u, screen, h, fft2, ifft2)
            return u, jnp.abs(u) ** 2

        _, intensities = jax.lax.scan(plane, u0, screens)
        return eqpar.sensor_sum(intensities, axis=0)  # the planes, summed

    # One device: the whole field, jnp.fft.
    @jax.jit
    def single(u0: Any, screens: Any) -> Any:
        fx, fy = freqs[:, None], freqs[None, :]  # as the microscope's pupil grid
        h = transfer(fx, fy, args.dz, scope)
        return sensor(u0, screens, h, jnp.fft.fft2, jnp.fft.ifft2)

    # N devices: each its rows of everything; its rows of the transfer function.
    def block(u0: Any, screens: Any) -> Any:
        local = size // n
        start = eqpar.axis_index("rows") * local
        fx = jax.lax.dynamic_slice_in_dim(freqs, start, local)[:, None]
        h = transfer(fx, freqs[None, :], args.dz, scope)
        return sensor(
            u0,
            screens,
            h,
            lambda u: eqpar.fft.fft2(u, spec=P("rows")),
            lambda u: eqpar.fft.ifft2(u, spec=P("rows")),
        )

    split = eqpar.filter_shard_map(
        block, mesh=mesh, in_specs=(P("rows"), P(None, "rows")), out_specs=P("rows")
    )

    # One device's copies, from the host (a device_put of a placed array keeps
    # its Explicit placement in its type).
    whole_field = jax.device_put(np.asarray(field), devices[0])
    whole_screens = jax.device_put(np.asarray(screens), devices[0])
    img1, t1 = timed(lambda: single(whole_field, whole_screens))
    imgn, tn = timed(lambda: split(field, screens))
    err = rel_diff(imgn, img1)
    print(
        f"image: 1 device {t1 * 1e3:.1f} ms, {n} devices {tn * 1e3:.1f} ms; rel. "
        f"diff vs 1 device {err:.1e}"
    )
    if devices[0].platform == "cpu":
        print(f"    {TIMING_NOTE}")

    compiled = split.lower(field, screens).compile()
    text, memory = compiled.as_text(), compiled.memory_analysis()
    exchanges = text.count(" all-to-all(")
    gathers = text.count(" all-gather(")
    block_bytes = field.nbytes // n
    shard_shapes = {s.data.shape for s in imgn.addressable_shards}
    print(
        f"per device: arguments {memory.argument_size_in_bytes / 2**10:.0f} KiB "
        f"(field and screens / {n}), output {memory.output_size_in_bytes / 2**10:.0f}"
        f" KiB, temporaries {memory.temp_size_in_bytes / 2**10:.0f} KiB "
        f"({memory.temp_size_in_bytes / block_bytes:.1f}x the field's block)"
    )
    print(
        f"compiled program: {exchanges} all-to-alls in the plane loop (fft2 and "
        f"ifft2, 2 each), {gathers} all-gathers; image rows per device: "
        f"{sorted(shard_shapes)}"
    )

    checks = {
        "image equals one device's": err < 1e-5,
        "each device holds 1/N of the field and screens": (
            memory.argument_size_in_bytes == (field.nbytes + screens.nbytes) // n
        ),
        "each device holds 1/N of the image": shard_shapes == {(size // n, size)},
        "no all-gather in the compiled program": gathers == 0,
        "four all-to-alls per plane (fft2 + ifft2)": exchanges == 4,
    }
    path = _plot(out_dir(args.out), np.asarray(imgn), np.asarray(img1))
    if path:
        print(f"\nwrote {path}")
    results = {
        "rel_diff": err,
        "times_ms": {"single": t1 * 1e3, "split": tn * 1e3},
        "memory": {
            "argument": memory.argument_size_in_bytes,
            "output": memory.output_size_in_bytes,
            "temp": memory.temp_size_in_bytes,
        },
        "all_to_alls": exchanges,
        "devices": n,
    }
    return finish(results, checks, t0)


def _plot(folder: Any, image: Any, reference: Any) -> Any:
    """distributed_field.png: the sensor image (split over devices, shown whole) and
    its difference from one device's."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no PNG)")
        return None
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), layout="constrained")
    shown = axes[0].imshow(image**0.5, cmap="magma")
    axes[0].set(title="sensor image (sum over planes), γ 0.5", xlabel="x (pixel)")
    fig.colorbar(shown, ax=axes[0], fraction=0.046, pad=0.04)
    diff = np.abs(image - reference) / max(float(np.abs(reference).max()), 1e-30)
    shown = axes[1].imshow(diff, cmap="viridis")
    axes[1].set(title="|split - one device| / max", xlabel="x (pixel)")
    fig.colorbar(shown, ax=axes[1], fraction=0.046, pad=0.04)
    return save_figure(fig, folder / "distributed_field.png", dpi=72)


if __name__ == "__main__":
    raise SystemExit(0 if all(main()["checks"].values()) else 1)
