"""`kernel`: Pallas and `custom_vjp` kernels inside `filter_shard_map(check_vma=True)`.

Under replication typing every value carries the mesh axes it varies over, and JAX
0.10 asks a kernel to spell its outputs' types out by hand
(`jax.ShapeDtypeStruct(..., manual_axis_type=...)` on a `pallas_call`), to match its
operands' types itself (`jax.lax.pcast` of a replicated weight before it meets a
sharded input), and in interpret mode its own loop carries and constants fail to
type at all. A `custom_vjp` function must cast its replicated inputs by hand, or its
backward pass is an error.

A kernel is a per-device computation: its outputs can differ between devices only
where its inputs do. `kernel` makes that the type. It runs the function on each
device's blocks with the typing set aside (a nested `jax.shard_map` with
`check_vma=False` over no new axes, entered by `jax.lax.pcast(..., to="unreduced")`,
a cast that moves no data), then types every output as varying over the union of the
axes its array inputs vary over. Its gradient is a `jax.custom_vjp`: the function's
own VJP (a `custom_vjp`'s backward rule, or autodiff), linearised in the forward pass
and pulled back in the backward pass the same way on each device (its residuals
saved, nothing recomputed), then, for an input that is the same along some of those
axes (a replicated weight), one `psum` over exactly those axes: each replicated
input's gradient is summed over the devices once, and an input that varies over
every axis of the union gets no collective at all (JAX #21855's extra all-reduce does
not arise).
"""

import types
from collections.abc import Callable, Hashable, Sequence
from typing import Any, overload

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax.sharding import PartitionSpec as P

from ._dispatch import decorator_or_call, transformed
from ._errors import Checked, MeshError, ReplicationError, SpecError
from ._specs import is_array, leaf_names, split_static, StaticCarrier
from ._vma import AxisName, typed, varying_axes


# ----------------------------------------------------------------------------------
# Running a function on device blocks with the typing set aside


def _untyped(
    fun: Callable[..., Sequence[Any]],
    arrays: Sequence[Any],
    name: Callable[[int], str],
) -> list[Any]:
    """`fun(*arrays)` on each device's blocks, traced without replication typing.

    The outputs come back typed as the same on every device (invariant): the caller
    gives them their real type. Each input enters as `unreduced` over the axes it
    varies over, a cast with no data movement that takes those axes out of its
    `varying` set, so that inside, where nothing is typed, every value agrees.
    `name(i)` names input `i` for errors.
    """
    entering = []
    for i, x in enumerate(arrays):
        axes = _ordered(varying_axes(x))
        try:
            entering.append(jax.lax.pcast(x, axes, to="unreduced") if axes else x)
        except NotImplementedError:  # no batching rule for the cast (JAX 0.10)
            raise _batched_error(name(i), axes) from None
    region = jax.shard_map(
        lambda *blocks: list(fun(*blocks)),
        mesh=jax.sharding.get_abstract_mesh(),
        in_specs=P(),
        out_specs=P(),
        axis_names=set(),
        check_vma=False,
    )
    return region(*entering)


def _ordered(axes: Any) -> tuple[Hashable, ...]:
    """`axes` in the order of the current mesh's axes (a stable tuple for JAX)."""
    names = jax.sharding.get_abstract_mesh().axis_names
    return tuple(a for a in names if a in axes)


def _typed_as(x: Any, axes: tuple[Hashable, ...]) -> Any:
    """An untyped region's output `x` typed as varying over `axes`."""
    return jax.lax.pcast(x, axes, to="varying") if axes else x


def _differentiable(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


# ----------------------------------------------------------------------------------
# A plain function's closed-over arrays are inputs too


def _closed_over(fun: Any) -> list[Any] | None:
    """The values a plain function closes over, if any of them holds an array
    (`lambda x: pallas(x, w)`): the kernel takes them as inputs, so that they get a
    type and a gradient like its arguments. `None` otherwise."""
    if type(fun) is not types.FunctionType or not fun.__closure__:
        return None
    try:
        contents = [cell.cell_contents for cell in fun.__closure__]
    except ValueError:  # a cell not yet filled
        return None
    if not any(is_array(leaf) for leaf in jtu.tree_leaves(contents)):
        return None
    return contents


def _with_cells(fun: types.FunctionType, contents: list[Any]) -> types.FunctionType:
    """`fun` closing over `contents` instead."""
    rebuilt = types.FunctionType(
        fun.__code__,
        fun.__globals__,
        fun.__name__,
        fun.__defaults__,
        tuple(types.CellType(c) for c in contents),
    )
    rebuilt.__kwdefaults__ = fun.__kwdefaults__
    return rebuilt


def _cell_names(fun: Any, cells: list[Any] | None) -> list[str]:
    if cells is None:
        return []
    names = []
    for var, value in zip(fun.__code__.co_freevars, cells):
        for path, _ in jtu.tree_flatten_with_path(value)[0]:
            where = jtu.keystr(path) or "(root)"
            names.append(f"`{var}` (closed over by the function) at {where}")
    return names


# ----------------------------------------------------------------------------------
# The call


class _Kernel:
    """`kernel`'s caller for one `varying` option: `(fun, args, kwargs) -> out`."""

    def __init__(self, varying: tuple[Hashable, ...] | None):
        self.varying = varying

    def __call__(self, fun: Callable, args: tuple, kwargs: dict) -> Any:
        manual = tuple(jax.sharding.get_abstract_mesh().manual_axes)
        if not typed(manual):  # outside shard_map, or check_vma=False: as it is
            return fun(*args, **kwargs)
        cells = _closed_over(fun)
        arrays, static = split_static((cells, fun, args, kwargs))
        names = lambda: [  # noqa: E731
            n
            for n, leaf in zip(
                _cell_names(fun, cells) + leaf_names(fun, args, kwargs),
                jtu.tree_leaves((cells, fun, args, kwargs)),
            )
            if is_array(leaf)
        ]
        out_axes = self._out_axes(arrays, manual, names)
        carry = StaticCarrier()

        def flat(*blocks: Any) -> list[Any]:
            c, f, a, k = static.merge(blocks)
            if c is not None:
                f = _with_cells(f, c)
            return carry.split(f(*a, **k))

        return carry.merge(
            _differentiated(flat, arrays, out_axes, lambda i: names()[i])
        )

    def _out_axes(
        self,
        arrays: Sequence[Any],
        manual: tuple[Hashable, ...],
        names: Callable[[], list[str]],
    ) -> tuple[Hashable, ...]:
        """The axes the outputs vary over: the union of the inputs' (or `varying`,
        checked to cover them)."""
        for i, x in enumerate(arrays):
            kind = jax.typeof(x).manual_axis_type
            partial = sorted(kind.unreduced | kind.reduced, key=str)
            if partial:
                raise ReplicationError(
                    f"eqpar.kernel got {names()[i]}, typed as a partial sum "
                    f"(unreduced or reduced) over mesh axes {partial}: a kernel "
                    "works on each device's own values. Reduce it first (e.g. "
                    f"`eqpar.psum(x, {partial[0]!r})`) and pass the result."
                )
        inputs = frozenset().union(*(varying_axes(x) for x in arrays))
        if self.varying is None:
            return _ordered(inputs)
        unknown = [a for a in self.varying if a not in manual]
        if unknown:
            raise MeshError(
                f"eqpar.kernel(varying={self.varying!r}) names mesh axes {unknown}, "
                f"but the manual axes here (those the enclosing `filter_shard_map` "
                f"maps over) are {list(manual)}. Name only those."
            )
        for i, x in enumerate(arrays):
            extra = sorted(varying_axes(x) - frozenset(self.varying), key=str)
            if extra:
                raise ReplicationError(
                    f"eqpar.kernel(varying={self.varying!r}) says the kernel's "
                    f"outputs are the same on every device along every other mesh "
                    f"axis, but its input {names()[i]} varies over mesh axes "
                    f"{extra} (its replication type), so its outputs may too. Add "
                    f"{extra} to `varying`, leave `varying` out to take the union "
                    f"of the inputs' axes, or reduce the input first (e.g. "
                    f"`eqpar.pmean(x, {extra[0]!r})`)."
                )
        return _ordered(frozenset(self.varying) | inputs)


def _batched_error(name: str, axes: tuple[Hashable, ...]) -> ReplicationError:
    return ReplicationError(
        f"eqpar.kernel is being batched (by `eqpar.filter_vmap` or `jax.vmap`) "
        f"inside a `filter_shard_map` with replication checking on, and JAX "
        f"{jax.__version__} cannot batch the cast that sets the typing aside for "
        f"its input {name} (varying over mesh axes {list(axes)}). Put the map "
        "inside the kernel: "
        "`eqpar.kernel(jax.vmap(fn, in_axes=...))` (a Pallas kernel can also take "
        "the batch as a grid axis), or pass `check_vma=False` to the enclosing "
        "`filter_shard_map`."
    )


def _differentiated(
    flat: Callable[..., list[Any]],
    arrays: Sequence[Any],
    out_axes: tuple[Hashable, ...],
    name: Callable[[int], str],
) -> list[Any]:
    """`flat(*arrays)` on each device, outputs typed as varying over `out_axes`.

    Its gradient is `flat`'s own VJP (linearised once, in the forward pass, on each
    device: its residuals are saved, nothing is recomputed), each input's gradient
    summed over the axes of `out_axes` that the input is the same along. `name(i)`
    names input `i` for errors.
    """
    in_axes = [_ordered(varying_axes(x)) for x in arrays]
    wrt = [i for i, x in enumerate(arrays) if _differentiable(x)]
    pullback_tree: list[Any] = []  # the pullback's structure, from the fwd trace

    @jax.custom_vjp
    def run(*arrays: Any) -> list[Any]:
        return [_typed_as(y, out_axes) for y in _untyped(flat, arrays, name)]

    def run_fwd(*arrays: Any) -> tuple[list[Any], list[Any]]:
        def linearised(*inputs: Any) -> list[Any]:
            def of(*diff: Any) -> list[Any]:
                full = list(inputs)
                for i, d in zip(wrt, diff):
                    full[i] = d
                return flat(*full)

            out, pullback = jax.vjp(of, *(inputs[i] for i in wrt))
            residuals, tree = jtu.tree_flatten(pullback)
            pullback_tree[:] = [(tree, len(out))]
            return [*out, *residuals]

        both = _untyped(linearised, arrays, name)
        n_out = pullback_tree[0][1]
        # Residuals are per device like the outputs: typed so, they stay per device
        # when they cross a map's boundary (a gradient taken outside the map).
        both = [_typed_as(y, out_axes) for y in both]
        return both[:n_out], both[n_out:]

    def run_bwd(residuals: list[Any], cts: list[Any]) -> tuple[Any, ...]:
        tree, n_out = pullback_tree[0]
        n_res = len(residuals)

        def pull(*values: Any) -> list[Any]:
            pullback = jtu.tree_unflatten(tree, values[:n_res])
            return list(pullback(list(values[n_res:])))

        def named(i: int) -> str:
            if i < n_res:
                return "a value the kernel saved for its gradient"
            return f"the cotangent of output {i - n_res}"

        grads = _untyped(pull, (*residuals, *cts), named)
        out: list[Any] = [None] * len(arrays)
        for i, g in zip(wrt, grads):
            g = _typed_as(g, out_axes)
            summed = tuple(a for a in out_axes if a not in in_axes[i])
            out[i] = jax.lax.psum(g, summed) if summed else g
        return tuple(out)

    run.defvjp(run_fwd, run_bwd)
    return run(*arrays)


# ----------------------------------------------------------------------------------
# The public function


@overload
def kernel(
    fun: None = None, *, varying: AxisName | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]: ...


@overload
def kernel(
    fun: Callable[..., Any], *, varying: AxisName | None = None
) -> Callable[..., Any]: ...


def kernel(
    fun: Checked[Callable[..., Any] | None] = None,
    *,
    varying: Checked[AxisName | None] = None,
) -> Any:
    """Makes a Pallas kernel or a `custom_vjp` function callable under replication
    typing (`filter_shard_map`'s default `check_vma=True`), with no hand-written
    types or casts.

    Inside a typed `filter_shard_map`, `fun` runs on each device's blocks with the
    typing set aside, so a `pl.pallas_call` needs no `manual_axis_type` on its
    `out_shape`, a replicated and a sharded input mix without `jax.lax.pcast`, and
    interpret mode's loop carries and constants type-check. Every output is then
    typed as varying over the mesh axes that any array input varies over (a kernel
    is a per-device function of its inputs: its outputs differ between devices only
    where they do).

    Gradients (reverse mode, first order) come from `fun`'s own VJP: its
    `jax.custom_vjp` backward rule, or autodiff where `fun` has one. The gradient
    of an input that is the same along some of those axes (a replicated weight) is
    summed over exactly those axes, once: one all-reduce per such input, none for
    an input that varies wherever the outputs do.

    Elsewhere (outside any `filter_shard_map`, under `check_vma=False`, `filter_pmap`
    or `Parallel`) `fun` is called as it is, so one kernel serves the single-device
    reference too.

    **Arguments:**

    - `fun`: the kernel: a function (or callable Module) of pytrees whose array
        leaves are its inputs, e.g. one that calls `pl.pallas_call(...)`, or a
        `jax.custom_vjp` function. The arrays a plain function closes over
        (`lambda x: kern(x, w)`) are inputs too, and so are a Module's own arrays;
        an array reached only through another function's closure is not: pass it
        as an argument. It must compute each device's outputs from that device's
        inputs only: no collectives, and no `jax.lax.axis_index` unless `varying`
        says so.
    - `varying`: the mesh axes the outputs vary over, if not only those of the
        inputs (a name or a tuple of names): for a kernel whose outputs differ
        between devices where its inputs do not (it reads `jax.lax.axis_index`).
        It must cover every axis an input varies over (else
        `eqpar.ReplicationError`, naming the input leaf and the axes) and name only
        the enclosing map's axes (else `eqpar.MeshError`).

    **Returns:**

    The wrapped kernel (an `equinox.Module`, so a pytree that binds as a method),
    taking and returning what `fun` does.

    !!! example

        ```python
        import jax, jax.numpy as jnp, eqpar
        from jax.experimental import pallas as pl
        from jax.sharding import PartitionSpec as P

        def scale_kernel(x_ref, w_ref, o_ref):
            o_ref[...] = x_ref[...] * w_ref[...] + 1.0

        @eqpar.kernel
        def scale(x, w):
            out = jax.ShapeDtypeStruct(x.shape, x.dtype)  # no manual_axis_type
            return pl.pallas_call(scale_kernel, out_shape=out, interpret=True)(x, w)

        n = jax.device_count()
        mesh = jax.make_mesh((n,), ("data",))
        x, w = jnp.arange(4.0 * n).reshape(2 * n, 2), jnp.array([[2.0, 3.0]])
        f = eqpar.filter_shard_map(
            lambda x, w: scale(x, jnp.tile(w, (2, 1))),  # x sharded, w replicated
            mesh=mesh, in_specs=(P("data"), P()), out_specs=P("data"),
        )
        assert (f(x, w) == x * w + 1.0).all()
        ```
    """
    if varying is not None:
        varying = _check_varying(varying)
    caller = _Kernel(varying)
    return decorator_or_call(fun, lambda f: transformed(f, caller), "eqpar.kernel")


def _check_varying(varying: Any) -> tuple[Hashable, ...]:
    names = tuple(varying) if isinstance(varying, tuple) else (varying,)
    for name in names:
        try:
            hash(name)
        except TypeError:
            raise SpecError(
                f"eqpar.kernel(varying=...) takes a mesh axis name or a tuple of "
                f"them, but was given {varying!r}, whose {name!r} is not a name."
            ) from None
    return names
