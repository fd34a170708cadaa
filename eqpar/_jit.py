"""`filter_jit`: the identity backend of eqpar's dispatcher (compile, nothing mapped).

It exists because a compiled call is where eqpar's other transforms usually live
(`filter_jit` of a function that uses `filter_vmap` inside), and because its dispatch
is what the user pays on every step: it costs about what `jax.jit` on the array
leaves costs, where `equinox.filter_jit` costs several times that.
"""

from collections.abc import Callable
from types import FunctionType
from typing import Any, overload

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
from ._errors import Checked


def _run(fun: Any, args: tuple, kwargs: dict, context: None) -> Any:
    del context
    return fun(*args, **kwargs)


_BACKEND = Backend(_run)


@overload
def filter_jit(
    fun: None = None, *, donate: Donate = "none"
) -> Callable[[Callable[..., Any]], Callable[..., Any]]: ...


@overload
def filter_jit(
    fun: Callable[..., Any], *, donate: Donate = "none"
) -> Callable[..., Any]: ...


def filter_jit(
    fun: Checked[Callable[..., Any] | None] = None, *, donate: Checked[Donate] = "none"
) -> Any:
    """Compiles `fun`, tracing array leaves and keeping every other leaf static.

    Same contract as `equinox.filter_jit`: arrays (JAX and NumPy) are traced, anything
    else (Python numbers, strings, functions, Module static fields) is part of the
    compiled signature, so changing it recompiles and keeping it does not. Static
    leaves must be hashable (an unhashable one raises `eqpar.SpecError` naming it).

    **Arguments:**

    - `fun`: the function, method or callable Module to compile.
    - `donate`: as in `equinox.filter_jit`: `"all"` donates every array input's
        buffer (including the function's own arrays), `"all-except-first"` all but
        those of the first argument, both silencing JAX's warning about donated
        buffers it could not reuse; `"warn"` and `"warn-except-first"` the same
        without silencing it; `"none"` (default) donates nothing.

    **Returns:**

    The compiled function (an `equinox.Module`, so a pytree that binds as a method).
    Its cache is shared by every `filter_jit` wrapper with the same `donate`, keyed
    on the call signature with the function held weakly: `filter_jit(step)(model,
    x)` written inline in a loop compiles once, as with `jax.jit`. `.lower(*args,
    **kwargs)` lowers ahead of time (`.compile()` on the result gives a callable).

    !!! example

        ```python
        import equinox as eqx, jax, jax.numpy as jnp, eqpar

        model = eqx.nn.MLP(4, 2, 16, 2, key=jax.random.key(0))
        forward = eqpar.filter_jit(lambda m, x: eqpar.filter_vmap(m)(x))
        assert forward(model, jnp.ones((8, 4))).shape == (8, 2)
        ```
    """
    # Wrappers are often built inline, once per call: the common case first.
    caller = _CALLERS.get(donate) if type(donate) is str else None
    if caller is None:
        donate = check_donate(donate)
        caller = shared("jit", donate, lambda: Compiled(_BACKEND, donate=donate))
        _CALLERS.put(donate, caller)
    if type(fun) is FunctionType:
        return transformed(fun, caller)
    return decorator_or_call(fun, lambda f: transformed(f, caller), "filter_jit")


# `donate` -> the shared caller (five values: checked before one is put in).
_CALLERS: Bounded[Compiled] = Bounded(8)
