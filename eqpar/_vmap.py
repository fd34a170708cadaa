"""`filter_vmap`: the `jax.vmap` backend, and the mapped-call plumbing it shares with
`filter_pmap` (both map one axis per leaf with int/None specs)."""

import functools as ft
from collections.abc import Callable, Hashable, Sequence
from typing import Any, overload

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import PyTree

from ._dispatch import Compiled, decorator_or_call, transformed
from ._errors import AxisSizeError, SpecError
from ._specs import (
    check_int_axes,
    is_array,
    leaf_names,
    resolve_call_specs,
    resolve_out_specs,
)


AxisSpec = int | None | Callable[[Any], int | None]

_MAPPED = "mapped"
_UNMAPPED = "unmapped"


class MappedCall:
    """`fun(*args, **kwargs)` split for a one-axis map.

    Resolves `in_axes` over the call's leaves and checks them; `inner` is the
    per-element function over the mapped leaves (axes already removed) that returns
    `(mapped_outputs, unmapped_array_outputs)`; `finish` puts the mapped axis of each
    output where `out_axes` asks and rebuilds the output pytree.
    """

    def __init__(
        self,
        fun: Any,
        args: tuple,
        kwargs: dict,
        in_axes: Any,
        out_axes: Any,
        axis_size: int | None,
    ):
        self.leaves, self.treedef = jtu.tree_flatten((fun, args, kwargs))
        axes = resolve_call_specs(
            in_axes, fun, args, kwargs, default=eqx.if_array(0), what="in_axes"
        )
        size = check_int_axes(
            axes, self.leaves, lambda: leaf_names(fun, args, kwargs), "in_axes"
        )
        if size is None and axis_size is None:
            raise SpecError(
                "No argument is mapped (every array leaf has axis None) and "
                "`axis_size` was not given, so the size of the mapped axis is "
                "unknown. Map at least one argument, or pass `axis_size=`."
            )
        if size is not None and axis_size is not None and size != axis_size:
            raise AxisSizeError(
                f"`axis_size={axis_size}` was given but the mapped arguments have "
                f"size {size} along their mapped axes."
            )
        self.size: int = size if size is not None else axis_size  # type: ignore
        self.index = [i for i, a in enumerate(axes) if a is not None]
        self.broadcast_index = [
            i for i, a in enumerate(axes) if a is None and is_array(self.leaves[i])
        ]
        self.mapped = [self.leaves[i] for i in self.index]
        self.axes = [axes[i] % jnp.ndim(self.leaves[i]) for i in self.index]
        self.out_axes_spec = out_axes
        self._out: tuple[Any, list[Any], list[Any]] | None = None

    def inner(
        self, mapped: list[Any], broadcast: Sequence[Any] | None = None
    ) -> tuple[list[Any], list[Any]]:
        """The call on one element. `broadcast`, when given, replaces the unmapped
        array leaves (e.g. by their per-device copies inside `shard_map`)."""
        leaves = list(self.leaves)
        for i, value in zip(self.index, mapped):
            leaves[i] = value
        if broadcast is not None:
            for i, value in zip(self.broadcast_index, broadcast):
                leaves[i] = value
        fun, args, kwargs = jtu.tree_unflatten(self.treedef, leaves)
        out = fun(*args, **kwargs)
        out_leaves, out_def = jtu.tree_flatten(out)
        out_axes = resolve_out_specs(self.out_axes_spec, out, "out_axes")
        kinds, axes, mapped_out, unmapped_out = [], [], [], []
        for leaf, axis in zip(out_leaves, out_axes):
            if not is_array(leaf):
                kinds.append(leaf)
            elif axis is None:
                kinds.append(_UNMAPPED)
                unmapped_out.append(leaf)
            elif isinstance(axis, int) and not isinstance(axis, bool):
                kinds.append(_MAPPED)
                axes.append(axis)
                mapped_out.append(leaf)
            else:
                raise SpecError(
                    f"out_axes resolved to {axis!r} for an output leaf; it must be "
                    "an int or None."
                )
        self._out = (out_def, kinds, axes)
        return mapped_out, unmapped_out

    def finish(self, mapped_out: list[Any], unmapped_out: list[Any]) -> Any:
        """Rebuilds the output; `mapped_out` carry the mapped axis first."""
        assert self._out is not None
        out_def, kinds, axes = self._out
        moved = []
        for x, axis in zip(mapped_out, axes):
            if not -x.ndim <= axis < x.ndim:
                raise SpecError(
                    f"out_axes asks to put the mapped axis at position {axis} of an "
                    f"output of rank {x.ndim} (mapped axis included)."
                )
            moved.append(jnp.moveaxis(x, 0, axis))
        mapped_it, unmapped_it = iter(moved), iter(unmapped_out)
        leaves = [
            next(mapped_it)
            if k is _MAPPED
            else next(unmapped_it)
            if k is _UNMAPPED
            else k
            for k in kinds
        ]
        return jtu.tree_unflatten(out_def, leaves)


def _vmap_run(
    in_axes: Any,
    out_axes: Any,
    axis_name: Hashable | None,
    axis_size: int | None,
    chunk_size: int | None,
    fun: Any,
    args: tuple,
    kwargs: dict,
    context: None,
) -> tuple[Any, None]:
    del context
    call = MappedCall(fun, args, kwargs, in_axes, out_axes, axis_size)
    if chunk_size is None or call.size <= chunk_size:
        mapped_out, unmapped_out = jax.vmap(
            call.inner,
            in_axes=(call.axes,),
            out_axes=(0, None),
            axis_name=axis_name,
            axis_size=call.size,
        )(call.mapped)
    else:
        # lax.map scans over chunks of `chunk_size` (vmapped), then vmaps the rest:
        # the compiled program holds one chunk's intermediates at a time.
        xs = [jnp.moveaxis(x, a, 0) for x, a in zip(call.mapped, call.axes)]
        if xs:
            mapped_out, unmapped_out = jax.lax.map(
                call.inner, xs, batch_size=chunk_size
            )
        else:  # only `axis_size`: map over a dummy index
            mapped_out, unmapped_out = jax.lax.map(
                lambda _: call.inner([]), jnp.arange(call.size), batch_size=chunk_size
            )
        # Unmapped outputs do not depend on the element: keep the first copy.
        unmapped_out = [u[0] for u in unmapped_out]
    return call.finish(mapped_out, unmapped_out), None


@overload
def filter_vmap(
    fun: None = None,
    *,
    in_axes: PyTree[AxisSpec] = eqx.if_array(0),
    out_axes: PyTree[AxisSpec] = eqx.if_array(0),
    axis_name: Hashable | None = None,
    axis_size: int | None = None,
    chunk_size: int | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]: ...


@overload
def filter_vmap(
    fun: Callable[..., Any],
    *,
    in_axes: PyTree[AxisSpec] = eqx.if_array(0),
    out_axes: PyTree[AxisSpec] = eqx.if_array(0),
    axis_name: Hashable | None = None,
    axis_size: int | None = None,
    chunk_size: int | None = None,
) -> Callable[..., Any]: ...


def filter_vmap(
    fun: Callable[..., Any] | None = None,
    *,
    in_axes: PyTree[AxisSpec] = eqx.if_array(0),
    out_axes: PyTree[AxisSpec] = eqx.if_array(0),
    axis_name: Hashable | None = None,
    axis_size: int | None = None,
    chunk_size: int | None = None,
) -> Any:
    """Vectorises `fun` over one axis of its array leaves; every other leaf is static.

    **Arguments:**

    - `fun`: the function to map: a plain function, a method (decorate it in the
        class body; `self` is then the first argument and is mapped like any other,
        so pass `in_axes=(None, ...)` to broadcast it), or a callable Module, whose
        own arrays are broadcast. Keyword arguments work at call time.
    - `in_axes`: which axis of each input array to map. A pytree prefix of the
        arguments with leaves `int` (the axis), `None` (broadcast) or a callable
        `leaf -> int | None`; one spec for all arguments, a tuple with one entry per
        positional argument, or a dict keyed by parameter name (the way to give
        keyword arguments a spec; unnamed ones get the default). Non-array leaves are
        always static, whatever their spec.
    - `out_axes`: where the mapped axis goes in each output array; a pytree prefix of
        the output with the same kinds of leaves. `None` means the output does not
        depend on the mapped element.
    - `axis_name`: a name for the mapped axis, binding it for collectives
        (`eqpar.psum(x, axis_name)` etc.) inside `fun`.
    - `axis_size`: the mapped size; needed only when no argument is mapped.
    - `chunk_size`: map `chunk_size` elements at a time (a `lax.map` over vmapped
        chunks) so that only one chunk's intermediates are alive; same result. A
        `chunk_size` that does not divide the mapped size maps the remainder
        separately and concatenates, costing one extra copy of the output. Cannot
        be combined with `axis_name`, since a collective needs the whole axis at once.

    **Returns:**

    The mapped function, compiled on first call per signature: a repeated call with
    the same shapes and the same non-array leaves does not retrace. It is a pytree
    (an `equinox.Module`), so it can be passed through other transforms.

    !!! example

        ```python
        import equinox as eqx, jax, jax.numpy as jnp, eqpar

        model = eqx.nn.MLP(2, 1, 8, 2, key=jax.random.key(0))
        xs = jnp.ones((16, 2))
        ys = eqpar.filter_vmap(model)(xs)  # model broadcast, xs mapped
        assert ys.shape == (16, 1)
        ```
    """
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise SpecError(f"`chunk_size` must be a positive int, got {chunk_size!r}.")
        if chunk_size < 1:
            raise SpecError(f"`chunk_size` must be a positive int, got {chunk_size}.")
        if axis_name is not None:
            raise SpecError(
                f"`chunk_size={chunk_size}` cannot be combined with "
                f"`axis_name={axis_name!r}`: a chunked map runs chunks one after "
                "another, so a collective over the axis would only see one chunk. "
                "Drop `chunk_size`, or compute the reduction outside the map."
            )
    run = ft.partial(_vmap_run, in_axes, out_axes, axis_name, axis_size, chunk_size)
    return decorator_or_call(fun, lambda f: transformed(f, Compiled(run)))
