"""Compile once per call signature, dispatch at the cost of raw `jax.jit`.

The other half of eqpar's one mechanism. Every eqpar transform is a `Transformed`
module holding the user's function and a `Compiled` dispatcher. A call:

1. flattens `(fun, args, kwargs)` once and looks the tree structure and the leaves'
   types up in a dict: a *plan* that says which leaves are arrays;
2. picks the arrays and the static leaves out with the plan, and looks the static
   values (plus a backend context, such as the mesh) up in the plan's dict: a hit
   gives a `jax.jit` of a body that takes only the arrays;
3. calls it with the tuple of arrays and rebuilds the output from the arrays it
   returns and the non-array output leaves recorded when the body was traced.

Spec resolution, error checks and the backend transform (`jax.vmap`, `jax.shard_map`)
all happen inside the body, i.e. once per trace, never on the hot path. `jax.jit`'s
own cache then keys on shapes and dtypes.
"""

import operator
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Literal

import equinox as eqx
import jax
import jax.core
import jax.tree_util as jtu

from ._specs import DYNAMIC, is_array, merge_leaves, split_leaves


# A backend's run: traced once per signature and shapes. Returns the output pytree
# and, when it knows them, the shardings its array inputs should have (used to place
# inputs that `jax.jit` refuses as they are).
Run = Callable[[Any, tuple, dict, Any], tuple[Any, list[Any] | None]]


_flatten = jtu.tree_flatten


class _Identity:
    """Key for an unhashable static leaf: equal only to the very same object."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any):
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other: object) -> bool:
        return type(other) is _Identity and other.obj is self.obj


def _hashable(x: Any) -> Any:
    try:
        hash(x)
    except TypeError:
        return _Identity(x)
    return x


def _avals(arrays: Sequence[Any]) -> tuple:
    return tuple((x.shape, x.dtype) for x in arrays)


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:
        return False


class _Entry:
    """One call signature: its compiled function and what its traces recorded."""

    __slots__ = ("jitted", "out", "by_avals", "first_avals", "placements")

    def __init__(self) -> None:
        self.jitted: Callable[[tuple[Any, ...]], list[Any]] = _unset
        self.out: tuple[Any, tuple, bool] | None = None
        self.first_avals: tuple | None = None
        # Non-array outputs that differ between traces (they depend on shapes) are
        # looked up by input shapes instead. Rare; costs only those who need it.
        self.by_avals: dict[tuple, tuple[Any, tuple, bool]] | None = None
        self.placements: dict[tuple, list[Any]] = {}

    def record(
        self, treedef: Any, signature: list[Any], arrays: Sequence[Any], shardings: Any
    ) -> None:
        avals = _avals(arrays)
        if shardings is not None:
            self.placements[avals] = shardings
        all_dynamic = all(s is DYNAMIC for s in signature)
        out = (treedef, tuple(signature), all_dynamic)
        if self.by_avals is not None:
            self.by_avals[avals] = out
        elif self.out is None:
            self.out, self.first_avals = out, avals
        elif not _same(self.out[:2], out[:2]):
            assert self.first_avals is not None
            self.by_avals = {self.first_avals: self.out, avals: out}

    def rebuild(self, out_arrays: list[Any], in_arrays: Sequence[Any]) -> Any:
        out = self.out if self.by_avals is None else self.by_avals[_avals(in_arrays)]
        assert out is not None
        treedef, signature, all_dynamic = out
        if all_dynamic:
            return jtu.tree_unflatten(treedef, out_arrays)
        return jtu.tree_unflatten(treedef, merge_leaves(signature, out_arrays))

    def place(self, arrays: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """Inputs moved to where the compiled program wants them, or `None` when
        they already are there (so a failure had another cause)."""
        shardings = self.placements.get(_avals(arrays))
        if shardings is None:
            return None
        if all(
            isinstance(x, jax.Array)
            and not isinstance(x, jax.core.Tracer)
            and x.sharding == s
            for x, s in zip(arrays, shardings)
        ):
            return None
        if any(isinstance(x, jax.core.Tracer) for x in arrays):
            return None
        return tuple(jax.device_put(list(arrays), shardings))


def _unset(_: tuple[Any, ...]) -> list[Any]:
    raise AssertionError("unreachable: entry used before it was compiled")


Donate = Literal["none", "all"]


class _Plan:
    """One tree structure with one leaf type per position: which leaves are arrays
    is then fixed (array-ness is a property of the type), so picking the arrays and
    the static leaves out of a call is two `itemgetter`s, with no Python loop over
    the leaves. Under it, one `_Entry` per (context, static values)."""

    __slots__ = ("array_idx", "arrays", "statics", "entries", "slow")

    def __init__(self, leaves: list[Any]):
        self.array_idx = [i for i, leaf in enumerate(leaves) if is_array(leaf)]
        arrays = set(self.array_idx)
        self.arrays = _getter(self.array_idx)
        self.statics = _getter([i for i in range(len(leaves)) if i not in arrays])
        self.entries: dict[Hashable, _Entry] = {}
        self.slow: list[tuple[Any, _Entry]] = []  # static values that cannot be hashed

    def signature(self, leaves: list[Any]) -> list[Any]:
        signature = list(leaves)
        for i in self.array_idx:
            signature[i] = DYNAMIC
        return signature


def _getter(idx: list[int]) -> Callable[[list[Any]], tuple]:
    """`leaves -> tuple(leaves[i] for i in idx)`, at C speed."""
    if len(idx) >= 2:
        return operator.itemgetter(*idx)
    if len(idx) == 1:
        (i,) = idx
        return lambda leaves: (leaves[i],)
    return lambda leaves: ()


class Compiled:
    """The per-transform cache of compiled call signatures.

    `run(fun, args, kwargs, context)` is the backend; `context` is a hashable value
    computed per call by `context_fn` (e.g. the mesh) that is part of the key.
    """

    def __init__(
        self,
        run: Run,
        *,
        context_fn: Callable[[], Hashable] | None = None,
        donate: Donate = "none",
    ):
        if donate not in ("none", "all"):
            raise ValueError(f'`donate` must be "none" or "all", got {donate!r}.')
        self._run = run
        self._context_fn = context_fn
        self._donate = donate
        # (tree structure, leaf types) -> plan; types too, because 1, 1.0 and True
        # are equal and hash alike but trace differently.
        self._plans: dict[Hashable, _Plan] = {}
        self._slow_plans: list[tuple[Any, _Plan]] = []  # structures that cannot hash

    def __call__(self, fun: Any, args: tuple, kwargs: dict) -> Any:
        # The hot path: one flatten, a tuple of the leaves' types, two dict lookups,
        # two itemgetters and one call of the compiled function; no Python loop over
        # the leaves. Keep it that way (benchmarks/dispatch*.py).
        leaves, treedef = _flatten((fun, args, kwargs))
        shape = (treedef, tuple(map(type, leaves)))
        try:
            plan = self._plans[shape]
        except KeyError:
            plan = self._plans[shape] = _Plan(leaves)
        except TypeError:
            plan = self._slow_plan(shape, leaves)
        arrays = plan.arrays(leaves)
        key = (
            None if self._context_fn is None else self._context_fn(),
            plan.statics(leaves),
        )
        try:
            entry = plan.entries[key]
        except KeyError:
            entry = plan.entries[key] = self._new_entry(treedef, plan, leaves, key[0])
        except TypeError:
            entry = self._slow_entry(plan, key, treedef, leaves)
        try:
            out_arrays = entry.jitted(arrays)
        except Exception:
            placed = entry.place(arrays)
            if placed is None:
                raise
            arrays = placed
            out_arrays = entry.jitted(arrays)
        return entry.rebuild(out_arrays, arrays)

    def _slow_plan(self, shape: tuple, leaves: list[Any]) -> _Plan:
        for k, plan in self._slow_plans:
            if _same(k, shape):
                return plan
        plan = _Plan(leaves)
        self._slow_plans.append((shape, plan))
        return plan

    def _slow_entry(
        self, plan: _Plan, key: tuple, treedef: Any, leaves: list[Any]
    ) -> _Entry:
        context, statics = key
        slow_key = (context, tuple(map(_hashable, statics)))
        for k, entry in plan.slow:
            if _same(k, slow_key):
                return entry
        entry = self._new_entry(treedef, plan, leaves, context)
        plan.slow.append((slow_key, entry))
        return entry

    def _new_entry(
        self, treedef: Any, plan: _Plan, leaves: list[Any], context: Any
    ) -> _Entry:
        entry = _Entry()
        run = self._run
        signature = plan.signature(leaves)

        def body(arrays: tuple[Any, ...]) -> list[Any]:
            fun, args, kwargs = jtu.tree_unflatten(
                treedef, merge_leaves(signature, arrays)
            )
            out, shardings = run(fun, args, kwargs, context)
            out_leaves, out_treedef = jtu.tree_flatten(out)
            out_arrays, out_signature = split_leaves(out_leaves)
            entry.record(out_treedef, out_signature, arrays, shardings)
            return out_arrays

        donate = (0,) if self._donate == "all" else ()
        entry.jitted = jax.jit(body, donate_argnums=donate)
        return entry


_get = object.__getattribute__


class Transformed(eqx.Module):
    """A transformed function: a pytree (its function's arrays are leaves) that binds
    as a method and dispatches through its `Compiled` cache."""

    _fun: Callable
    _compiled: Compiled = eqx.field(static=True)

    @property
    def __wrapped__(self) -> Callable:
        return self._fun

    def __call__(self, /, *args: Any, **kwargs: Any) -> Any:
        # `object.__getattribute__` skips `eqx.Module.__getattribute__` (a Python-level
        # hook that wraps bound methods): two plain reads on the hot path instead.
        return _get(self, "_compiled")(_get(self, "_fun"), args, kwargs)

    def __get__(self, instance: Any, owner: Any) -> Any:
        del owner
        if instance is None:
            return self
        return eqx.Partial(self, instance)


def transformed(fun: Callable, compiled: Compiled) -> Any:
    return eqx.module_update_wrapper(Transformed(fun, compiled))


def decorator_or_call(fun: Any, make: Callable[[Callable], Any]) -> Any:
    """`@t`, `@t(...)` and `t(fn, ...)` in one place."""
    if fun is None:
        return make
    return make(fun)
