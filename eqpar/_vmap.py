"""`filter_vmap`: the `jax.vmap` backend, and the mapped-call plumbing it shares with
`filter_pmap` (both map one axis per leaf with int/None specs)."""

from collections.abc import Callable, Hashable, Sequence
from typing import Any, Literal, overload

import equinox as eqx
import jax
import jax.core
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import PyTree

from ._chunking import (
    check_memory_budget,
    ChunkCache,
    LEGACY,
    per_example_keys,
    run_chunked,
    SPLIT,
)
from ._dispatch import Compiled, decorator_or_call, shared, transformed
from ._errors import AxisSizeError, Checked, SpecError
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
        size = check_int_axes(axes, self.leaves, names, "in_axes")
        if size is not None and axis_size is not None and size != axis_size:
            raise AxisSizeError(
                f"`axis_size={axis_size}` was given but the mapped arguments have "
                f"size {size} along their mapped axes."
            )
        # None: nothing is mapped and no size was given (see `require_size`).
        self.size: int | None = size if size is not None else axis_size
        if keys and self.size is None:
            raise SpecError(
                f"in_axes gives `eqpar.split_key` for {names()[keys[0]]}, but no "
                "other argument is mapped and `axis_size` was not given, so the "
                "number of per-example keys is unknown. Map the batch, or pass "
                "`axis_size=`."
            )
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


class _VmapCaller:
    """`filter_vmap`'s caller: maps eagerly (no `jax.jit`), like `jax.vmap`.

    A chunked map is a `lax.scan`, which compiles anyway; called outside any trace,
    it goes through a compile cache of its own (`Compiled`, keyed like
    `filter_jit`), so that calling it again does not trace and compile it again.
    """

    def __init__(
        self,
        in_axes: Any,
        out_axes: Any,
        axis_name: Hashable | None,
        axis_size: int | None,
        chunk_size: int | Literal["auto"] | None,
        memory_budget: int | float | None,
    ):
        self.in_axes = in_axes
        self.out_axes = out_axes
        self.axis_name = axis_name
        self.axis_size = axis_size
        self.chunk_size = chunk_size
        self.auto = ChunkCache(memory_budget) if chunk_size == "auto" else None
        self.compiled = None if chunk_size is None else Compiled(self._traced)

    def _traced(
        self, fun: Any, args: tuple, kwargs: dict, context: None
    ) -> tuple[Any, None]:
        del context
        return self(fun, args, kwargs), None

    def chunk_for(self, call: MappedCall, size: int) -> int | None:
        """The chunk this call maps at a time (`None`: all at once)."""
        if self.auto is not None:
            chunk = self.auto.choose(call, size, "filter_vmap").chunk
        else:
            chunk = self.chunk_size
        assert chunk is None or isinstance(chunk, int)
        return None if chunk is None or chunk >= size else chunk

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
            chunk = self.chunk_for(call, size)
            if chunk is None:
                mapped_out, unmapped_out = call.vmap(self.axis_name, size)(call.mapped)
            elif self.compiled is not None and not any(
                isinstance(leaf, jax.core.Tracer) for leaf in call.leaves
            ):
                return self.compiled(fun, args, kwargs)
            else:
                mapped_out, unmapped_out = run_chunked(call, size, chunk)
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
    chunk_size: int | Literal["auto"] | None = None,
    memory_budget: int | float | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]: ...


@overload
def filter_vmap(
    fun: Callable[..., Any],
    *,
    in_axes: PyTree[AxisSpec] = eqx.if_array(0),
    out_axes: PyTree[AxisSpec] = eqx.if_array(0),
    axis_name: Hashable | None = None,
    axis_size: int | None = None,
    chunk_size: int | Literal["auto"] | None = None,
    memory_budget: int | float | None = None,
) -> Callable[..., Any]: ...


def filter_vmap(
    fun: Checked[Callable[..., Any] | None] = None,
    *,
    in_axes: Checked[PyTree[AxisSpec]] = eqx.if_array(0),
    out_axes: Checked[PyTree[AxisSpec]] = eqx.if_array(0),
    axis_name: Checked[Hashable | None] = None,
    axis_size: Checked[int | None] = None,
    chunk_size: Checked[int | Literal["auto"] | None] = None,
    memory_budget: Checked[int | float | None] = None,
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
        always static, whatever their spec. [`eqpar.split_key`][] (as a whole spec
        or for one argument) also maps a scalar random key: one key per example.
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
        chunks) so that only one chunk's intermediates are alive; the same result as
        unchunked, to floating-point tolerance. When it does not divide the size,
        the last chunk starts early and recomputes a few elements of the one before
        it: one body is traced and compiled whatever the remainder, with no padded
        copy of the inputs or trimmed copy of the outputs. `"auto"` picks the
        largest chunk whose compiled temporaries fit `memory_budget`, read from
        XLA's memory analysis (see the [chunking page](../chunking.md) and
        [`eqpar.chosen_chunk_size`][]). Cannot be combined with `axis_name`, since
        a collective needs the whole axis at once.
    - `memory_budget`: with `chunk_size="auto"`: the bytes of temporaries a chunk
        may use, as an int, or as a float in (0, 1] a fraction of the device's
        memory (what the backend reports; on CPU, the host's memory). Default
        (`None`): a quarter of the device's memory where the backend reports it
        (GPU, TPU), 1 GiB where it does not (CPU).

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
        if chunk_size != "auto" and (
            isinstance(chunk_size, bool)
            or not isinstance(chunk_size, int)
            or chunk_size < 1
        ):
            raise SpecError(
                "filter_vmap: `chunk_size` must be a positive int (examples per "
                "chunk), 'auto' (the largest chunk that fits `memory_budget`) or "
                f"None (no chunking), got {chunk_size!r}."
            )
        if axis_name is not None:
            raise SpecError(
                f"`chunk_size={chunk_size}` cannot be combined with "
                f"`axis_name={axis_name!r}`: a chunked map runs chunks one after "
                "another, so a collective over the axis would only see one chunk. "
                "Drop `chunk_size`, or compute the reduction outside the map."
            )
    check_memory_budget(memory_budget, chunk_size)
    options = (in_axes, out_axes, axis_name, axis_size, chunk_size, memory_budget)
    caller = shared("vmap", options, lambda: _VmapCaller(*options))
    return decorator_or_call(fun, lambda f: transformed(f, caller), "filter_vmap")


def chosen_chunk_size(fun: Callable[..., Any], /, *args: Any, **kwargs: Any) -> int:
    """How many elements a `filter_vmap`-ped function maps at a time for these
    arguments: the chunk that `chunk_size="auto"` picks (or the fixed
    `chunk_size`), without running the function.

    **Arguments:**

    - `fun`: a function made by [`eqpar.filter_vmap`][] (also as a method).
    - `*args`, `**kwargs`: the arguments it would be called with (arrays or
        `jax.ShapeDtypeStruct`s are both fine where only shapes matter, since
        nothing runs).

    **Returns:**

    The number of elements per chunk: the mapped size itself when the whole map
    runs at once (it fits the budget, or `chunk_size` is `None` or at least the
    size). With `"auto"` the choice is computed as a call would (compiling the map
    on abstract shapes, never running it) and cached per call signature, so asking
    first costs the call nothing. Each new choice is also logged at debug level on
    the `"eqpar"` logger, with the temporaries measured
    (`logging.getLogger("eqpar").setLevel(logging.DEBUG)`).

    !!! example

        ```python
        import jax, jax.numpy as jnp, eqpar

        def f(x):
            return jnp.tanh(jnp.outer(x, x)) @ x

        x = jnp.ones((1000, 128))
        small = eqpar.filter_vmap(f, chunk_size="auto", memory_budget=2**20)
        chunk = eqpar.chosen_chunk_size(small, x)
        assert 1 <= chunk < 1000                       # 1 MiB: chunked
        assert jnp.allclose(small(x), jax.vmap(f)(x), rtol=1e-4)  # same result
        ```
    """
    target, bound = fun, ()
    if isinstance(target, eqx.Partial):  # a method: the instance comes first
        target, bound = target.func, tuple(target.args)
    caller = getattr(target, "_compiled", None)
    if not isinstance(caller, _VmapCaller):
        raise SpecError(
            f"chosen_chunk_size takes a function made by `eqpar.filter_vmap`, got "
            f"{type(fun).__name__} {fun!r:.80}. Pass the mapped function, e.g. "
            "`eqpar.chosen_chunk_size(eqpar.filter_vmap(f, chunk_size='auto'), x)`."
        )
    found: list[int] = []

    def choose(args: tuple, kwargs: dict) -> None:
        call = MappedCall(
            target._fun,  # type: ignore[attr-defined]
            args,
            kwargs,
            caller.in_axes,
            caller.out_axes,
            caller.axis_size,
        )
        size = call.require_size("chosen_chunk_size")
        chunk = caller.chunk_for(call, size)
        found.append(size if chunk is None else chunk)

    leaves = jtu.tree_leaves((bound, args, kwargs))
    if any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves):
        eqx.filter_eval_shape(choose, bound + args, kwargs)  # shapes only
    else:
        choose(bound + args, kwargs)
    return found[0]
