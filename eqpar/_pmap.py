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

from ._dispatch import (
    check_donate,
    Compiled,
    decorator_or_call,
    Donate,
    shared,
    transformed,
)
from ._errors import AxisSizeError, Checked, MeshError, SpecError
from ._shard_map import check_context_mesh
from ._specs import is_array
from ._vmap import (
    AxisSpec,
    check_axis_name,
    check_axis_size,
    check_unmapped_outputs,
    MappedCall,
    out_axes_may_be_none,
)


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
    check_unmapped: bool,
    fun: Any,
    args: tuple,
    kwargs: dict,
    context: None,
) -> tuple[Any, list[NamedSharding] | None]:
    del context
    check_not_nested()
    call = MappedCall(fun, args, kwargs, in_axes, out_axes, axis_size)
    size = call.require_size("filter_pmap")
    available = devices if devices is not None else tuple(jax.devices())
    if size > len(available):
        raise AxisSizeError(
            f"filter_pmap maps an axis of size {size}, one element per device, "
            f"but only {len(available)} devices are available. Use a mapped size of "
            f"at most {len(available)}, or split the batch over devices instead "
            "(`filter_shard_map` with a `PartitionSpec`, or `filter_vmap` inside "
            "`filter_pmap` over a reshaped batch)."
        )
    if size == 0:
        # No element, so no device to run on: empty outputs, as from filter_vmap,
        # filter_shard_map and Parallel (a mesh of zero devices cannot be built).
        return call.finish(*call.vmap(axis_name, 0)(call.mapped)), None
    if check_unmapped:
        # pmap runs without replication typing (per-device gradients, as
        # `jax.pmap`), so an out_axes=None output is checked by a shapes-only trace
        # under vmap, the same rule as filter_vmap's.
        check_unmapped_outputs(call, axis_name, size, "filter_pmap")
    mesh = _mesh(tuple(available[:size]), axis_name)
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
    fun: Checked[Callable[..., Any] | None] = None,
    *,
    in_axes: Checked[PyTree[AxisSpec]] = eqx.if_array(0),
    out_axes: Checked[PyTree[AxisSpec]] = eqx.if_array(0),
    axis_name: Checked[Hashable | None] = None,
    axis_size: Checked[int | None] = None,
    devices: Checked[Sequence[Any] | None] = None,
    donate: Checked[Donate] = "none",
) -> Any:
    """Maps `fun` over one axis of its array leaves with one device per element; every
    other leaf is static. Same result as [`eqpar.filter_vmap`][] with the same specs.

    Built on `jax.jit(jax.shard_map(...))` over a 1-D mesh of the first `size`
    devices (as `jax.pmap` now is), without `jax.pmap`'s removed pieces. Runs with
    `check_vma=False`, like `jax.pmap`: gradients inside stay per device. An
    `out_axes=None` output is checked as under `filter_vmap` (an output that depends
    on the mapped element raises `eqpar.SpecError`; this costs one shapes-only trace
    per signature, made only when `out_axes` can be `None`). Cannot be nested in
    another per-device program: map the inner axis with `filter_vmap`.

    **Arguments:**

    - `fun`, `in_axes`, `out_axes`, `axis_size`: as for [`eqpar.filter_vmap`][].
    - `axis_name`: the name collectives inside `fun` use for the device axis.
    - `devices`: the devices to run on, in order (default: `jax.devices()`); the
        mapped size may not exceed their number.
    - `donate`: as for `equinox.filter_jit`: `"all"` donates every array input's
        buffer to the computation (it is invalid afterwards), `"all-except-first"`
        all but the first argument's; `"warn"` / `"warn-except-first"` the same
        without silencing JAX's warning about donated buffers it could not use;
        `"none"` (default) donates nothing. An input that first had to be moved to
        the devices warns that a copy was donated.

    **Returns:**

    The mapped function, compiled and cached per signature (one cache for every
    wrapper with the same options: `filter_pmap(f)(x)` written inline compiles
    once, and so does `filter_pmap(model)` of each new Module of the same
    structure). `.lower(*args, **kwargs)` lowers ahead of time. Outputs are
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
    check_axis_size(axis_size, "filter_pmap")
    check_axis_name(axis_name, "filter_pmap")
    donate = check_donate(donate)
    name = _DEFAULT_AXIS_NAME if axis_name is None else axis_name
    devs = _check_devices(devices)
    options = (in_axes, out_axes, name, axis_size, devs, donate)

    def make() -> Compiled:
        run = ft.partial(
            _pmap_run,
            in_axes,
            out_axes,
            name,
            axis_size,
            devs,
            out_axes_may_be_none(out_axes),
        )
        return Compiled(run, donate=donate)

    caller = shared("pmap", options, make)
    return decorator_or_call(fun, lambda f: transformed(f, caller), "filter_pmap")


def _check_devices(devices: Any) -> tuple[Any, ...] | None:
    if devices is None:
        return None
    if isinstance(devices, (str, bytes)) or not isinstance(devices, Sequence):
        raise SpecError(
            f"filter_pmap: `devices` must be a sequence of JAX devices (e.g. "
            f"`jax.devices()[:4]` or `jax.devices('cpu')`), got {devices!r}."
        )
    devs = tuple(devices)
    if not devs:
        raise AxisSizeError("`devices` must be non-empty (or None for all devices).")
    bad = [d for d in devs if not isinstance(d, jax.Device)]
    if bad:
        raise SpecError(
            f"filter_pmap: `devices` must hold JAX devices (e.g. `jax.devices()[:4]` "
            f"or `jax.devices('cpu')`), got {bad[0]!r}."
        )
    if len(set(devs)) != len(devs):
        raise SpecError("filter_pmap: `devices` lists a device more than once.")
    return devs


def check_not_nested() -> None:
    """A per-device program cannot start another one-device-per-element map."""
    manual = jax.sharding.get_abstract_mesh().manual_axes
    if manual:
        raise MeshError(
            "filter_pmap cannot be nested inside another per-device program (here "
            f"inside filter_pmap / filter_shard_map / Parallel, over mesh axes "
            f"{tuple(manual)}): every device is already running one element. Map "
            "the inner axis with `eqpar.filter_vmap(..., axis_name=...)` instead "
            "(same result and collectives, on each device), or use one "
            "`eqpar.filter_shard_map` over a 2-D mesh, e.g. "
            "`jax.make_mesh((a, b), ('outer', 'inner'))`."
        )
