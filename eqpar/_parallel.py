"""`Parallel`: split a batch over the devices, run, reduce. Objax's front door, on
eqpar's dispatcher and `shard_map`.

One compiled program per call signature does all of it: per-example keys, padding to
a multiple of the device count, the per-device call with the axis name bound, the
reduction of the outputs and the trimming of the padding.
"""

import functools as ft
from collections.abc import Callable, Hashable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import PyTree

from ._collectives import varying_axes
from ._dispatch import Compiled, Transformed
from ._errors import AxisSizeError, MeshError, SpecError
from ._placement import STACK_REDUCTIONS
from ._shard_map import check_context_mesh, match_explicit
from ._specs import check_int_axes, is_array, leaf_names, resolve_call_specs
from ._vmap import AxisSpec


# "concat" | "mean" | "first" | None | callable (a `str`, not a Literal: see Reduce in
# _placement.py).
ParallelReduce = str | None | Callable[[Any], Any]


def _is_scalar_key(leaf: Any) -> bool:
    return (
        is_array(leaf)
        and np.ndim(leaf) == 0
        and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)
    )


def _parallel_run(
    reduce: ParallelReduce,
    axis_name: Hashable,
    in_axes: Any,
    fun: Any,
    args: tuple,
    kwargs: dict,
    mesh: Mesh,
) -> tuple[Any, list[NamedSharding]]:
    leaves, treedef = jtu.tree_flatten((fun, args, kwargs))
    axes = resolve_call_specs(
        in_axes, fun, args, kwargs, default=eqx.if_array(0), what="in_axes"
    )
    keys = [a is not None and _is_scalar_key(leaf) for leaf, a in zip(leaves, axes)]
    size = check_int_axes(
        [None if k else a for a, k in zip(axes, keys)],
        leaves,
        lambda: leaf_names(fun, args, kwargs),
        "in_axes",
    )
    if size is None:
        raise SpecError(
            "Parallel splits a batch along the mapped axis of its arguments, but no "
            "argument is mapped (every array leaf has in_axes None). Map the batch "
            "argument (the default maps axis 0 of every array)."
        )
    if size == 0:
        raise AxisSizeError(
            "Parallel got a batch of 0 examples: there is nothing to split over the "
            "devices. Skip the call for an empty batch."
        )
    devices = mesh.shape[axis_name]
    pad = (-size) % devices
    if pad and not (reduce == "concat"):
        raise AxisSizeError(
            f"Parallel(reduce={reduce!r}) got a batch of {size} examples, which does "
            f"not divide over {devices} devices. Padding would change the result: "
            f"the padded examples would enter the {reduce!r} reduction. Pad the "
            f"batch yourself to a multiple of {devices} (`eqpar.pad_batch`), pass a "
            "mask or count of the real examples and weight by it (e.g. "
            "`eqpar.grad_mean(..., count=...)`), or use reduce='concat', which pads "
            "and trims for you."
        )
    total = size + pad
    index = np.concatenate([np.arange(size), np.full(pad, size - 1)])

    inputs, specs, shardings, where = [], [], [], []
    for i, (leaf, axis, key) in enumerate(zip(leaves, axes, keys)):
        if not is_array(leaf):
            continue
        where.append(i)
        if key:  # one key per example, by global index: independent of device count
            value = jax.vmap(lambda j, k=leaf: jax.random.fold_in(k, j))(
                jnp.arange(total)
            )
            shardings.append(NamedSharding(mesh, P()))
        elif axis is None:
            value = leaf
            shardings.append(NamedSharding(mesh, P()))
        else:
            value = jnp.moveaxis(leaf, axis, 0)
            if pad:  # repeat the last example: valid inputs, trimmed afterwards
                value = jnp.take(value, index, axis=0)
            axis %= np.ndim(leaf)
            shardings.append(
                NamedSharding(mesh, P(*[None] * axis, axis_name) if not pad else P())
            )
        inputs.append(value)
        specs.append(P() if (axis is None and not key) else P(axis_name))

    out_specs: list[Any] = []  # filled while JAX traces `body` (see filter_pmap)
    structure: list[Any] = []

    def body(*values: Any) -> list[Any]:
        new = list(leaves)
        for i, value in zip(where, values):
            new[i] = value
        f, a, k = jtu.tree_unflatten(treedef, new)
        out = f(*a, **k)
        out_leaves, out_def = jtu.tree_flatten(out)
        arrays, leaf_specs, stacked, signature = [], [], [], []
        for leaf in out_leaves:
            if is_array(leaf):
                leaf, spec, is_stacked = _per_device_output(
                    jnp.asarray(leaf), reduce, axis_name, total // devices, pad
                )
                arrays.append(leaf)
                leaf_specs.append(spec)
                stacked.append(is_stacked)
                signature.append(None)
            else:
                signature.append(leaf)
        out_specs[:] = leaf_specs
        structure[:] = [out_def, signature, stacked]
        return arrays

    check_context_mesh(mesh, "Parallel")
    inputs = match_explicit(mesh, inputs, specs)
    outs = jax.shard_map(body, mesh=mesh, in_specs=tuple(specs), out_specs=out_specs)(
        *inputs
    )
    out_def, signature, stacked = structure
    if reduce == "concat":
        if pad:  # an Explicit axis cannot be sliced unevenly: gather, then trim
            outs = [match_explicit(mesh, [x], [P()])[0][:size] for x in outs]
    elif reduce is not None:
        # A stack left to reduce here: gather it first (an Explicit axis cannot be
        # indexed or handed to an arbitrary callable while sharded).
        fn = STACK_REDUCTIONS[reduce] if isinstance(reduce, str) else reduce
        outs = [
            fn(match_explicit(mesh, [x], [P()])[0]) if s else x
            for x, s in zip(outs, stacked)
        ]
    it = iter(outs)
    out = jtu.tree_unflatten(out_def, [next(it) if s is None else s for s in signature])
    return out, shardings


def _per_device_output(
    leaf: Any, reduce: ParallelReduce, axis_name: Hashable, per_device: int, pad: int
) -> tuple[Any, P, bool]:
    """One output leaf inside the per-device body: the value to return, its out_spec,
    and whether it comes back as a `(devices, ...)` stack still to be reduced.

    "first" and "mean" of a value every device holds identically (invariant over
    the axis, e.g. after `pmean`) is that value: it leaves each device as it is, with
    no stack to build or communicate. A varying value is averaged in place with one
    all-reduce ("mean"), or stacked for device 0's to be taken ("first").
    """
    if reduce == "concat":
        _check_concat(leaf, per_device, pad)
        return leaf, P(axis_name), False
    if reduce in ("first", "mean"):
        if axis_name not in varying_axes(leaf):
            return leaf, P(), False
        if reduce == "mean" and jnp.issubdtype(leaf.dtype, jnp.inexact):
            return jax.lax.pmean(leaf, axis_name), P(), False
    return leaf[None], P(axis_name), True


def _check_concat(leaf: Any, per_device: int, pad: int) -> None:
    if leaf.ndim == 0:
        raise SpecError(
            "Parallel(reduce='concat') concatenates each output along its first axis, "
            "but an output is a scalar. Return per-example values, or use "
            "reduce='mean', 'first' or None for per-device results."
        )
    if pad and leaf.shape[0] != per_device:
        raise SpecError(
            f"Parallel(reduce='concat') padded the batch, so it must trim the padding "
            f"from each output's first axis, but an output has {leaf.shape[0]} rows "
            f"where this device has {per_device} examples. Return per-example "
            "outputs, or pad the batch to a multiple of the device count yourself."
        )


@ft.lru_cache(maxsize=32)
def _default_mesh(axis_name: Hashable, devices: tuple[Any, ...]) -> Mesh:
    return Mesh(np.array(devices), (axis_name,), axis_types=(AxisType.Auto,))


class Parallel(eqx.Module):
    """Runs `fun` data-parallel: the batch (axis 0 of every mapped argument) is split
    over the devices, `fun` runs once per device on its shard with `axis_name` bound,
    and the per-device outputs are reduced.

    **Arguments:**

    - `fun`: the per-device function (plain function, method or callable Module);
        it sees its device's shard of each mapped argument.
    - `reduce`: how the outputs come back:
        - `"concat"` (default): concatenated along axis 0, in the original order,
            so a per-example function returns exactly what it would on one device.
            A batch that does not divide over the devices is padded (repeating the
            last example) and the padding trimmed.
        - `None`: stacked per device, `(devices, per_device, ...)`.
        - `"first"`: device 0's output; `"mean"`: the mean over devices. An
            output every device already holds alike (e.g. `pmean`-ed gradients or
            updated parameters) comes back as it is, with no stack built or moved:
            the cheap way to return a replicated model.
        - a callable applied to each output's `(devices, ...)` stack.
        These last four need a batch that divides (pad it with `eqpar.pad_batch`).
    - `axis_name`: the device axis name, for collectives inside `fun`.
    - `in_axes`: as [`eqpar.filter_vmap`][]: `None` broadcasts an argument to every
        device; non-array leaves are static.
    - `mesh`: a mesh with an axis `axis_name` (default: all devices).

    **Randomness:** a scalar typed key (`jax.random.key(seed)`) in a mapped argument
    becomes one key per example, `fold_in(key, example_index)`, sharded like the
    batch: `fun` gets its shard of keys (vmap over them), and the result is the same
    on 1, 2, 4 or 8 devices. A key given with `in_axes=None` is broadcast unchanged,
    so every device draws the *same* numbers: usually a bug.

    !!! example

        ```python
        import equinox as eqx, jax, jax.numpy as jnp, eqpar

        net = eqx.nn.Linear(3, 4, key=jax.random.key(0))
        x = jnp.ones((96, 3))
        forward = eqpar.filter_vmap(net)                # a pytree: net's arrays
        y = eqpar.Parallel(forward)(x)                  # (96, 4), as one device
        per_device = eqpar.Parallel(forward, reduce=None)(x)
        assert per_device.shape == (jax.device_count(), 96 // jax.device_count(), 4)
        ```
    """

    _call: Transformed
    reduce: ParallelReduce = eqx.field(static=True)
    axis_name: Hashable = eqx.field(static=True)

    def __init__(
        self,
        fun: Callable[..., Any],
        *,
        reduce: ParallelReduce = "concat",
        axis_name: Hashable = "devices",
        in_axes: PyTree[AxisSpec] = eqx.if_array(0),
        mesh: Mesh | None = None,
    ):
        if isinstance(reduce, str) and reduce not in ("concat", "mean", "first"):
            raise SpecError(
                f"Parallel got reduce={reduce!r}; use 'concat', 'mean', 'first', None "
                "or a callable on the (devices, ...) stack of each output."
            )
        if mesh is not None and axis_name not in mesh.axis_names:
            raise MeshError(
                f"Parallel's axis_name={axis_name!r} is not an axis of the mesh, "
                f"whose axes are {tuple(mesh.axis_names)}."
            )
        run = ft.partial(_parallel_run, reduce, axis_name, in_axes)
        if mesh is None:

            def context() -> Mesh:
                return _default_mesh(axis_name, tuple(jax.devices()))

        else:
            fixed = mesh

            def context() -> Mesh:
                return fixed

        self._call = Transformed(fun, Compiled(run, context_fn=context))
        self.reduce = reduce
        self.axis_name = axis_name

    @property
    def __wrapped__(self) -> Callable[..., Any]:
        return self._call._fun

    def __call__(self, /, *args: Any, **kwargs: Any) -> Any:
        return self._call(*args, **kwargs)
