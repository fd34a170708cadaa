"""`Compiled`: the compile cache of one transform with one set of options.

A call `fun(*args, **kwargs)`:

1. is cut into parts (`_parts.py`): each argument's tree structure, leaf types and
   static values as an interned token, its arrays, and its plain functions (a
   Module passed again is not flattened again);
2. the tokens, the identities of the functions and the backend's context (e.g. the
   mesh) select a `Program`, made on first sight;
3. the program places the arrays if its backend runs on a mesh, calls its
   `jax.jit` once, and rebuilds the output (see `_program.py`).

Plain Python functions in a call (the wrapped function, a function inside a
Module) are keyed by identity and held weakly: a cache never keeps a function, or
what it closes over, alive, and a program dies with its functions.
"""

import dataclasses
import inspect
import types
import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import equinox as eqx
import jax.tree_util as jtu

from .._errors import SpecError
from .._specs import is_array, leaf_names
from ._parts import METHOD_FUNCTION, Part, split_call, Token
from ._program import check_donate, Donate, Program, split_output
from ._tables import Bounded


MAX_PROGRAMS = 1024
"""Programs (argument structures, static values, contexts) per transform and
options."""


@dataclasses.dataclass(frozen=True)
class Backend:
    """What a compiling transform plugs into the core.

    - `run(fun, args, kwargs, context)`: the transform itself, traced inside
        `jax.jit` (e.g. a `jax.shard_map` of `fun`); returns the output pytree.
    - `context(fun, args, kwargs)`: computed on every call and part of the
        program's key (e.g. the context mesh, or specs read from where the
        arguments are placed); `None`: no context.
    - `targets(fun, args, kwargs, context)`: where each array leaf should be
        placed before the call (a sharding, or `None` to leave it), computed once
        per program and input shapes, outside any trace; `None`: no placement.
    - `check(args, kwargs)`: runs before every call (e.g. a precise eqpar error
        for something JAX would only reject later, and less clearly).
    """

    run: Callable[[Any, tuple, dict, Any], Any]
    context: Callable[[Any, tuple, dict], Hashable] | None = None
    targets: Callable[[Any, tuple, dict, Any], Sequence[Any] | None] | None = None
    check: Callable[[tuple, dict], None] | None = None


class _Weak:
    """Stands for a plain Python function in a program: the program refers to it
    weakly (it is alive whenever the program is traced, since it is then being
    called)."""

    __slots__ = ("ref",)

    def __init__(self, ref: "weakref.ref[Any]"):
        self.ref = ref


class Compiled:
    """The compile cache of one transform with one set of options, shared by every
    wrapper that has them (see `shared`)."""

    def __init__(self, backend: Backend, *, donate: Donate = "none"):
        self._backend = backend
        self._check = backend.check
        self._context = backend.context
        self._donate: Donate = check_donate(donate)
        self._programs: Bounded[Program] = Bounded(MAX_PROGRAMS)

    def __call__(self, fun: Any, args: tuple, kwargs: dict) -> Any:
        if self._check is not None:
            self._check(args, kwargs)
        program, arrays, _ = self._lookup(fun, args, kwargs)
        return program(arrays, fun, args, kwargs)

    def lower(self, fun: Any, args: tuple, kwargs: dict) -> "Lowered":
        if self._check is not None:
            self._check(args, kwargs)
        program, arrays, key = self._lookup(fun, args, kwargs)
        arrays = program.prepare(arrays, fun, args, kwargs)
        return Lowered(program.lower(arrays), self, program, fun, key)

    def _lookup(
        self, fun: Any, args: tuple, kwargs: dict
    ) -> tuple[Program, tuple, tuple]:
        """The call's program (made on first sight), its arrays and its key."""
        program, arrays, parts, key = self._find(fun, args, kwargs)
        if program is None:
            program = self._programs.get_or_make(
                key, lambda: self._program(parts, key, len(args), bool(kwargs))
            )
        return program, arrays, key

    def _find(
        self, fun: Any, args: tuple, kwargs: dict
    ) -> tuple[Program | None, tuple, list[Part], tuple]:
        """The call's program if there is one yet, its arrays, parts and key."""
        context = self._context
        try:
            parts, key, arrays = split_call(
                fun,
                args,
                kwargs,
                None if context is None else context(fun, args, kwargs),
            )
            return self._programs.get(key), arrays, parts, key
        except TypeError:
            raise _unhashable(fun, args, kwargs) from None

    def _program(
        self, parts: list[Part], key: tuple, n_args: int, has_kwargs: bool
    ) -> Program:
        context = key[0]
        tokens = [token for token, _, _ in parts]
        weak = [  # the program goes when one of its functions dies
            _Weak(weakref.ref(f, lambda _: self._programs.discard(key, program)))
            for _, _, functions in parts
            for f in functions
        ]
        run = self._backend.run

        def body(arrays: tuple[Any, ...]) -> Any:
            fun, args, kwargs = _rebuild_call(tokens, arrays, weak, n_args, has_kwargs)
            return split_output(run(fun, args, kwargs, context))

        first = 2 if tokens[0] is METHOD_FUNCTION else 1  # where args[0] is
        kept: list[int] = []
        if self._donate.endswith("except-first") and n_args:
            start = sum(len(arrays) for _, arrays, _ in parts[:first])
            kept = list(range(start, start + len(parts[first][1])))
        targets = self._backend.targets
        program = Program(
            body,
            n_arrays=sum(len(arrays) for _, arrays, _ in parts),
            donate=self._donate,
            kept=kept,
            targets=None
            if targets is None
            else lambda f, a, k: targets(as_tree(f), a, k, context),
            names=_array_names,
        )
        return program


def same_key(a: tuple, b: tuple) -> bool:
    """Whether two program keys select the same program: equal, or equal but for
    tokens made anew (a token dropped from its table and made again is another
    object with the same structure, leaf types and static values)."""
    if a == b:
        return True
    return len(a) == len(b) and all(
        x == y or (isinstance(x, Token) and isinstance(y, Token) and x.same(y))
        for x, y in zip(a, b)
    )


def _array_names(fun: Any, args: tuple, kwargs: dict) -> list[str]:
    """A name for each array of a call, for errors."""
    call = (as_tree(fun), args, kwargs)
    names = leaf_names(*call)
    return [n for n, leaf in zip(names, jtu.tree_leaves(call)) if is_array(leaf)]


def _rebuild_call(
    tokens: list[Token],
    arrays: tuple[Any, ...],
    weak: list[_Weak],
    n_args: int,
    has_kwargs: bool,
) -> tuple[Any, tuple, dict]:
    """`(fun, args, kwargs)` from the parts' tokens, arrays and functions."""
    array_it = iter(arrays)
    function_it = (w.ref() for w in weak)
    values = [token.merge(array_it, function_it) for token in tokens]
    if tokens[0] is METHOD_FUNCTION:
        values[:2] = [_MethodNode(values[0], values[1])]
    kwargs = values.pop() if has_kwargs else {}
    return values[0], tuple(values[1 : 1 + n_args]), kwargs


def _unhashable(fun: Any, args: tuple, kwargs: dict) -> SpecError:
    fun = as_tree(fun)
    names = leaf_names(fun, args, kwargs)
    culprits = []
    for name, leaf in zip(names, jtu.tree_leaves((fun, args, kwargs))):
        if is_array(leaf):
            continue
        try:
            hash(leaf)
        except TypeError:
            culprits.append(f"{name} ({type(leaf).__name__})")
    where = "; ".join(culprits) if culprits else "(unknown)"
    return SpecError(
        "Every non-array leaf of a call is static: part of the compiled "
        "signature, so it must be hashable (as for `jax.jit` static arguments "
        f"and `equinox.filter_jit`). Not hashable: {where}. Make it hashable "
        "(e.g. a frozen dataclass, or a tuple instead of a list), turn it into "
        "an array, or close over it in the function instead of passing it."
    )


# ----------------------------------------------------------------------------------
# Bound methods of Modules


class _MethodNode:
    """A Python bound method of a Module (`model.__call__`), flattened as its
    function (a static leaf) and its Module (a subtree whose arrays are inputs), as
    Equinox flattens its own bound methods: `filter_pmap(model.__call__)` of a
    fresh Module of the same structure finds the same program. The backend gets it
    as the function: it calls like the bound method."""

    __slots__ = ("func", "owner")

    def __init__(self, func: Any, owner: Any):
        self.func, self.owner = func, owner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.func(self.owner, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:  # names arguments in errors
        return inspect.signature(types.MethodType(self.func, self.owner))

    def __getattr__(self, name: str) -> Any:  # __name__, __qualname__, ...
        if name in ("func", "owner"):
            raise AttributeError(name)
        return getattr(types.MethodType(self.func, self.owner), name)


jtu.register_pytree_with_keys(
    _MethodNode,
    lambda m: (
        ((jtu.GetAttrKey("__func__"), m.func), (jtu.GetAttrKey("__self__"), m.owner)),
        None,
    ),
    lambda _, children: _MethodNode(*children),
    flatten_func=lambda m: ((m.func, m.owner), None),
)


def as_tree(fun: Any) -> Any:
    """`fun`, with a Python bound method of a Module made a pytree (`_MethodNode`)."""
    if type(fun) is types.MethodType and isinstance(fun.__self__, eqx.Module):
        return _MethodNode(fun.__func__, fun.__self__)
    return fun


# ----------------------------------------------------------------------------------
# Ahead of time


class Lowered:
    """An eqpar call lowered ahead of time, as Equinox's: `.compile()` gives a
    callable that takes the same arguments (same static values, shapes and
    placements) as the call that was lowered; `.lowered` is JAX's
    `jax.stages.Lowered`, `.as_text()` shows the program."""

    def __init__(
        self, lowered: Any, compiled: Compiled, program: Program, fun: Any, key: tuple
    ):
        self.lowered = lowered
        self._compiled = compiled
        self._program = program  # held here: it outlives its place in the table
        self._fun = fun
        self._key = key

    def as_text(self) -> str:
        return self.lowered.as_text()

    def cost_analysis(self) -> Any:
        """JAX's estimate of the program's cost (`jax.stages.Lowered`'s)."""
        return self.lowered.cost_analysis()

    def compile(
        self, compiler_options: dict[str, str | bool] | None = None
    ) -> "CompiledCall":
        """Compiles the program (`compiler_options` as for JAX's and Equinox's
        `compile`)."""
        compiled = self.lowered.compile(compiler_options=compiler_options)
        return CompiledCall(compiled, self)


class CompiledCall:
    """A call compiled ahead of time (from `Lowered.compile()`), as Equinox's:
    `.compiled` is JAX's `jax.stages.Compiled`; `memory_analysis()` and
    `cost_analysis()` are its own."""

    def __init__(self, compiled: Any, lowered: Lowered):
        self.compiled = compiled
        self._lowered = lowered

    def __call__(self, /, *args: Any, **kwargs: Any) -> Any:
        lowered = self._lowered
        fun = lowered._fun
        _, arrays, _, key = lowered._compiled._find(fun, args, kwargs)
        program = lowered._program
        if not same_key(key, lowered._key):
            raise SpecError(
                "This ahead-of-time compiled call was lowered for other static "
                "arguments (non-array leaves) or another tree structure than the "
                "ones it was now called with. Lower it again for these arguments."
            )
        arrays = program.prepare(arrays, fun, args, kwargs)
        return program.call_compiled(self.compiled, arrays)

    @property
    def executable(self) -> Any:
        """The same as `.compiled` (eqpar's earlier name for it)."""
        return self.compiled

    def as_text(self) -> str:
        return self.compiled.as_text()

    def memory_analysis(self) -> Any:
        """The compiled program's memory use (`jax.stages.Compiled`'s: argument,
        output and temporary bytes)."""
        return self.compiled.memory_analysis()

    def cost_analysis(self) -> Any:
        """The compiled program's cost estimate (`jax.stages.Compiled`'s)."""
        return self.compiled.cost_analysis()
