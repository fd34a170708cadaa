"""`filter_pmap`: one device per mapped element, as `jit(shard_map)` over a 1-D mesh
(what `jax.pmap` itself now is), with the mapped-call plumbing of `filter_vmap`."""

import functools as ft
from collections.abc import Callable, Hashable, Sequence
from typing import Any, overload

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import PyTree

from ._dispatch import Compiled, decorator_or_call, Donate, transformed
from ._errors import AxisSizeError
from ._shard_map import check_context_mesh
from ._specs import is_array
from ._vmap import AxisSpec, MappedCall


_DEFAULT_AXIS_NAME = "_eqpar_pmap"


@ft.lru_cache(maxsize=64)
def _mesh(devices: tuple[Any, ...], axis_name: Hashable) -> Mesh:
    return Mesh(np.array(devices), (axis_name,), axis_types=(AxisType.Auto,))


def _pmap_run(
    in_axes: Any,
    out_axes: Any,
    axis_name: Hashable,
    axis_size: int | None,
    devices: tuple[Any, ...] | None,
    fun: Any,
    args: tuple,
    kwargs: dict,
    context: None,
) -> tuple[Any, list[NamedSharding]]:
    del context
    call = MappedCall(fun, args, kwargs, in_axes, out_axes, axis_size)
    available = devices if devices is not None else tuple(jax.devices())
    if call.size > len(available):
        raise AxisSizeError(
            f"filter_pmap maps an axis of size {call.size}, one element per device, "
            f"but only {len(available)} devices are available. Use a mapped size of "
            f"at most {len(available)}, or split the batch over devices instead "
            "(`filter_shard_map` with a `PartitionSpec`, or `filter_vmap` inside "
            "`filter_pmap` over a reshaped batch)."
        )
    if call.size == 0:
        raise AxisSizeError("filter_pmap cannot map an axis of size 0.")
    mesh = _mesh(tuple(available[: call.size]), axis_name)
    axis_of = dict(zip(call.index, call.axes))

    # Mapped leaves go in with their axis moved first (one row per device), then the
    # broadcast arrays, replicated. `shardings` says where the outer jit's inputs
    # (all array leaves, in flatten order) belong, for placing unplaced inputs.
    inputs = [jnp.moveaxis(x, a, 0) for x, a in zip(call.mapped, call.axes)]
    inputs += [call.leaves[i] for i in call.broadcast_index]
    in_specs = [P(axis_name)] * len(call.index) + [P()] * len(call.broadcast_index)
    shardings = [
        NamedSharding(mesh, P(*[None] * axis_of[i], axis_name) if i in axis_of else P())
        for i, leaf in enumerate(call.leaves)
        if is_array(leaf)
    ]
    n_in = len(call.index)
    # Filled while JAX traces `body`: shard_map reads `out_specs` only after the body
    # has run, which lets the specs follow an output structure unknown beforehand.
    # (tests/test_shard_map.py pins this behaviour of JAX.)
    out_specs: list[Any] = []

    def body(*values: Any) -> list[Any]:
        mapped_out, unmapped_out = call.inner(
            [v[0] for v in values[:n_in]], values[n_in:]
        )
        out_specs[:] = [P(axis_name)] * len(mapped_out) + [P()] * len(unmapped_out)
        return [x[None] for x in mapped_out] + list(unmapped_out)

    check_context_mesh(mesh, "filter_pmap")
    outs = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=tuple(in_specs),
        out_specs=out_specs,
        check_vma=False,
    )(*inputs)
    n_mapped_out = out_specs.count(P(axis_name))
    return call.finish(outs[:n_mapped_out], outs[n_mapped_out:]), shardings


@overload
def filter_pmap(
    fun: None = None,
    *,
    in_axes: PyTree[AxisSpec] = eqx.if_array(0),
    out_axes: PyTree[AxisSpec] = eqx.if_array(0),
    axis_name: Hashable | None = None,
    axis_size: int | None = None,
    devices: Sequence[Any] | None = None,
    donate: Donate = "none",
) -> Callable[[Callable[..., Any]], Callable[..., Any]]: ...


@overload
def filter_pmap(
    fun: Callable[..., Any],
    *,
    in_axes: PyTree[AxisSpec] = eqx.if_array(0),
    out_axes: PyTree[AxisSpec] = eqx.if_array(0),
    axis_name: Hashable | None = None,
    axis_size: int | None = None,
    devices: Sequence[Any] | None = None,
    donate: Donate = "none",
) -> Callable[..., Any]: ...


def filter_pmap(
    fun: Callable[..., Any] | None = None,
    *,
    in_axes: PyTree[AxisSpec] = eqx.if_array(0),
    out_axes: PyTree[AxisSpec] = eqx.if_array(0),
    axis_name: Hashable | None = None,
    axis_size: int | None = None,
    devices: Sequence[Any] | None = None,
    donate: Donate = "none",
) -> Any:
    """Maps `fun` over one axis of its array leaves with one device per element; every
    other leaf is static. Same result as [`eqpar.filter_vmap`][] with the same specs.

    Built on `jax.jit(jax.shard_map(...))` over a 1-D mesh of the first `size`
    devices (as `jax.pmap` now is), without `jax.pmap`'s removed pieces. Runs with
    `check_vma=False`, like `jax.pmap`: gradients inside stay per device, and an
    `out_axes=None` output is taken from the first device unchecked.

    **Arguments:**

    - `fun`, `in_axes`, `out_axes`, `axis_size`: as for [`eqpar.filter_vmap`][].
    - `axis_name`: the name collectives inside `fun` use for the device axis.
    - `devices`: the devices to run on, in order (default: `jax.devices()`); the
        mapped size may not exceed their number.
    - `donate`: `"all"` donates every array input's buffer to the computation (it
        is invalid afterwards); `"none"` (default) donates nothing.

    **Returns:**

    The mapped function, compiled and cached per signature. Outputs are
    `jax.Array`s sharded over the device axis (or replicated for `out_axes=None`).
    Inputs that are not yet on the mesh are placed there.

    !!! example

        ```python
        import jax, jax.numpy as jnp, eqpar

        @eqpar.filter_pmap(axis_name="i")
        def normalise(x):
            return x / eqpar.psum(x, "i")

        n = jax.device_count()
        out = normalise(jnp.arange(1.0, n + 1))
        assert jnp.allclose(out.sum(), 1.0)
        ```
    """
    name = _DEFAULT_AXIS_NAME if axis_name is None else axis_name
    devs = None if devices is None else tuple(devices)
    if devs is not None and not devs:
        raise AxisSizeError("`devices` must be non-empty (or None for all devices).")
    run = ft.partial(_pmap_run, in_axes, out_axes, name, axis_size, devs)
    return decorator_or_call(
        fun, lambda f: transformed(f, Compiled(run, donate=donate))
    )
