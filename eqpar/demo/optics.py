"""The optical model: a widefield microscope (after Chromatix), a test object of point
beads, imaging through a sensor that sums the depth planes (`eqpar.sensor_sum`), and
the PSF and imaging programs on one device and with the planes split over a mesh.

Its one home: the demo, `examples/microscope.py` (at the guide's full size) and the
benchmarks (`benchmarks/chunking.py`, `benchmarks/scaling.py`) import it from here.
Importing it starts no JAX backend.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Complex, Float

import eqpar


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
        return transfer(fx, fy, z, self, phase=self.phase)

    def psf(self, z: Float[Array, ""]) -> Float[Array, "h w"]:
        field = jnp.fft.fftshift(jnp.fft.ifft2(self.pupil(z)))
        intensity = jnp.abs(field) ** 2
        return intensity / self.size**2


def transfer(
    fx: Float[Array, "..."],
    fy: Float[Array, "..."],
    z: Float[Array, ""] | float,
    scope: Microscope,
    phase: Float[Array, "..."] | float = 0.0,
) -> Complex[Array, "..."]:
    """The angular-spectrum transfer function of a propagation by `z` µm, cut off
    at the numerical aperture: `exp(i (kz z + phase))` at the spatial frequencies
    `(fx, fy)` (1/µm, any broadcastable shapes: a device's rows of the spectrum
    too), zero beyond `|f| = NA / wavelength`. The microscope's pupil at depth `z`
    is this on its whole frequency grid, with its phase mask."""
    rho2 = (fx**2 + fy**2) * scope.wavelength**2
    inside = rho2 <= scope.na**2  # |f| <= NA / wavelength
    kz = (
        2
        * jnp.pi
        * scope.n
        / scope.wavelength
        * jnp.sqrt(jnp.clip(1.0 - rho2 / scope.n**2, 0.0, None))
    )
    angle = kz * z + phase
    field = jax.lax.complex(jnp.cos(angle), jnp.sin(angle))
    return jnp.where(inside, field, jnp.zeros_like(field))


def make_microscope(size: int) -> Microscope:
    """The guide's optics (wavelength 0.532 µm, n = 1.33, NA = 0.8, pupil sampling
    0.3 µm) on a `size` x `size` field, with a flat phase mask."""
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


def fine_psf(
    scope: Microscope, zs: Float[Array, " p"], factor: int
) -> Float[Array, "p H W"]:
    """The PSF at depths `zs` sampled `factor` times more finely across (pixels of
    `scope.spacing / factor`, over the same field), for drawing: the computed PSF's
    in-focus core is about one pixel wide. The pupil is zero-padded, not the PSF
    interpolated (the intensity's band, 2 NA / λ, is wider than the grid's Nyquist
    rate), so it is exact whenever the pupil grid holds the whole NA disc, as the
    guide's optics do (NA / λ = 1.5 / µm below 1 / (2 x 0.3 µm))."""
    n = scope.size
    before = (n * factor) // 2 - n // 2
    pad = ((before, n * factor - n - before),) * 2

    def one(z: Float[Array, ""]) -> Float[Array, "H W"]:
        pupil = jnp.pad(jnp.fft.fftshift(scope.pupil(z)), pad)
        field = jnp.fft.fftshift(jnp.fft.ifft2(jnp.fft.ifftshift(pupil)))
        return jnp.abs(field) ** 2 * factor**4 / n**2  # as `Microscope.psf` scales

    return jax.lax.map(one, zs)


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
