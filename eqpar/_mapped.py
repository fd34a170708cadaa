"""A call mapped over one axis per leaf (int/None specs): the plumbing `filter_vmap`,
its chunked form and `filter_pmap` share."""

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from ._errors import AxisSizeError, SpecError
from ._keys import LEGACY, per_example_keys, SPLIT
from ._specs import (
    call_with,
    check_int_axes,
    is_array,
    leaf_names,
    resolve_call_specs,
    resolve_out_specs,
    split_leaves,
    Static,
)


AxisSpec = int | None | Callable[[Any], int | None]


def check_axis_size(axis_size: Any, who: str) -> None:
    if axis_size is not None and (
        isinstance(axis_size, bool) or not isinstance(axis_size, int) or axis_size < 0
    ):
        raise SpecError(
            f"{who}: `axis_size` must be a non-negative int (or None to take it "
            f"from the mapped arguments), got {axis_size!r}."
        )


def check_axis_name(axis_name: Any, who: str) -> None:
    try:
        hash(axis_name)
    except TypeError:
        raise SpecError(
            f"{who}: `axis_name` must be hashable (a string, usually), got "
            f"{axis_name!r}."
        ) from None


def out_axes_may_be_none(out_axes: Any) -> bool:
    """Whether `out_axes` may resolve to `None` for an array output (only then is
    there an unmapped output to check)."""
    leaves = jtu.tree_leaves(out_axes, is_leaf=lambda x: x is None)
    return not all(
        (isinstance(a, int) and not isinstance(a, bool)) or isinstance(a, eqx.if_array)
        for a in leaves
    )


def resolve_axes(
    fun: Any, args: tuple, kwargs: dict, in_axes: Any, axis_size: int | None
) -> tuple[list[Any], list[int], int | None]:
    """`in_axes` resolved over the leaves of `(fun, args, kwargs)` and checked.

    Returns one axis (int or None) per leaf, the leaves that `eqpar.split_key` turns
    into one key per example (their axis is None here), and the mapped size (`None`
    when nothing is mapped and no `axis_size` was given).
    """
    leaves = jtu.tree_leaves((fun, args, kwargs))
    axes = resolve_call_specs(
        in_axes, fun, args, kwargs, default=eqx.if_array(0), what="in_axes"
    )
    names = lambda: leaf_names(fun, args, kwargs)  # noqa: E731
    keys = [i for i, a in enumerate(axes) if a is SPLIT or a is LEGACY]
    for i in keys:
        if axes[i] is LEGACY:
            raise SpecError(
                f"in_axes gives `eqpar.split_key` for {names()[i]}, a uint32[2] "
                "array: a legacy `jax.random.PRNGKey`. Only typed keys are split "
                "into one key per example: pass `jax.random.key(seed)`, or "
                "`jax.random.wrap_key_data(key)` for an existing one."
            )
        axes[i] = None
    size = check_int_axes(axes, leaves, names, "in_axes")
    if size is not None and axis_size is not None and size != axis_size:
        raise AxisSizeError(
            f"`axis_size={axis_size}` was given but the mapped arguments have "
            f"size {size} along their mapped axes."
        )
    if size is None:
        size = axis_size
    if keys and size is None:
        raise SpecError(
            f"in_axes gives `eqpar.split_key` for {names()[keys[0]]}, but no "
            "other argument is mapped and `axis_size` was not given, so the "
            "number of per-example keys is unknown. Map the batch, or pass "
            "`axis_size=`."
        )
    return axes, keys, size


def require_size(size: int | None, who: str) -> int:
    if size is None:
        raise SpecError(
            f"{who}: no argument is mapped (every array leaf has axis None) and "
            "`axis_size` was not given, so the size of the mapped axis is "
            "unknown. Map at least one argument, or pass `axis_size=`."
        )
    return size


class MappedCall:
    """`fun(*args, **kwargs)` split for a one-axis map.

    Resolves `in_axes` over the call's leaves and checks them; `inner` is the
    per-element function over the mapped leaves (axes already removed) that returns
    `(mapped_outputs, unmapped_array_outputs)`; `finish` puts the mapped axis of each
    output where `out_axes` asks and rebuilds the output pytree. Unmapped array
    leaves are not inputs of the map: `inner` closes over them, so outside `jit`
    they stay concrete, as under `jax.vmap` and `equinox.filter_vmap`.
    """

    def __init__(
        self,
        fun: Any,
        args: tuple,
        kwargs: dict,
        in_axes: Any,
        out_axes: Any,
        axis_size: int | None,
        resolved: tuple[list[Any], list[int], int | None] | None = None,
    ):
        self.leaves, self.treedef = jtu.tree_flatten((fun, args, kwargs))
        if resolved is None:
            resolved = resolve_axes(fun, args, kwargs, in_axes, axis_size)
        axes, keys, size = list(resolved[0]), resolved[1], resolved[2]
        # None: nothing is mapped and no size was given (see `require_size`).
        self.size: int | None = size
        for i in keys:  # one key per example, by its index: the same in any chunk
            assert self.size is not None
            self.leaves[i] = per_example_keys(self.leaves[i], self.size)
            axes[i] = 0
        self.index = [i for i, a in enumerate(axes) if a is not None]
        self.broadcast_index = [
            i for i, a in enumerate(axes) if a is None and is_array(self.leaves[i])
        ]
        self.mapped = [self.leaves[i] for i in self.index]
        self.axes = [axes[i] % jnp.ndim(self.leaves[i]) for i in self.index]
        self.out_axes_spec = out_axes
        self._out: tuple[Static, list[bool], list[int], list[str]] | None = None

    def require_size(self, who: str) -> int:
        return require_size(self.size, who)

    def inner(
        self, mapped: list[Any], broadcast: Sequence[Any] | None = None
    ) -> tuple[list[Any], list[Any]]:
        """The call on one element. `broadcast`, when given, replaces the unmapped
        array leaves (e.g. by their per-device copies inside `shard_map`)."""
        index, values = self.index, list(mapped)
        if broadcast is not None:
            index, values = index + self.broadcast_index, values + list(broadcast)
        out = call_with(self.treedef, self.leaves, index, values)
        paths, out_def = jtu.tree_flatten_with_path(out)
        out_axes = resolve_out_specs(self.out_axes_spec, out, "out_axes", numbers=True)
        leaves, mapped, axes, unmapped_paths = [], [], [], []
        for (path, leaf), axis in zip(paths, out_axes):
            if axis is None:
                if is_array(leaf):
                    mapped.append(False)
                    unmapped_paths.append(jtu.keystr(path) or "(root)")
            elif isinstance(axis, int) and not isinstance(axis, bool):
                # An int on a Python number broadcasts it, as in Equinox.
                leaf = jnp.asarray(leaf)
                mapped.append(True)
                axes.append(axis)
            else:
                raise SpecError(
                    f"out_axes resolved to {axis!r} for the output at "
                    f"{jtu.keystr(path) or '(root)'}; it must be an int or None."
                )
            leaves.append(leaf)
        arrays, signature = split_leaves(leaves)
        self._out = (Static(out_def, tuple(signature)), mapped, axes, unmapped_paths)
        return (
            [x for x, m in zip(arrays, mapped) if m],
            [x for x, m in zip(arrays, mapped) if not m],
        )

    def finish(self, mapped_out: list[Any], unmapped_out: list[Any]) -> Any:
        """Rebuilds the output; `mapped_out` carry the mapped axis first."""
        assert self._out is not None
        static, mapped, axes, _ = self._out
        moved = []
        for x, axis in zip(mapped_out, axes):
            if not -x.ndim <= axis < x.ndim:
                raise SpecError(
                    f"out_axes asks to put the mapped axis at position {axis} of an "
                    f"output of rank {x.ndim} (mapped axis included)."
                )
            moved.append(jnp.moveaxis(x, 0, axis))
        mapped_it, unmapped_it = iter(moved), iter(unmapped_out)
        return static.merge(next(mapped_it) if m else next(unmapped_it) for m in mapped)

    def vmap(self, axis_name: Hashable | None, size: int) -> Callable[..., Any]:
        """`inner` under `jax.vmap` over the mapped leaves (axes as given)."""
        return jax.vmap(
            self.inner,
            in_axes=(self.axes,),
            out_axes=(0, None),
            axis_name=axis_name,
            axis_size=size,
        )

    def unmapped_error(
        self, error: ValueError, axis_name: Hashable | None, size: int, who: str
    ) -> Exception:
        """An eqpar error naming the `out_axes=None` outputs that depend on the
        mapped element, when they are why the map failed with `error`; otherwise
        `error`. Decided by tracing (shapes only), not by reading JAX's message: the
        call traces with those outputs mapped, and an output is a culprit when it
        alone fails with `out_axes=None` (a trace per unmapped output, plus one,
        on this failing path only)."""
        if self._out is None or not self._out[3]:
            return error

        def probe(out_axes: Any, pick: Callable[[Any], Any]) -> Any:
            return jax.vmap(
                lambda m: pick(self.inner(m)[1]),
                in_axes=(self.axes,),
                out_axes=out_axes,
                axis_name=axis_name,
                axis_size=size,
            )

        paths = self._out[3]
        try:  # every unmapped output mapped instead: does the call trace then?
            jax.eval_shape(probe(0, lambda outs: outs), self.mapped)
        except Exception:  # no: it fails for another reason than its out_axes
            return error
        culprits = []
        for j, path in enumerate(paths):
            try:
                jax.eval_shape(probe(None, lambda outs, j=j: outs[j]), self.mapped)
            except ValueError:
                culprits.append(path)
        if not culprits:
            return error
        return SpecError(
            f"{who}: out_axes is None for the output at {', '.join(culprits)}, but "
            "it depends on the mapped element, so it has no single value to "
            "return. Give it an int out_axes (e.g. 0) to return every element's "
            "value, or reduce it over the axis first (e.g. `eqpar.pmean(y, "
            "axis_name)` with `axis_name=` set)."
        )


def check_unmapped_outputs(
    call: MappedCall, axis_name: Hashable | None, size: int, who: str
) -> None:
    """Traces `call` under `jax.vmap` (shapes only) so that an `out_axes=None`
    output that depends on the mapped element raises, as under `filter_vmap`."""
    try:
        jax.eval_shape(call.vmap(axis_name, size), call.mapped)
    except ValueError as e:
        error = call.unmapped_error(e, axis_name, size, who)
        if error is not e:
            raise error from None
