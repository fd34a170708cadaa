"""The wrapper every transform returns, and the callers shared between wrappers.

`Transformed` is an `equinox.Module` holding the user's function and a *caller*:
for a compiling transform a `Compiled`, for `filter_vmap` its mapper. Callers are
shared (`shared`) by every wrapper built with the same transform and options, so a
wrapper built inline, once per call, finds the programs compiled for the last one.
"""

import types
import weakref
from collections.abc import Callable, Hashable
from typing import Any

import equinox as eqx
import jax.tree_util as jtu

from .._errors import SpecError
from ._compiled import Compiled, Lowered
from ._tables import Bounded


MAX_SHARED = 256
"""Option sets per process whose callers are remembered."""
MAX_WRAPPERS = 1024
"""Plain functions per process whose wrapper structures are remembered."""

WRAPPER_FIELDS = (
    "__module__",
    "__name__",
    "__qualname__",
    "__doc__",
    "__annotations__",
)
"""What a wrapper copies from the function it wraps (as `eqx.module_update_wrapper`
and `functools.wraps` do)."""

_get = object.__getattribute__


class Transformed(eqx.Module):
    """A transformed function: a pytree (its function's arrays are leaves) that binds
    as a method and calls through its shared caller."""

    _fun: Callable
    _caller: Any = eqx.field(static=True)

    def __init__(self, fun: Callable, caller: Any):
        self._fun = fun
        self._caller = caller
        for name in WRAPPER_FIELDS:
            try:
                value = getattr(fun, name)
            except AttributeError:
                continue
            setattr(self, name, value)

    @property
    def __wrapped__(self) -> Callable:
        return self._fun

    def __call__(self, /, *args: Any, **kwargs: Any) -> Any:
        # `object.__getattribute__` skips `eqx.Module.__getattribute__` (a Python
        # hook that wraps methods): two plain reads on the hot path instead.
        return _get(self, "_caller")(_get(self, "_fun"), args, kwargs)

    def lower(self, /, *args: Any, **kwargs: Any) -> Lowered:
        """Lowers the call ahead of time, as `jax.jit(...).lower` does: returns an
        object whose `.compile()` is a callable taking the same arguments."""
        caller = _get(self, "_caller")
        if not isinstance(caller, Compiled):
            raise SpecError(
                "This transform does not compile on its own (filter_vmap maps like "
                "`jax.vmap`), so it has nothing to lower. Lower a compiled function "
                "that calls it: `eqpar.filter_jit(f).lower(*args)`."
            )
        return caller.lower(_get(self, "_fun"), args, kwargs)

    def __get__(self, instance: Any, owner: Any) -> Any:
        del owner
        if instance is None:
            return self
        return eqx.Partial(self, instance)


# (id(function), id(caller)) -> (weak reference to the function, wrapper structure)
_STRUCTURES: Bounded[tuple["weakref.ref[Any]", Any]] = Bounded(MAX_WRAPPERS)


def transformed(fun: Callable, caller: Any) -> Transformed:
    """`Transformed(fun, caller)`.

    Wrappers are often built inline, once per call (`filter_jit(step)(model, x)` in
    a loop), and building an `eqx.Module` costs about 10 us. For a plain function
    the first wrapper's tree structure is kept (weakly: it goes with the function)
    and later wrappers are rebuilt from it, as any JAX transform rebuilds a Module
    (under 1 us; `benchmarks/dispatch.py`, inline wrappers).
    """
    if type(fun) is not types.FunctionType:
        return Transformed(fun, caller)
    key = (id(fun), id(caller))  # the structure holds the caller: its id stays
    found = _STRUCTURES.get(key)
    if found is not None and found[0]() is fun:
        return found[1].unflatten((fun,))
    wrapper = Transformed(fun, caller)
    structures = _STRUCTURES  # closed over: safe at interpreter exit
    entry = (
        weakref.ref(fun, lambda _: structures.discard(key, entry)),
        jtu.tree_structure(wrapper),
    )
    structures.put(key, entry)
    return wrapper


def decorator_or_call(fun: Any, make: Callable[[Callable], Any], who: str) -> Any:
    """`@t`, `@t(...)` and `t(fn, ...)` in one place."""
    if fun is None:
        return lambda f: decorator_or_call(f, make, who)
    if not callable(fun):
        raise SpecError(
            f"{who} transforms a function, but was given {type(fun).__name__} "
            f"{fun!r:.80}, which is not callable. Pass the function first "
            f"(`{who}(fn, ...)`), or use `@{who}(...)` as a decorator."
        )
    return make(fun)


_SHARED: Bounded[Any] = Bounded(MAX_SHARED)


def _options_key(kind: str, options: Any) -> Hashable | None:
    leaves, treedef = jtu.tree_flatten(options, is_leaf=lambda x: x is None)
    key = (kind, treedef, tuple((type(leaf), leaf) for leaf in leaves))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def shared(kind: str, options: Any, make: Callable[[], Any]) -> Any:
    """The caller for transform `kind` with `options`, made once and shared by every
    wrapper with equal options. Options that cannot be hashed get a caller of their
    own (their wrapper then compiles for itself)."""
    key = _options_key(kind, options)
    if key is None:
        return make()
    return _SHARED.get_or_make(key, make)
