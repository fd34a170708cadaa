"""`filter_vmap`: `jax.vmap` over filtered pytrees, eager like `jax.vmap`, with
chunked (memory-bounded) maps."""

from collections.abc import Callable, Hashable
from typing import Any, Literal, overload

import equinox as eqx
import jax
import jax.core
import jax.tree_util as jtu
from jaxtyping import PyTree

from ._chunking import check_memory_budget, ChunkCache, run_chunked
from ._dispatch import Backend, Compiled, decorator_or_call, shared, transformed
from ._errors import Checked, SpecError
from ._mapped import AxisSpec, check_axis_name, check_axis_size, MappedCall


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
        self.compiled = None if chunk_size is None else Compiled(Backend(self._traced))

    def _traced(self, fun: Any, args: tuple, kwargs: dict, context: None) -> Any:
        del context
        return self(fun, args, kwargs)

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
    caller = getattr(target, "_caller", None)
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
