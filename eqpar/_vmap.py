"""`filter_vmap`: the `jax.vmap` backend, and the mapped-call plumbing it shares with
`filter_pmap` (both map one axis per leaf with int/None specs)."""

from collections.abc import Callable, Hashable, Sequence
from typing import Any, overload

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import PyTree

from ._dispatch import decorator_or_call, shared, transformed
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
    ):
        self.leaves, self.treedef = jtu.tree_flatten((fun, args, kwargs))
        axes = resolve_call_specs(
            in_axes, fun, args, kwargs, default=eqx.if_array(0), what="in_axes"
        )
        size = check_int_axes(
            axes, self.leaves, lambda: leaf_names(fun, args, kwargs), "in_axes"
        )
        if size is not None and axis_size is not None and size != axis_size:
            raise AxisSizeError(
                f"`axis_size={axis_size}` was given but the mapped arguments have "
                f"size {size} along their mapped axes."
            )
        # None: nothing is mapped and no size was given (see `require_size`).
        self.size: int | None = size if size is not None else axis_size
        self.index = [i for i, a in enumerate(axes) if a is not None]
        self.broadcast_index = [
            i for i, a in enumerate(axes) if a is None and is_array(self.leaves[i])
        ]
        self.mapped = [self.leaves[i] for i in self.index]
        self.axes = [axes[i] % jnp.ndim(self.leaves[i]) for i in self.index]
        self.out_axes_spec = out_axes
        self._out: tuple[Any, list[Any], list[Any], list[str]] | None = None

    def require_size(self, who: str) -> int:
        if self.size is None:
            raise SpecError(
                f"{who}: no argument is mapped (every array leaf has axis None) and "
                "`axis_size` was not given, so the size of the mapped axis is "
                "unknown. Map at least one argument, or pass `axis_size=`."
            )
        return self.size

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
        paths, out_def = jtu.tree_flatten_with_path(out)
        out_axes = resolve_out_specs(self.out_axes_spec, out, "out_axes", numbers=True)
        kinds, axes, mapped_out, unmapped_out, unmapped_paths = [], [], [], [], []
        for (path, leaf), axis in zip(paths, out_axes):
            if axis is None:
                if is_array(leaf):
                    kinds.append(_UNMAPPED)
                    unmapped_out.append(leaf)
                    unmapped_paths.append(jtu.keystr(path) or "(root)")
                else:
                    kinds.append(leaf)
            elif isinstance(axis, int) and not isinstance(axis, bool):
                # An int on a Python number broadcasts it, as in Equinox.
                kinds.append(_MAPPED)
                axes.append(axis)
                mapped_out.append(jnp.asarray(leaf))
            else:
                raise SpecError(
                    f"out_axes resolved to {axis!r} for the output at "
                    f"{jtu.keystr(path) or '(root)'}; it must be an int or None."
                )
        self._out = (out_def, kinds, axes, unmapped_paths)
        return mapped_out, unmapped_out

    def finish(self, mapped_out: list[Any], unmapped_out: list[Any]) -> Any:
        """Rebuilds the output; `mapped_out` carry the mapped axis first."""
        assert self._out is not None
        out_def, kinds, axes, _ = self._out
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
        """Turns JAX's complaint about a mapped output with `out_axes=None` into an
        eqpar error naming the output (found by tracing each candidate alone)."""
        if "out_axes" not in str(error) or self._out is None:
            return error
        culprits = []
        for j, path in enumerate(self._out[3]):
            probe = jax.vmap(
                lambda m, j=j: self.inner(m)[1][j],
                in_axes=(self.axes,),
                out_axes=None,
                axis_name=axis_name,
                axis_size=size,
            )
            try:
                jax.eval_shape(probe, self.mapped)
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


def _pad_rows(x: Any, rows: int) -> Any:
    """`x` with its last row repeated until it has `rows` rows: valid inputs for
    the padding, which is trimmed from the outputs."""
    extra = rows - x.shape[0]
    if not extra:
        return x
    return jnp.concatenate([x, jnp.broadcast_to(x[-1:], (extra, *x.shape[1:]))])


def _chunked(call: MappedCall, size: int, chunk_size: int) -> tuple[list, list]:
    """Maps `chunk_size` elements at a time: a `lax.scan` over chunks, each a
    `vmap`. The last chunk is padded to full size (the padding is trimmed), so one
    body is compiled whatever the remainder, and every element goes through the
    same program as under an unchunked map."""
    n_chunks = -(-size // chunk_size)
    rows = n_chunks * chunk_size
    if call.mapped:
        xs = [
            _pad_rows(jnp.moveaxis(x, a, 0), rows)
            for x, a in zip(call.mapped, call.axes)
        ]
        element = call.inner
    else:  # only `axis_size`: map over a dummy index
        xs = [jnp.arange(rows)]

        def element(_: list[Any]) -> tuple[list[Any], list[Any]]:
            return call.inner([])

    chunks = [x.reshape(n_chunks, chunk_size, *x.shape[1:]) for x in xs]
    vmapped = jax.vmap(element, in_axes=([0] * len(chunks),), out_axes=(0, None))

    def step(carry: None, chunk: list[Any]) -> tuple[None, Any]:
        return carry, vmapped(chunk)

    _, (mapped_out, unmapped_out) = jax.lax.scan(step, None, chunks)
    mapped_out = [x.reshape(rows, *x.shape[2:])[:size] for x in mapped_out]
    # Unmapped outputs do not depend on the element (vmap checked that): one copy.
    return mapped_out, [u[0] for u in unmapped_out]


class _VmapCaller:
    """`filter_vmap`'s caller: maps eagerly (no `jax.jit`), like `jax.vmap`."""

    def __init__(
        self,
        in_axes: Any,
        out_axes: Any,
        axis_name: Hashable | None,
        axis_size: int | None,
        chunk_size: int | None,
    ):
        self.in_axes = in_axes
        self.out_axes = out_axes
        self.axis_name = axis_name
        self.axis_size = axis_size
        self.chunk_size = chunk_size

    def __call__(self, fun: Any, args: tuple, kwargs: dict) -> Any:
        call = MappedCall(
            fun, args, kwargs, self.in_axes, self.out_axes, self.axis_size
        )
        size = call.size
        if size is None:
            # Nothing mapped and no size: call the function (as Equinox does); only
            # an output that asks for a mapped axis is an error.
            mapped_out, unmapped_out = call.inner([])
            if mapped_out:
                raise SpecError(
                    "filter_vmap: an output has an int out_axes but no argument is "
                    "mapped and `axis_size` was not given, so the size of the mapped "
                    "axis is unknown. Map an argument, pass `axis_size=`, or give "
                    "that output out_axes=None."
                )
            return call.finish(mapped_out, unmapped_out)
        try:
            if self.chunk_size is None or size <= self.chunk_size:
                mapped_out, unmapped_out = call.vmap(self.axis_name, size)(call.mapped)
            else:
                mapped_out, unmapped_out = _chunked(call, size, self.chunk_size)
        except ValueError as e:
            error = call.unmapped_error(e, self.axis_name, size, "filter_vmap")
            if error is e:
                raise
            raise error from None
        return call.finish(mapped_out, unmapped_out)


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
        depend on the mapped element (checked: an output that does raises
        `eqpar.SpecError`). An int on a Python number in the output broadcasts it
        (`filter_vmap(lambda: 1, out_axes=0, axis_size=3)()` is `[1, 1, 1]`), as in
        Equinox. With nothing mapped, no `axis_size` and only `None` out_axes, the
        function is simply called.
    - `axis_name`: a name for the mapped axis, binding it for collectives
        (`eqpar.psum(x, axis_name)` etc.) inside `fun`.
    - `axis_size`: the mapped size; needed only when no argument is mapped and an
        output is mapped.
    - `chunk_size`: map `chunk_size` elements at a time (a `lax.scan` over vmapped
        chunks) so that only one chunk's intermediates are alive; same result. A
        remainder is padded into one last full chunk (repeating the last element)
        and trimmed, so one body is compiled whatever the size. Cannot be combined
        with `axis_name`, since a collective needs the whole axis at once.

    **Returns:**

    The mapped function. Like `jax.vmap` and `equinox.filter_vmap` it does not
    compile by itself: called eagerly, values that do not depend on the mapped
    inputs stay concrete (Python control flow on them works) and Python side effects
    run on every call. Inside `eqpar.filter_jit` (or any `jax.jit`) it is traced
    once with the enclosing program. It is a pytree (an `equinox.Module`), so it can
    be passed through other transforms; wrappers built with the same options share
    everything, so building one inline per call costs nothing extra.

    !!! example

        ```python
        import equinox as eqx, jax, jax.numpy as jnp, eqpar

        model = eqx.nn.MLP(2, 1, 8, 2, key=jax.random.key(0))
        xs = jnp.ones((16, 2))
        ys = eqpar.filter_vmap(model)(xs)  # model broadcast, xs mapped
        assert ys.shape == (16, 1)
        ```
    """
    check_axis_size(axis_size, "filter_vmap")
    check_axis_name(axis_name, "filter_vmap")
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
    options = (in_axes, out_axes, axis_name, axis_size, chunk_size)
    caller = shared("vmap", options, lambda: _VmapCaller(*options))
    return decorator_or_call(fun, lambda f: transformed(f, caller), "filter_vmap")
