"""`filter_pmap`: one device per mapped element, as `jit(shard_map)` over a 1-D mesh
(what `jax.pmap` itself now is), with `filter_vmap`'s mapped-call plumbing."""

from collections.abc import Callable, Hashable, Sequence
from typing import Any, overload

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import PyTree

from ._dispatch import (
    Backend,
    Bounded,
    check_donate,
    Compiled,
    decorator_or_call,
    Donate,
    shared,
    transformed,
)
from ._errors import AxisSizeError, Checked, MeshError, SpecError
from ._mapped import (
    AxisSpec,
    check_axis_name,
    check_axis_size,
    check_unmapped_outputs,
    MappedCall,
    out_axes_may_be_none,
    require_size,
    resolve_axes,
)
from ._runner import line_mesh, run_shard_map
from ._specs import abstract_signature, is_array


_DEFAULT_AXIS_NAME = "_eqpar_pmap"


MAX_RESOLVED = 64
"""Call signatures per `filter_pmap` option set whose resolved `in_axes` are
remembered."""


class _Pmap:
    """`filter_pmap`'s backend for one set of options."""

    def __init__(
        self,
        in_axes: Any,
        out_axes: Any,
        axis_name: Hashable,
        axis_size: int | None,
        devices: tuple[Any, ...] | None,
    ):
        self.in_axes = in_axes
        self.out_axes = out_axes
        self.axis_name = axis_name
        self.axis_size = axis_size
        self.devices = devices
        self.check_unmapped = out_axes_may_be_none(out_axes)
        self._resolved: Bounded[tuple[list[Any], list[int], int | None]] = Bounded(
            MAX_RESOLVED
        )

    def resolve(
        self, fun: Any, args: tuple, kwargs: dict
    ) -> tuple[list[Any], list[int], int | None]:
        """`in_axes` resolved for this call: once per signature (before the call,
        to place the inputs), found again while it is traced, so that callables
        in `in_axes` run once."""
        key = abstract_signature((fun, args, kwargs))
        found = self._resolved.get(key)
        if found is None:
            found = resolve_axes(fun, args, kwargs, self.in_axes, self.axis_size)
            self._resolved.put(key, found)
        return found

    def mesh(self, size: int) -> Mesh:
        """The first `size` devices, one per element."""
        available = self.devices if self.devices is not None else tuple(jax.devices())
        if size > len(available):
            raise AxisSizeError(
                f"filter_pmap maps an axis of size {size}, one element per device, "
                f"but only {len(available)} devices are available. Use a mapped size "
                f"of at most {len(available)}, or split the batch over devices "
                "instead (`filter_shard_map` with a `PartitionSpec`, or `filter_vmap` "
                "inside `filter_pmap` over a reshaped batch)."
            )
        return line_mesh(tuple(available[:size]), self.axis_name)

    def run(self, fun: Any, args: tuple, kwargs: dict, context: None) -> Any:
        del context
        check_not_nested()
        call = MappedCall(
            fun,
            args,
            kwargs,
            self.in_axes,
            self.out_axes,
            self.axis_size,
            self.resolve(fun, args, kwargs),
        )
        size = call.require_size("filter_pmap")
        name = self.axis_name
        if size == 0:
            # No element, so no device to run on: empty outputs, as from filter_vmap,
            # filter_shard_map and Parallel (a mesh of zero devices cannot be built).
            return call.finish(*call.vmap(name, 0)(call.mapped))
        mesh = self.mesh(size)
        if self.check_unmapped:
            # pmap runs without replication typing (per-device gradients, as
            # `jax.pmap`), so an out_axes=None output is checked by a shapes-only
            # trace under vmap, the same rule as filter_vmap's.
            check_unmapped_outputs(call, name, size, "filter_pmap")
        # Mapped leaves go in with their axis moved first (one row per device), then
        # the broadcast arrays, replicated.
        inputs = [jnp.moveaxis(x, a, 0) for x, a in zip(call.mapped, call.axes)]
        inputs += [call.leaves[i] for i in call.broadcast_index]
        n_mapped = len(call.index)
        specs = [P(name)] * n_mapped + [P()] * len(call.broadcast_index)

        def per_device(*blocks: Any) -> tuple[list[Any], list[Any]]:
            mapped_out, unmapped_out = call.inner(
                [b[0] for b in blocks[:n_mapped]], blocks[n_mapped:]
            )
            return [x[None] for x in mapped_out], list(unmapped_out)

        def out_specs(out: tuple[list[Any], list[Any]]) -> list[P]:
            return [P(name)] * len(out[0]) + [P()] * len(out[1])

        mapped_out, unmapped_out = run_shard_map(
            per_device,
            inputs,
            specs,
            out_specs,
            mesh=mesh,
            check_vma=False,
            who="filter_pmap",
        )
        return call.finish(mapped_out, unmapped_out)

    def _split(self, axis: int, leaf: Any) -> P:
        return P(*[None] * (axis % np.ndim(leaf)), self.axis_name)

    def targets(
        self, fun: Any, args: tuple, kwargs: dict, context: None
    ) -> list[NamedSharding | None] | None:
        """Mapped arrays split along their mapped axis, the others replicated (a
        key that `split_key` expands is an input of the program as it is)."""
        del context
        axes, _, size = self.resolve(fun, args, kwargs)
        size = require_size(size, "filter_pmap")
        if size == 0:
            return None
        mesh = self.mesh(size)
        return [
            NamedSharding(mesh, P() if axis is None else self._split(axis, leaf))
            for leaf, axis in zip(jtu.tree_leaves((fun, args, kwargs)), axes)
            if is_array(leaf)
        ]


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
        backend = _Pmap(in_axes, out_axes, name, axis_size, devs)
        return Compiled(Backend(backend.run, targets=backend.targets), donate=donate)

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
