"""The demo's two PNGs (`microscope.png`, `training.png`), and the PSF and image
drawings that `examples/microscope.py` shares. matplotlib is optional: without it
the demo says so and writes no PNGs.
"""

import pathlib
from typing import Any

import numpy as np


def pyplot() -> Any:
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
    around the focus) on `section`; log scale, three decades below the peak, each
    with a colourbar. Pass a PSF sampled finely enough to show its core (e.g.
    `optics.fine_psf`): the in-focus core is about λ / (2 NA) wide."""
    from matplotlib.colors import LogNorm

    psf = np.asarray(psf, np.float64)
    psf = np.clip(psf / psf.max(), 1e-3, None)  # below the scale: its darkest colour
    size = psf.shape[-1]
    c = size // 2
    log = LogNorm(vmin=1e-3, vmax=1.0)
    label = "intensity / peak (log)"
    r = max(size // 16, 4)
    mid = len(zs) // 2
    lo, hi = -(r + 0.5) * spacing, (r - 0.5) * spacing
    shown = focus.imshow(
        psf[mid, c - r : c + r, c - r : c + r],
        cmap="magma",
        norm=log,
        extent=(lo, hi, hi, lo),
    )
    focus.set_title(f"PSF at z = {zs[mid]:.2f} µm (log)")
    focus.figure.colorbar(shown, ax=focus, fraction=0.046, pad=0.04, label=label)
    r = max(size // 8, 4)
    lo, hi = -(r + 0.5) * spacing, (r - 0.5) * spacing
    shown = section.imshow(
        psf[:, c, c - r : c + r],
        cmap="magma",
        norm=log,
        extent=(lo, hi, zs[0], zs[-1]),
        origin="lower",
        aspect="auto",
    )
    section.set_title("PSF x-z section (log)")
    section.set_ylabel("depth z (µm)")
    section.figure.colorbar(shown, ax=section, fraction=0.046, pad=0.04, label=label)


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


def microscope_png(
    out_dir: pathlib.Path,
    psf: np.ndarray,
    zs: np.ndarray,
    img: np.ndarray,
    beads: np.ndarray,
    spacing: float,
    n: int,
    diff: float,
    psf_spacing: float | None = None,
) -> pathlib.Path | None:
    """`out_dir/microscope.png`: the object, the PSF in focus and along z (zoomed on
    the focus), and the image on the sensor. `psf_spacing`: the PSF's pixel size,
    when it is sampled more finely than the image (default: `spacing`)."""
    plt = pyplot()
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
    draw_psf(axes[1], axes[2], psf, zs, spacing if psf_spacing is None else psf_spacing)
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


def training_png(
    out_dir: pathlib.Path,
    losses1: list[float],
    lossesn: list[float],
    n: int,
    diff: float,
) -> pathlib.Path | None:
    """`out_dir/training.png`: both loss curves overlaid, and their difference."""
    plt = pyplot()
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
