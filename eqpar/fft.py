"""Distributed FFTs: `jnp.fft` on arrays split over one mesh axis (slab) or two
(pencil), without ever gathering the whole array.

XLA does not partition FFTs: `jnp.fft.fft` of a sharded array all-gathers it, even
along an unsharded axis. These functions mirror `jnp.fft` (same arguments, same
results, `norm=` included) and split the work instead:

- **On a placed array, outside any transform** (eagerly, or under `jax.jit` where
  the placement is in the array's type, i.e. on Explicit mesh axes), each device
  transforms its block along the dimensions it holds whole; along a split
  dimension, an all-to-all inside a `shard_map` first makes that dimension whole
  and another one split, the 1-D FFTs run, and an all-to-all puts the layout back.
  The result has the input's placement: two all-to-alls per split FFT axis, each
  moving one block, and no all-gather.
- **Inside `eqpar.filter_shard_map`**, on a device's block, given the block's
  `spec` (the `PartitionSpec` it was split by): the same steps, over the bound mesh
  axes.
- Anywhere else (an unplaced array, a tracer whose type carries no placement, under
  `filter_vmap`) they are `jnp.fft`'s.

FFT axes are chosen by position, as in `jnp.fft`, or by jaxtyping dimension name:
a Module field `u: Complex[Array, "y x"]` is transformed by
`eqpar.fft.fftn(module, axes=("y", "x"))`, or any array with `names="y x"`. Every
function takes a pytree: each array leaf is transformed, other leaves (a Module's
static fields, `None`) pass through.
"""

import dataclasses
import functools
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.core
import jax.numpy as jnp
import jax.tree_util as jtu
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from jaxtyping import PyTree

from ._collectives import all_to_all, axis_size
from ._errors import AxisSizeError, Checked, MeshError, SpecError
from ._model_sharding import dimension_names, names_in
from ._specs import AnyMesh, check_divides, check_spec, is_array, spec_axes


Axis = int | str
"""An FFT axis: a position (negative counts from the end) or a dimension name."""

Names = str | Sequence[str | None] | None
"""Dimension names of the arrays: a jaxtyping dimension string (`"batch y x"`,
`"*batch y x"`) or one name (or `None`) per dimension."""


# ----------------------------------------------------------------------------------
# API


def fft(
    a: PyTree,
    n: int | None = None,
    axis: Axis = -1,
    norm: str | None = None,
    *,
    spec: Checked[P | None] = None,
    names: Names = None,
) -> PyTree:
    """The 1-D discrete Fourier transform along `axis`, as `jnp.fft.fft`, of arrays
    that may be split over devices.

    **Arguments:**

    - `a`: an array, or any pytree of arrays (e.g. a Module holding fields). Placed
        arrays (a `NamedSharding` on several devices) are transformed where they
        are; the result has the same placement.
    - `n`: the length of the transform (crops or zero-pads), as in `jnp.fft`; only
        along a dimension that is not split over devices.
    - `axis`: the dimension, by position or by jaxtyping name (see `names`).
    - `norm`: `None`/`"backward"`, `"ortho"` or `"forward"`, as in `jnp.fft`.
    - `spec`: inside `eqpar.filter_shard_map`, the `PartitionSpec` the block was
        split by (its `in_specs` entry), e.g. `P("rows")`. Outside, it overrides
        the placement read from the array (under `jax.jit` on Auto mesh axes, whose
        tracers carry no placement, it is how to ask for the split FFT, on the
        context mesh set by `jax.set_mesh`).
    - `names`: the dimensions' names, for `axis` given by name: a jaxtyping
        dimension string such as `"batch y x"`, or one name per dimension. Without
        it, a Module field's own annotation (`u: Complex[Array, "y x"]`) names them.

    **Returns:**

    The transform, complex, with the input's structure and placement.

    !!! example

        ```python
        import jax, jax.numpy as jnp, numpy as np, eqpar
        from jax.sharding import NamedSharding, PartitionSpec as P

        mesh = jax.make_mesh((jax.device_count(),), ("rows",))
        x = jax.random.normal(jax.random.key(0), (8 * jax.device_count(), 16))
        x = jax.device_put(x, NamedSharding(mesh, P("rows")))
        y = eqpar.fft.fft(x, axis=0)  # along the split dimension
        assert y.sharding.spec[0] == "rows"  # still split by rows
        np.testing.assert_allclose(y, jnp.fft.fft(x, axis=0), rtol=1e-4, atol=1e-4)
        ```
    """
    return _transform(
        a, _Kind.C2C, False, (axis,), _lengths(n), norm, spec, names, "fft"
    )


def ifft(
    a: PyTree,
    n: int | None = None,
    axis: Axis = -1,
    norm: str | None = None,
    *,
    spec: Checked[P | None] = None,
    names: Names = None,
) -> PyTree:
    """The inverse of [`eqpar.fft.fft`][], as `jnp.fft.ifft`. Arguments as
    [`eqpar.fft.fft`][].

    !!! example

        ```python
        import jax, jax.numpy as jnp, numpy as np, eqpar
        from jax.sharding import NamedSharding, PartitionSpec as P

        mesh = jax.make_mesh((jax.device_count(),), ("rows",))
        x = jax.random.normal(jax.random.key(0), (4 * jax.device_count(), 8))
        x = jax.device_put(x.astype(jnp.complex64), NamedSharding(mesh, P("rows")))
        back = eqpar.fft.ifft(eqpar.fft.fft(x, axis=0), axis=0)
        np.testing.assert_allclose(back, x, atol=1e-5)
        ```
    """
    return _transform(
        a, _Kind.C2C, True, (axis,), _lengths(n), norm, spec, names, "ifft"
    )


def fftn(
    a: PyTree,
    s: Sequence[int] | None = None,
    axes: Sequence[Axis] | None = None,
    norm: str | None = None,
    *,
    spec: Checked[P | None] = None,
    names: Names = None,
) -> PyTree:
    """The N-D discrete Fourier transform over `axes`, as `jnp.fft.fftn`, of arrays
    that may be split over one mesh axis (slab) or several (pencil).

    **Arguments:**

    - `a`: an array, or any pytree of arrays; see [`eqpar.fft.fft`][].
    - `s`: the lengths of the transform along `axes` (crops or zero-pads), as in
        `jnp.fft.fftn`; only along dimensions that are not split over devices.
    - `axes`: the dimensions, by position or by jaxtyping name (`("y", "x")`);
        `None` for all of them (the last `len(s)` if `s` is given).
    - `norm`, `spec`, `names`: as [`eqpar.fft.fft`][].

    **Returns:**

    The transform, complex, with the input's structure and placement. Each split
    dimension among `axes` costs two all-to-alls (one block each) and needs another
    dimension whose per-device size the split divides, to trade places with.

    !!! example

        ```python
        import equinox as eqx, jax, jax.numpy as jnp, numpy as np, eqpar
        from jax.sharding import NamedSharding, PartitionSpec as P
        from jaxtyping import Array, Complex

        class Field(eqx.Module):
            u: Complex[Array, "y x"]

        n = jax.device_count()
        mesh = jax.make_mesh((n,), ("rows",))
        t = jnp.arange(8 * n * 16.0).reshape(8 * n, 16) / 7
        u = jax.lax.complex(jnp.cos(t), jnp.sin(t))
        field = Field(jax.device_put(u, NamedSharding(mesh, P("rows"))))
        spectrum = eqpar.fft.fftn(field, axes=("y", "x"))  # by the field's names
        np.testing.assert_allclose(spectrum.u, jnp.fft.fftn(u), rtol=1e-4, atol=1e-3)
        back = eqpar.fft.ifftn(spectrum, axes=("y", "x"))
        np.testing.assert_allclose(back.u, u, rtol=1e-4, atol=1e-5)
        ```
    """
    return _transform(a, _Kind.C2C, False, axes, _lengths(s), norm, spec, names, "fftn")


def ifftn(
    a: PyTree,
    s: Sequence[int] | None = None,
    axes: Sequence[Axis] | None = None,
    norm: str | None = None,
    *,
    spec: Checked[P | None] = None,
    names: Names = None,
) -> PyTree:
    """The inverse of [`eqpar.fft.fftn`][], as `jnp.fft.ifftn`. Arguments as
    [`eqpar.fft.fftn`][].

    !!! example

        ```python
        import jax, jax.numpy as jnp, numpy as np, eqpar
        from jax.sharding import NamedSharding, PartitionSpec as P

        mesh = jax.make_mesh((jax.device_count(),), ("rows",))
        x = jax.random.normal(jax.random.key(0), (4 * jax.device_count(), 8, 8))
        x = jax.device_put(x.astype(jnp.complex64), NamedSharding(mesh, P("rows")))
        np.testing.assert_allclose(eqpar.fft.ifftn(eqpar.fft.fftn(x)), x, atol=1e-5)
        ```
    """
    return _transform(a, _Kind.C2C, True, axes, _lengths(s), norm, spec, names, "ifftn")


def fft2(
    a: PyTree,
    s: Sequence[int] | None = None,
    axes: Sequence[Axis] = (-2, -1),
    norm: str | None = None,
    *,
    spec: Checked[P | None] = None,
    names: Names = None,
) -> PyTree:
    """[`eqpar.fft.fftn`][] over two axes, the last two by default, as
    `jnp.fft.fft2`.

    !!! example

        ```python
        import jax, jax.numpy as jnp, numpy as np, eqpar
        from jax.sharding import NamedSharding, PartitionSpec as P

        mesh = jax.make_mesh((jax.device_count(),), ("rows",))
        x = jax.random.normal(jax.random.key(0), (8 * jax.device_count(), 16))
        x = jax.device_put(x, NamedSharding(mesh, P("rows")))  # rows split
        y = eqpar.fft.fft2(x)
        np.testing.assert_allclose(y, jnp.fft.fft2(x), rtol=1e-4, atol=1e-4)
        ```
    """
    return fftn(a, s, axes, norm, spec=spec, names=names)


def ifft2(
    a: PyTree,
    s: Sequence[int] | None = None,
    axes: Sequence[Axis] = (-2, -1),
    norm: str | None = None,
    *,
    spec: Checked[P | None] = None,
    names: Names = None,
) -> PyTree:
    """[`eqpar.fft.ifftn`][] over two axes, the last two by default, as
    `jnp.fft.ifft2`.

    !!! example

        ```python
        import jax, jax.numpy as jnp, numpy as np, eqpar
        from jax.sharding import NamedSharding, PartitionSpec as P

        mesh = jax.make_mesh((jax.device_count(),), ("rows",))
        x = jax.random.normal(jax.random.key(0), (8 * jax.device_count(), 16))
        x = jax.device_put(x.astype(jnp.complex64), NamedSharding(mesh, P("rows")))
        np.testing.assert_allclose(eqpar.fft.ifft2(eqpar.fft.fft2(x)), x, atol=1e-5)
        ```
    """
    return ifftn(a, s, axes, norm, spec=spec, names=names)


def rfftn(
    a: PyTree,
    s: Sequence[int] | None = None,
    axes: Sequence[Axis] | None = None,
    norm: str | None = None,
    *,
    spec: Checked[P | None] = None,
    names: Names = None,
) -> PyTree:
    """The N-D FFT of a real array, as `jnp.fft.rfftn`: the last of `axes` keeps
    its non-negative frequencies only (`n // 2 + 1` of them), so it must not be
    split over devices. Arguments as [`eqpar.fft.fftn`][].

    !!! example

        ```python
        import jax, jax.numpy as jnp, numpy as np, eqpar
        from jax.sharding import NamedSharding, PartitionSpec as P

        mesh = jax.make_mesh((jax.device_count(),), ("rows",))
        x = jax.random.normal(jax.random.key(0), (8 * jax.device_count(), 16, 16))
        x = jax.device_put(x, NamedSharding(mesh, P("rows")))  # the last axis whole
        y = eqpar.fft.rfftn(x)
        assert y.shape == (8 * jax.device_count(), 16, 9)
        np.testing.assert_allclose(y, jnp.fft.rfftn(x), rtol=1e-4, atol=1e-4)
        ```
    """
    return _transform(
        a, _Kind.R2C, False, axes, _lengths(s), norm, spec, names, "rfftn"
    )


def irfftn(
    a: PyTree,
    s: Sequence[int] | None = None,
    axes: Sequence[Axis] | None = None,
    norm: str | None = None,
    *,
    spec: Checked[P | None] = None,
    names: Names = None,
) -> PyTree:
    """The inverse of [`eqpar.fft.rfftn`][], as `jnp.fft.irfftn` (real output; the
    last of `axes` must not be split over devices).

    !!! example

        ```python
        import jax, jax.numpy as jnp, numpy as np, eqpar
        from jax.sharding import NamedSharding, PartitionSpec as P

        mesh = jax.make_mesh((jax.device_count(),), ("rows",))
        x = jax.random.normal(jax.random.key(0), (8 * jax.device_count(), 16, 16))
        x = jax.device_put(x, NamedSharding(mesh, P("rows")))
        np.testing.assert_allclose(eqpar.fft.irfftn(eqpar.fft.rfftn(x), s=x.shape), x,
                                   atol=1e-5)
        ```
    """
    return _transform(
        a, _Kind.C2R, True, axes, _lengths(s), norm, spec, names, "irfftn"
    )


def rfft(
    a: PyTree,
    n: int | None = None,
    axis: Axis = -1,
    norm: str | None = None,
    *,
    spec: Checked[P | None] = None,
    names: Names = None,
) -> PyTree:
    """The 1-D FFT of a real array, as `jnp.fft.rfft`, along a dimension that is
    not split over devices (the others may be).

    !!! example

        ```python
        import jax, jax.numpy as jnp, numpy as np, eqpar
        from jax.sharding import NamedSharding, PartitionSpec as P

        mesh = jax.make_mesh((jax.device_count(),), ("rows",))
        x = jax.random.normal(jax.random.key(0), (8 * jax.device_count(), 16))
        x = jax.device_put(x, NamedSharding(mesh, P("rows")))
        np.testing.assert_allclose(eqpar.fft.rfft(x), jnp.fft.rfft(x), rtol=1e-4,
                                   atol=1e-4)
        ```
    """
    return _transform(
        a, _Kind.R2C, False, (axis,), _lengths(n), norm, spec, names, "rfft"
    )


def irfft(
    a: PyTree,
    n: int | None = None,
    axis: Axis = -1,
    norm: str | None = None,
    *,
    spec: Checked[P | None] = None,
    names: Names = None,
) -> PyTree:
    """The inverse of [`eqpar.fft.rfft`][], as `jnp.fft.irfft`.

    !!! example

        ```python
        import jax, jax.numpy as jnp, numpy as np, eqpar
        from jax.sharding import NamedSharding, PartitionSpec as P

        mesh = jax.make_mesh((jax.device_count(),), ("rows",))
        x = jax.random.normal(jax.random.key(0), (8 * jax.device_count(), 16))
        x = jax.device_put(x, NamedSharding(mesh, P("rows")))
        back = eqpar.fft.irfft(eqpar.fft.rfft(x), n=16)
        np.testing.assert_allclose(back, x, atol=1e-5)
        ```
    """
    return _transform(
        a, _Kind.C2R, True, (axis,), _lengths(n), norm, spec, names, "irfft"
    )


# ----------------------------------------------------------------------------------
# Plans: what to do to one array, hashable (a static argument of the jitted program)


class _Kind:
    C2C = "c2c"  # complex to complex
    R2C = "r2c"  # real to complex: the last axis halves (rfft)
    C2R = "c2r"  # complex to real: the last axis is restored (irfft)


@dataclasses.dataclass(frozen=True)
class _Plan:
    kind: str
    inverse: bool
    axes: tuple[int, ...]  # non-negative, in the order given
    lengths: tuple[int | None, ...]  # per axis: the transform's length, None = as is
    norm: str | None
    who: str  # the public name, for errors
    where: str  # the leaf, for errors


def _lengths(s: Any) -> tuple[int | None, ...] | None:
    if s is None:
        return None
    return (s,) if isinstance(s, int) else tuple(s)


def _transform(
    a: Any,
    kind: str,
    inverse: bool,
    axes: Sequence[Axis] | None,
    lengths: tuple[int | None, ...] | None,
    norm: str | None,
    spec: Any,
    names: Names,
    who: str,
) -> Any:
    who = f"eqpar.fft.{who}"
    if spec is not None and not isinstance(spec, P):
        raise SpecError(
            f"{who} got spec={spec!r}; it must be a `jax.sharding.PartitionSpec` "
            "(the block's `in_specs` entry inside `eqpar.filter_shard_map`, e.g. "
            "`P('rows')`)."
        )
    if isinstance(axes, (int, str)):
        axes = (axes,)

    def leaf(path: Any, x: Any) -> Any:
        where = f"the leaf at {jtu.keystr(path)}" if path else "the array"
        x = jnp.asarray(x)
        known = _leaf_names(names, a, path, x.ndim, who, where)
        resolved = _resolve_axes(axes, lengths, x.ndim, known, who, where)
        given = lengths or (None,) * len(resolved)
        plan = _Plan(kind, inverse, resolved, tuple(given), norm, who, where)
        return _leaf(x, plan, spec)

    return jtu.tree_map_with_path(lambda p, x: leaf(p, x) if is_array(x) else x, a)


def _leaf_names(
    names: Names, tree: Any, path: Any, ndim: int, who: str, where: str
) -> list[str | None] | None:
    if names is None:
        return dimension_names(tree, path)
    if isinstance(names, str):
        return names_in(names, ndim)
    known = list(names)
    if len(known) != ndim:
        raise SpecError(
            f"{who} got names={names!r} ({len(known)} names) for {where}, which has "
            f"{ndim} dimensions: give one name (or None) per dimension, or a "
            "jaxtyping dimension string such as '*batch y x'."
        )
    return known


def _resolve_axes(
    axes: Sequence[Axis] | None,
    lengths: tuple[int | None, ...] | None,
    ndim: int,
    names: list[str | None] | None,
    who: str,
    where: str,
) -> tuple[int, ...]:
    if axes is None:
        count = ndim if lengths is None else len(lengths)
        return tuple(range(ndim - count, ndim))
    out = []
    for axis in axes:
        if isinstance(axis, str):
            if names is None or axis not in names:
                known = (
                    f"its dimensions are named {names}"
                    if names is not None
                    else "its dimensions have no names (it is not a Module field "
                    "annotated e.g. `Complex[Array, 'y x']`, and no `names=` was "
                    "given)"
                )
                raise SpecError(
                    f"{who} was asked to transform along {axis!r} of {where} (shape "
                    f"of rank {ndim}), but {known}. Name the dimensions with "
                    "`names='... y x'`, or give the axes by position."
                )
            out.append(names.index(axis))
            continue
        if (
            isinstance(axis, bool)
            or not isinstance(axis, int)
            or not (-ndim <= axis < ndim)
        ):
            raise SpecError(
                f"{who} got the axis {axis!r} for {where} of rank {ndim}: an axis is "
                "a position in range(-rank, rank) or a dimension name."
            )
        out.append(axis % ndim)
    if len(set(out)) != len(out):
        raise SpecError(f"{who} got repeated axes {tuple(axes)} for {where}.")
    if lengths is not None and len(lengths) != len(out):
        raise SpecError(
            f"{who} got {len(lengths)} lengths `s`={lengths} for {len(out)} axes "
            f"{tuple(axes)} of {where}: give one length per axis."
        )
    return tuple(out)


# ----------------------------------------------------------------------------------
# Where an array is: inside a shard_map (a block), placed on a mesh, or neither


def _leaf(x: Any, plan: _Plan, spec: P | None) -> Any:
    manual = tuple(jax.sharding.get_abstract_mesh().manual_axes)
    if spec is not None:
        full = _full_spec(spec, x.ndim, plan)
        named = spec_axes(full)
        if manual and all(a in manual for a in named):
            return _block(x, plan, full)  # a device's block, inside a shard_map
        if manual:
            raise SpecError(
                f"{plan.who} got spec={spec} for {plan.where} inside a `shard_map` "
                f"that binds mesh axes {list(manual)}, but the spec names "
                f"{[a for a in named if a not in manual]}, which are not bound here. "
                "Give the block's `in_specs` entry (over the shard_map's axes)."
            )
        if not named:
            return _block(x, plan, full)  # replicated: every device does it all
        return _global(x, plan, _spec_mesh(x, plan), full)
    if manual:
        raise SpecError(
            f"{plan.who} was called on {plan.where} inside a `shard_map` (mesh axes "
            f"{list(manual)} are bound), where it sees one device's block and "
            "cannot tell how the whole array is split. Pass the block's spec, the "
            "`in_specs` entry it was split by: e.g. `spec=P('rows')`, or `spec=P()` "
            "for a block that is whole on every device."
        )
    placed = _placement(x)
    if placed is None:
        return _block(x, plan, P(*[None] * x.ndim))  # not split: jnp.fft
    mesh, found = placed
    return _global(x, plan, mesh, _full_spec(found, x.ndim, plan))


def _full_spec(spec: P, ndim: int, plan: _Plan) -> P:
    if len(spec) > ndim:
        raise SpecError(
            f"{plan.who} got spec={spec} ({len(spec)} entries) for {plan.where} of "
            f"rank {ndim}: a spec may not be longer than the rank."
        )
    return P(*spec, *[None] * (ndim - len(spec)))


def _placement(x: Any) -> tuple[AnyMesh, P] | None:
    """The mesh and spec of an array split over several devices: a concrete
    array's `NamedSharding`, or the placement in a tracer's type (Explicit mesh
    axes only). `None` when it is not split (or its placement is unknown)."""
    if isinstance(x, jax.core.Tracer):
        sharding = jax.typeof(x).sharding
        mesh = getattr(sharding, "mesh", None)
        if mesh is None or mesh.empty:
            return None
        explicit = {
            n
            for n, t in zip(mesh.axis_names, mesh.axis_types)
            if t == AxisType.Explicit
        }
        if not any(a in explicit for a in spec_axes(sharding.spec)):
            return None
        return mesh, sharding.spec
    sharding = getattr(x, "sharding", None)
    if not isinstance(sharding, NamedSharding) or not spec_axes(sharding.spec):
        return None
    return sharding.mesh, sharding.spec


def _spec_mesh(x: Any, plan: _Plan) -> AnyMesh:
    """The mesh for a `spec=` given outside a shard_map: the array's own, else the
    context mesh."""
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding) and not isinstance(x, jax.core.Tracer):
        return sharding.mesh
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        raise MeshError(
            f"{plan.who} got a `spec=` for {plan.where}, which is not placed on any "
            "mesh, and no mesh is set: place it first (`eqpar.filter_device_put`), "
            "or set one with `jax.set_mesh(mesh)` around the call."
        )
    return mesh


def _global(x: Any, plan: _Plan, mesh: AnyMesh, spec: P) -> Any:
    """The whole array's transform, each device working on its block in a
    shard_map; the result placed as `x`."""
    check_spec(spec, mesh, lambda: plan.where, plan.who)
    check_divides(spec, x.shape, mesh, lambda: plan.where, plan.who)
    return _program(mesh, spec, plan)(x)


@functools.lru_cache(maxsize=256)
def _program(mesh: AnyMesh, spec: P, plan: _Plan) -> Callable[[Any], Any]:
    """One jitted shard_map per (mesh, spec, plan): jit's cache does the rest."""
    body = functools.partial(_block, plan=plan, spec=spec)
    return jax.jit(
        jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=True)
    )


# ----------------------------------------------------------------------------------
# One device's block


def _block(x: Any, plan: _Plan, spec: P) -> Any:
    """The transform of the whole array, computed on this device's block `x`
    (split as `spec` says over bound mesh axes), returning this device's block."""
    axes, lengths = plan.axes, plan.lengths
    split = {a: spec[a] for a in axes if spec[a] is not None}
    for axis, length in zip(axes, lengths):
        if axis in split and length is not None:
            whole = x.shape[axis] * axis_size(split[axis])
            if length != whole:
                raise SpecError(
                    f"{plan.who} was asked for a transform of length {length} along "
                    f"dimension {axis} of {plan.where}, which is split over "
                    f"{split[axis]!r} (size {whole}): crop or pad a split dimension "
                    "before the transform (or leave `s`/`n` out)."
                )
    if plan.kind == _Kind.C2C:
        return _c2c(x, axes, lengths, spec, plan)
    last, rest = axes[-1], axes[:-1]
    if last in split:
        raise SpecError(
            f"{plan.who} transforms the last of its axes, dimension {last} of "
            f"{plan.where}, as a real signal (half the frequencies), so it must be "
            f"whole on each device, but it is split over {split[last]!r}. Put a "
            "dimension that is not split last in `axes`, or use the complex "
            "`eqpar.fft.fftn`."
        )
    if plan.kind == _Kind.R2C:
        x = jnp.fft.rfft(x, n=lengths[-1], axis=last, norm=plan.norm)
        return _c2c(x, rest, lengths[:-1], spec, plan)
    x = _c2c(x, rest, lengths[:-1], spec, plan)
    return jnp.fft.irfft(x, n=lengths[-1], axis=last, norm=plan.norm)


def _c2c(
    x: Any, axes: tuple[int, ...], lengths: tuple[int | None, ...], spec: P, plan: _Plan
) -> Any:
    """Complex FFTs over `axes`: along whole dimensions at once, then along each
    split one between two all-to-alls that make it whole and put it back."""
    transform = jnp.fft.ifftn if plan.inverse else jnp.fft.fftn
    whole = [(a, n) for a, n in zip(axes, lengths) if spec[a] is None]
    if whole:
        s = (
            None
            if all(n is None for _, n in whole)
            else [_len(x, a, n) for a, n in whole]
        )
        x = transform(x, s=s, axes=[a for a, _ in whole], norm=plan.norm)
    for axis in (a for a in axes if spec[a] is not None):
        mesh_axes = spec[axis]
        partner = _partner(x, axis, mesh_axes, spec, plan)
        x = all_to_all(x, mesh_axes, split_axis=partner, concat_axis=axis, tiled=True)
        x = transform(x, axes=[axis], norm=plan.norm)
        x = all_to_all(x, mesh_axes, split_axis=axis, concat_axis=partner, tiled=True)
    return x


def _len(x: Any, axis: int, n: int | None) -> int:
    return x.shape[axis] if n is None else n


def _partner(x: Any, axis: int, mesh_axes: Hashable, spec: P, plan: _Plan) -> int:
    """The dimension to trade places with `axis` (split over `mesh_axes`): one whose
    block the axis size divides, preferring whole dimensions, then the largest."""
    n = axis_size(mesh_axes)
    fits = [d for d in range(x.ndim) if d != axis and x.shape[d] % n == 0]
    if not fits:
        raise AxisSizeError(
            f"{plan.who} transforms {plan.where} along dimension {axis}, which is "
            f"split over {mesh_axes!r} ({n} devices). Making it whole on each device "
            f"(an all-to-all) splits another dimension {n} ways instead, but no other "
            f"dimension of the block (shape {tuple(x.shape)}) has a size divisible by "
            f"{n}. Pad a dimension to a multiple of {n} (e.g. with `jnp.pad`, "
            "and crop after), or split the array along a dimension that is not "
            "transformed."
        )
    return max(fits, key=lambda d: (spec[d] is None, x.shape[d], -d))
