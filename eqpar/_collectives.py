"""Pytree-aware collectives that mean the same under every transform binding an axis.

Each acts on the array leaves of any pytree and returns the other leaves (static
Module fields, `None`, Python objects) untouched. They work under
`filter_vmap(axis_name=...)`, `filter_pmap(axis_name=...)` and `filter_shard_map`
(whose mesh axes are bound), and raise `UnboundAxisError` anywhere else.

A Python number (outside a Module, whose non-array fields are static) means what it
means to `jax.lax`: a constant, the same on every device, so `psum(1, name)` is the
axis size and `pmean(2.5, name)` is `2.5`.

Replication typing (`check_vma=True` in `shard_map`): an invariant value (one that is
the same on every device, e.g. a `P()` input) is cast to varying before a collective
that needs a varying operand (`all_gather`, `pmax`, ...), so those accept any
operand, now and when JAX stops casting implicitly. `psum` and `pmean` of an
invariant floating-point array are errors (`eqpar.ReplicationError`): the value is
the same everywhere already, and the usual way to get one is the gradient of a
replicated parameter, which autodiff has already summed over the devices, so
averaging it again would give n times the mean gradient.
"""

from collections.abc import Callable, Hashable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from ._errors import AxisSizeError, ReplicationError, SpecError, UnboundAxisError
from ._specs import is_array
from ._vma import (
    axis_names,
    AxisName,
    manual_axes,
    to_varying,
    typed,
    varying_axes as varying_axes,
    vmap_axis_error,
)


def axis_size(axis_name: AxisName) -> int:
    """The size of a bound axis (the product of sizes for a tuple of names).

    Raises `eqpar.UnboundAxisError` if no enclosing transform binds the name.

    !!! example

        ```python
        import jax, jax.numpy as jnp, eqpar

        sizes = eqpar.filter_vmap(
            lambda x: x * 0 + eqpar.axis_size("i"), axis_name="i"
        )(jnp.zeros(5, dtype=jnp.int32))
        assert (sizes == 5).all()
        ```
    """
    try:
        return jax.lax.axis_size(axis_name)
    except NameError:
        bound = []
        for name in axis_names(axis_name):
            try:
                jax.lax.axis_size(name)
                bound.append(name)
            except NameError:
                pass
        missing = [n for n in axis_names(axis_name) if n not in bound]
        raise UnboundAxisError(
            f"Axis name {missing[0]!r} is not bound here"
            + (f" (of {axis_name!r})" if isinstance(axis_name, tuple) else "")
            + ". A collective needs an enclosing transform that binds the name: "
            "`eqpar.filter_vmap(..., axis_name=...)`, `eqpar.filter_pmap(..., "
            "axis_name=...)`, or `eqpar.filter_shard_map` (which binds the names of "
            "its mesh's axes). `jax.set_mesh` alone does not bind axis names."
        ) from None


def mark_varying(tree: PyTree, axis_name: AxisName) -> PyTree:
    """Marks the array leaves of `tree` as varying over `axis_name` (per device).

    Under `filter_shard_map` with `check_vma=True`, differentiating with respect to a
    replicated (`P()`) input gives a gradient that autodiff has already summed over
    the axis. Marking the parameters varying first (`jax.lax.pcast(...,
    to="varying")` on each array leaf, leaving Module static fields alone) keeps
    each device's gradient its own. Elsewhere (under `vmap`, `filter_pmap`, or
    `check_vma=False`) values are per device already and this returns `tree`.

    !!! warning

        This is a building block of [`eqpar.filter_value_and_grad_mean`][]; for
        gradients use that. With parameters marked varying, the gradient of a loss
        that is reduced across devices (`pmean`/`psum` inside the loss) is each
        device's share of that one loss, not its own gradient, so averaging it with
        [`eqpar.grad_mean`][] is off by the device count. `filter_value_and_grad_mean`
        handles every kind of loss.

    !!! example

        ```python
        import jax, jax.numpy as jnp, eqpar
        from jax.sharding import PartitionSpec as P

        mesh = jax.make_mesh((jax.device_count(),), ("data",))

        @eqpar.filter_shard_map(mesh=mesh, in_specs=P(), out_specs=P())
        def types(w):
            return eqpar.varying_axes(w), eqpar.varying_axes(
                eqpar.mark_varying(w, "data")
            )

        before, after = types(jnp.ones(3))
        assert before == frozenset() and after == frozenset({"data"})
        ```
    """
    axis_size(axis_name)
    manual = manual_axes(axis_name)
    if not typed(manual):
        return tree
    return _map_arrays(lambda x: to_varying(jnp.asarray(x), manual), tree)


def _map_arrays(fn: Callable[[Any], Any], tree: Any) -> Any:
    return jtu.tree_map(lambda x: fn(x) if is_array(x) else x, tree)


def _is_number(x: Any) -> bool:
    """A Python number (NumPy scalars are arrays, see `is_array`)."""
    return isinstance(x, (bool, int, float, complex))


def _unmapped_names(axis_name: AxisName) -> list[Hashable]:
    """The names among `axis_name` that JAX cannot reduce over here: `vmap` axes
    (bound by `filter_vmap(axis_name=...)` or `jax.vmap`) inside a `shard_map` with
    replication checking on. JAX's `check_vma` typing knows only mesh axes and fails
    with a bare `AssertionError` on the others."""
    manual = tuple(jax.sharding.get_abstract_mesh().manual_axes)
    others = [n for n in axis_names(axis_name) if n not in manual]
    return others if others and typed(manual) else []


def _collective(
    op: Callable[..., Any], tree: Any, axis_name: AxisName, **kwargs: Any
) -> Any:
    """Applies `op` to each array leaf, and to each Python number outside a Module
    as `jax.lax` does (a constant: `psum(1, name)` is the axis size)."""
    axis_size(axis_name)
    manual = manual_axes(axis_name)
    cast = typed(manual)
    unmapped = _unmapped_names(axis_name)

    sums = op in (jax.lax.psum, jax.lax.pmean)

    def apply(path: Any, x: Any) -> Any:
        if unmapped:
            raise vmap_axis_error(f"The axis {unmapped} of `eqpar.{_op_name(op)}`")
        x = jnp.asarray(x)
        if cast:
            same = [a for a in manual if a not in varying_axes(x)]
            if sums and same and jnp.issubdtype(x.dtype, jnp.inexact):
                raise _invariant_sum_error(_op_name(op), path, same, axis_name)
            x = to_varying(x, manual)
        return op(x, axis_name, **kwargs)

    def visit(path: Any, x: Any) -> Any:
        if isinstance(x, eqx.Module):  # a Module's non-array fields are static
            return jtu.tree_map_with_path(
                lambda p, y: apply(path + p, y) if is_array(y) else y, x
            )
        if is_array(x):
            return apply(path, x)
        if _is_number(x):
            return op(x, axis_name, **kwargs)
        return x

    return jtu.tree_map_with_path(visit, tree, is_leaf=_is_module)


def _invariant_sum_error(
    op: str, path: Any, same: list[Hashable], axis_name: AxisName
) -> ReplicationError:
    where = jtu.keystr(path) or "(root)"
    name = same[0]
    return ReplicationError(
        f"eqpar.{op} over {axis_name!r} got the leaf at {where}, which is already the "
        f"same on every device along {same} (invariant: replication checking, "
        f"`check_vma=True`): `pmean` would return it unchanged and `psum` n times "
        "it. If it is the gradient of a replicated parameter, autodiff has already "
        "summed it over the devices, so averaging it here would give n times the "
        "mean gradient: differentiate with "
        f"`eqpar.filter_value_and_grad_mean(loss, {name!r})` instead (or divide "
        f"the gradient by `eqpar.axis_size({name!r})`). If it is a value that is "
        "the same everywhere on purpose, it needs no collective. (`Parallel` and "
        "`filter_pmap` run without replication checking, where `jax.grad` gives "
        "each device its own gradient and `pmean` of it is the mean, as under "
        "`jax.pmap`.)"
    )


def _is_module(x: Any) -> bool:
    return isinstance(x, eqx.Module)


def _op_name(op: Callable[..., Any]) -> str:
    return getattr(op, "__name__", "collective")


def psum(tree: PyTree, axis_name: AxisName) -> PyTree:
    """Sum of every array leaf over the devices (or elements) of `axis_name`.

    **Arguments:**

    - `tree`: any pytree. Array leaves are summed; a Python number is a constant,
        as in `jax.lax.psum` (so `psum(1, name)` is the axis size); other leaves
        (and a Module's non-array fields) pass through.
    - `axis_name`: a bound axis name, or a tuple of names (e.g. `("data", "model")`).

    **Returns:**

    The same structure, each array leaf replaced by its sum over the axis (the same
    on every device). Under replication checking (`filter_shard_map`'s default
    `check_vma=True`) a floating-point leaf that is already the same on every
    device raises `eqpar.ReplicationError` (for `psum` and `pmean` alike): it is
    usually a gradient that autodiff has already summed over the devices.

    !!! example

        ```python
        import jax, jax.numpy as jnp, eqpar

        @eqpar.filter_vmap(axis_name="i")
        def share(x):
            return x / eqpar.psum(1, "i"), eqpar.psum(x, "i")

        part, total = share(jnp.arange(4.0))
        assert (part == jnp.arange(4.0) / 4).all() and (total == 6.0).all()
        ```
    """
    return _collective(jax.lax.psum, tree, axis_name)


def pmean(tree: PyTree, axis_name: AxisName) -> PyTree:
    """Mean of every array leaf over `axis_name`. Arguments as [`eqpar.psum`][].

    !!! example

        ```python
        import jax.numpy as jnp, eqpar

        means = eqpar.filter_vmap(lambda x: eqpar.pmean(x, "i"), axis_name="i")(
            {"a": jnp.arange(4.0), "name": "kept"}
        )
        assert (means["a"] == 1.5).all() and means["name"] == "kept"
        ```
    """
    return _collective(jax.lax.pmean, tree, axis_name)


def pmax(tree: PyTree, axis_name: AxisName) -> PyTree:
    """Elementwise maximum of every array leaf over `axis_name`. Arguments as
    [`eqpar.psum`][].

    !!! example

        ```python
        import jax.numpy as jnp, eqpar

        top = eqpar.filter_vmap(lambda x: eqpar.pmax(x, "i"), axis_name="i")(
            jnp.array([3.0, -1.0, 7.0])
        )
        assert (top == 7.0).all()
        ```
    """
    return _collective(jax.lax.pmax, tree, axis_name)


def pmin(tree: PyTree, axis_name: AxisName) -> PyTree:
    """Elementwise minimum of every array leaf over `axis_name`. Arguments as
    [`eqpar.psum`][].

    !!! example

        ```python
        import jax.numpy as jnp, eqpar

        low = eqpar.filter_vmap(lambda x: eqpar.pmin(x, "i"), axis_name="i")(
            jnp.array([3.0, -1.0, 7.0])
        )
        assert (low == -1.0).all()
        ```
    """
    return _collective(jax.lax.pmin, tree, axis_name)


def all_gather(
    tree: PyTree, axis_name: AxisName, *, axis: int = 0, tiled: bool = False
) -> PyTree:
    """Every device's value of each array leaf, on every device.

    **Arguments:**

    - `tree`, `axis_name`: as [`eqpar.psum`][].
    - `axis`: where the gathered axis goes in each result.
    - `tiled`: `False` stacks (a new axis of the axis size); `True` concatenates along
        the existing `axis`.

    !!! example

        ```python
        import jax.numpy as jnp, eqpar

        x = jnp.arange(3.0)
        seen = eqpar.filter_vmap(lambda v: eqpar.all_gather(v, "i"), axis_name="i")(x)
        assert (seen == jnp.stack([x, x, x])).all()  # each element sees all of x
        ```
    """
    return _collective(jax.lax.all_gather, tree, axis_name, axis=axis, tiled=tiled)


def psum_scatter(
    tree: PyTree,
    axis_name: AxisName,
    *,
    scatter_dimension: int = 0,
    tiled: bool = False,
) -> PyTree:
    """Sum over `axis_name`, each device keeping its own slice of the result along
    `scatter_dimension` (a reduce-scatter).

    With `tiled=False` that dimension must equal the axis size and is removed; with
    `tiled=True` it must be a multiple of it and is divided by it.

    !!! example

        ```python
        import jax, jax.numpy as jnp, eqpar
        from jax.sharding import PartitionSpec as P

        n = jax.device_count()
        mesh = jax.make_mesh((n,), ("data",))
        x = jnp.ones((n, 2 * n))  # one row per device
        parts = eqpar.filter_shard_map(
            lambda row: eqpar.psum_scatter(row[0], "data", tiled=True),
            mesh=mesh, in_specs=P("data"), out_specs=P("data"),
        )(x)
        assert parts.shape == (2 * n,) and (parts == n).all()
        ```
    """
    n = axis_size(axis_name)

    def psum_scatter(x: Any, name: AxisName, **kwargs: Any) -> Any:
        shape = jnp.shape(x)
        if not -len(shape) <= scatter_dimension < len(shape):
            raise SpecError(
                f"psum_scatter got scatter_dimension={scatter_dimension} for a value "
                f"of shape {shape}, which has no such dimension: each device keeps a "
                "slice of the sum along that dimension, so it must exist (a scalar "
                "cannot be scattered; use `eqpar.psum` for it)."
            )
        size = shape[scatter_dimension]
        if (size % n) if tiled else (size != n):
            raise AxisSizeError(
                f"psum_scatter(tiled={tiled}) got a value of shape {shape} whose "
                f"dimension {scatter_dimension} has size {size}, but the axis "
                f"{axis_name!r} has {n} devices: with tiled=False that dimension "
                "must equal the axis size, with tiled=True be a multiple of it."
            )
        return jax.lax.psum_scatter(x, name, **kwargs)

    return _collective(
        psum_scatter,
        tree,
        axis_name,
        scatter_dimension=scatter_dimension,
        tiled=tiled,
    )


def sensor_sum(
    x: PyTree, *, axis: int = 0, axis_name: AxisName | None = None
) -> PyTree:
    """A camera's sum: add the local planes along `axis`, then add across devices, so
    every device holds the identical full image.

    This is Chromatix's sensor (`reduce_axis` + `reduce_parallel_axis_name`): depth
    planes split across devices are imaged locally and summed once.

    **Arguments:**

    - `x`: an array (or pytree of arrays) with a plane axis.
    - `axis`: the local plane axis to sum.
    - `axis_name`: the device axis the planes are split over; `None` sums locally
        only.

    **Returns:**

    `x` summed over `axis` (and over `axis_name`).

    !!! example

        ```python
        import jax, jax.numpy as jnp, eqpar
        from jax.sharding import PartitionSpec as P

        mesh = jax.make_mesh((jax.device_count(),), ("planes",))
        planes = jnp.ones((8 * jax.device_count(), 4, 4))
        image = eqpar.filter_shard_map(
            lambda p: eqpar.sensor_sum(p, axis_name="planes"),
            mesh=mesh, in_specs=P("planes"), out_specs=P(),
        )(planes)
        assert (image == 8 * jax.device_count()).all()
        ```
    """
    local = _map_arrays(lambda leaf: jnp.sum(leaf, axis=axis), x)
    return local if axis_name is None else psum(local, axis_name)


def ring_shift(tree: PyTree, axis_name: AxisName, *, shift: int = 1) -> PyTree:
    """Sends each device's array leaves `shift` steps along the ring of `axis_name`:
    device `i` receives what device `i - shift` held (indices modulo the axis size).

    The building block of ring algorithms in `shard_map` kernels (e.g. a ring
    all-gather matmul: multiply the local block, pass it on, repeat).

    !!! example

        ```python
        import jax.numpy as jnp, eqpar

        shifted = eqpar.filter_vmap(
            lambda x: eqpar.ring_shift(x, "i", shift=1), axis_name="i"
        )(jnp.arange(4))
        assert shifted.tolist() == [3, 0, 1, 2]
        ```
    """
    n = axis_size(axis_name)
    perm = [(i, (i + shift) % n) for i in range(n)]
    return _collective(jax.lax.ppermute, tree, axis_name, perm=perm)


def halo_exchange(
    x: Array,
    axis_name: AxisName,
    *,
    width: int,
    axis: int = 0,
    periodic: bool = False,
) -> Array:
    """Extends each device's block of a sharded array by `width` entries from each
    neighbour along `axis`, for stencils and convolutions over sharded data.

    **Arguments:**

    - `x`: this device's block, sharded along `axis` over `axis_name`.
    - `axis_name`: the mesh axis the blocks are split over (device `i` holds the
        `i`-th block).
    - `width`: how many entries to take from each neighbour (at most the block's
        size along `axis`).
    - `axis`: the sharded array axis.
    - `periodic`: wrap around at the ends; otherwise the outer halos of the first and
        last blocks are zeros (zero padding).

    **Returns:**

    The block with `width` entries prepended (from the previous device) and appended
    (from the next), so its size along `axis` grows by `2 * width`.

    !!! example

        A three-point moving sum over an array split across devices equals the one
        computed on the whole array:

        ```python
        import jax, jax.numpy as jnp, eqpar
        from jax.sharding import PartitionSpec as P

        n = jax.device_count()
        mesh = jax.make_mesh((n,), ("data",))
        x = jnp.arange(4.0 * n)

        @eqpar.filter_shard_map(mesh=mesh, in_specs=P("data"), out_specs=P("data"))
        def moving_sum(block):
            halo = eqpar.halo_exchange(block, "data", width=1)
            return halo[:-2] + halo[1:-1] + halo[2:]

        padded = jnp.pad(x, 1)
        assert jnp.allclose(moving_sum(x), padded[:-2] + padded[1:-1] + padded[2:])
        ```
    """
    x = jnp.asarray(x)
    if isinstance(width, bool) or not isinstance(width, int) or width < 0:
        raise SpecError(f"`width` must be a non-negative int, got {width!r}.")
    if not -x.ndim <= axis < x.ndim:
        raise SpecError(
            f"halo_exchange got axis={axis} for a block of shape {x.shape} (rank "
            f"{x.ndim}); the axis must exist."
        )
    axis %= x.ndim
    if width > x.shape[axis]:
        raise AxisSizeError(
            f"halo_exchange got width={width} but the local block has only "
            f"{x.shape[axis]} entries along axis {axis} (block shape {x.shape}): a "
            "halo can only come from the immediate neighbour. Use fewer devices, a "
            "larger array, or a smaller width."
        )
    n = axis_size(axis_name)
    if width == 0:
        return x
    manual = manual_axes(axis_name)
    if typed(manual):  # the result mixes x with neighbours' (varying) rows
        x = to_varying(x, manual)
    last = jax.lax.slice_in_dim(x, x.shape[axis] - width, x.shape[axis], axis=axis)
    first = jax.lax.slice_in_dim(x, 0, width, axis=axis)
    # Always a full ring (vmap's ppermute accepts only full permutations); without
    # `periodic` the halos that wrapped around are zeroed.
    from_prev = ring_shift(last, axis_name, shift=1)
    from_next = ring_shift(first, axis_name, shift=-1)
    if not periodic:
        index = jax.lax.axis_index(axis_name)
        from_prev = jnp.where(index == 0, jnp.zeros_like(from_prev), from_prev)
        from_next = jnp.where(index == n - 1, jnp.zeros_like(from_next), from_next)
    return jnp.concatenate([from_prev, x, from_next], axis=axis)


def axis_index(axis_name: AxisName) -> Array:
    """This device's (or this element's) index along a bound axis, as `jax.lax`
    gives it.

    **Arguments:**

    - `axis_name`: a bound axis name, or a tuple of names; for a tuple the index
        counts over all of them, the last name fastest (the order in which a
        `PartitionSpec` entry `("data", "model")` lays out the blocks).

    **Returns:**

    An int32 scalar in `range(eqpar.axis_size(axis_name))`. Raises
    `eqpar.UnboundAxisError` if no enclosing transform binds the name.

    !!! example

        ```python
        import jax.numpy as jnp, eqpar

        ids = eqpar.filter_vmap(lambda x: eqpar.axis_index("i"), axis_name="i")(
            jnp.zeros(4)
        )
        assert (ids == jnp.arange(4)).all()
        ```
    """
    axis_size(axis_name)
    return jax.lax.axis_index(axis_name)


def all_to_all(
    tree: PyTree,
    axis_name: AxisName,
    *,
    split_axis: int,
    concat_axis: int,
    tiled: bool = False,
) -> PyTree:
    """Re-lays-out every array leaf over `axis_name`: each device splits its value
    along `split_axis` into one chunk per device, sends chunk `j` to device `j`, and
    joins the chunks it receives along `concat_axis` in device order.

    The step under a distributed FFT, Ulysses-style attention and expert
    dispatch: with `tiled=True`, an array sharded along `concat_axis` comes out
    sharded along `split_axis` instead, each device's block whole along
    `concat_axis`. Its gradient is the all-to-all the other way.

    **Arguments:**

    - `tree`: any pytree; array leaves are exchanged, other leaves (and a Module's
        non-array fields) pass through.
    - `axis_name`: a bound axis name, or a tuple of names (the device order is
        then [`eqpar.axis_index`][]'s).
    - `split_axis`: the dimension each leaf is split along (its size must be a
        multiple of the axis size with `tiled=True`, and equal to it with
        `tiled=False`).
    - `concat_axis`: the dimension the received chunks are joined along.
    - `tiled`: `True` divides `split_axis` by the axis size and multiplies
        `concat_axis` by it. `False` (as `jax.lax.all_to_all`) needs `split_axis`
        to equal the axis size; that dimension is removed and a new one, indexing
        the device each chunk came from, is inserted at `concat_axis`.

    **Returns:**

    The same structure with each array leaf exchanged.

    !!! example

        ```python
        import jax, jax.numpy as jnp, eqpar
        from jax.sharding import PartitionSpec as P

        n = jax.device_count()
        mesh = jax.make_mesh((n,), ("d",))
        x = jnp.arange(n * n * 2.0).reshape(n, 2 * n)  # split by rows
        # Each device's block of rows becomes a block of columns: the same array.
        y = eqpar.filter_shard_map(
            lambda b: eqpar.all_to_all(b, "d", split_axis=1, concat_axis=0, tiled=True),
            mesh=mesh, in_specs=P("d"), out_specs=P(None, "d"),
        )(x)
        assert (y == x).all()
        ```
    """
    n = axis_size(axis_name)

    def exchange(path: Any, x: Any) -> Any:
        shape = jnp.shape(x)
        where = jtu.keystr(path) or "(root)"
        for name, dim in (("split_axis", split_axis), ("concat_axis", concat_axis)):
            if isinstance(dim, bool) or not -len(shape) <= dim < len(shape):
                raise SpecError(
                    f"eqpar.all_to_all got {name}={dim!r} for the leaf at {where} of "
                    f"shape {shape}, which has no such dimension (rank "
                    f"{len(shape)}). Pass dimensions of the leaf; a scalar cannot be "
                    "split."
                )
        size = shape[split_axis]
        if (size % n) if tiled else (size != n):
            raise AxisSizeError(
                f"eqpar.all_to_all(tiled={tiled}) got the leaf at {where} of shape "
                f"{shape}, whose split_axis={split_axis} has size {size}, but the "
                f"axis {axis_name!r} has {n} devices: with tiled=True that size must "
                f"be a multiple of {n} (pad it, e.g. `jnp.pad`, to "
                f"{-(-size // n) * n}), with tiled=False equal to {n}."
            )
        return x

    checked = _map_arrays_with_path(exchange, tree)

    def all_to_all(x: Any, name: AxisName, **kwargs: Any) -> Any:
        if not jnp.ndim(x):  # a Python number outside a Module
            exchange((), x)
        return jax.lax.all_to_all(x, name, **kwargs)

    return _collective(
        all_to_all,
        checked,
        axis_name,
        split_axis=split_axis,
        concat_axis=concat_axis,
        tiled=tiled,
    )


def _map_arrays_with_path(fn: Callable[[Any, Any], Any], tree: Any) -> Any:
    return jtu.tree_map_with_path(lambda p, x: fn(p, x) if is_array(x) else x, tree)
