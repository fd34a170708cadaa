"""`Compiled`: the compile cache of one transform with one set of options.

A call `fun(*args, **kwargs)` is handled as the one pytree `(fun, args, kwargs)`:

1. it is flattened once; the tree structure and the leaves' types select a `_Plan`,
   which knows which leaves are arrays (array-ness is a property of the type);
2. the plan picks out the arrays and the static leaves (two `itemgetter`s); the
   static leaves and the backend's context (e.g. the mesh) select a `Program`,
   made on first sight;
3. the program places the arrays if its backend runs on a mesh, calls its
   `jax.jit` once, and rebuilds the output (see `_program.py`).

Plain Python functions among the static leaves (the wrapped function, a function
inside a Module) are keyed by identity and held weakly: a cache never keeps a
function, or what it closes over, alive, and a program dies with its function.
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
from .._specs import DYNAMIC, is_array, leaf_names, merge_leaves
from ._program import check_donate, Donate, getter, Program, split_output
from ._tables import Bounded


MAX_PLANS = 256
"""Tree structures (with leaf types) remembered per transform and options."""
MAX_PROGRAMS = 256
"""Programs (static values and contexts) per tree structure."""


@dataclasses.dataclass(frozen=True)
class Backend:
    """What a compiling transform plugs into the core.

    - `run(fun, args, kwargs, context)`: the transform itself, traced inside
        `jax.jit` (e.g. a `jax.shard_map` of `fun`); returns the output pytree.
    - `context()`: computed on every call and part of the program's key (e.g. the
        context mesh); `None`: no context.
    - `targets(fun, args, kwargs, context)`: where each array leaf should be
        placed before the call (a sharding, or `None` to leave it), computed once
        per program and input shapes, outside any trace; `None`: no placement.
    - `check(args, kwargs)`: runs before every call (e.g. a precise eqpar error
        for something JAX would only reject later, and less clearly).
    """

    run: Callable[[Any, tuple, dict, Any], Any]
    context: Callable[[], Hashable] | None = None
    targets: Callable[[Any, tuple, dict, Any], Sequence[Any] | None] | None = None
    check: Callable[[tuple, dict], None] | None = None


class _Plan:
    """One tree structure with one leaf type per position: where the arrays, the
    plain Python functions and the other static leaves are. Under it, one
    `Program` per (context, static values)."""

    __slots__ = (
        "array_idx",
        "function_idx",
        "arrays",
        "statics",
        "functions",
        "programs",
    )

    def __init__(self, leaves: list[Any]):
        self.array_idx = [i for i, leaf in enumerate(leaves) if is_array(leaf)]
        self.function_idx = [
            i for i, leaf in enumerate(leaves) if type(leaf) is types.FunctionType
        ]
        others = set(self.array_idx) | set(self.function_idx)
        self.arrays = getter(self.array_idx)
        self.statics = getter([i for i in range(len(leaves)) if i not in others])
        self.functions = getter(self.function_idx)
        self.programs: Bounded[Program] = Bounded(MAX_PROGRAMS)


class _Weak:
    """Stands for a plain Python function in a program's signature: the program
    refers to it weakly (it is alive whenever the program is traced, since it is
    then being called)."""

    __slots__ = ("ref",)

    def __init__(self, ref: "weakref.ref[Any]"):
        self.ref = ref


class Compiled:
    """The compile cache of one transform with one set of options, shared by every
    wrapper that has them (see `shared`)."""

    def __init__(self, backend: Backend, *, donate: Donate = "none"):
        self._backend = backend
        self._donate: Donate = check_donate(donate)
        # (tree structure, leaf types) -> plan; the types too, because 1, 1.0 and
        # True are equal and hash alike but trace differently.
        self._plans: Bounded[_Plan] = Bounded(MAX_PLANS)

    def __call__(self, fun: Any, args: tuple, kwargs: dict) -> Any:
        check = self._backend.check
        if check is not None:
            check(args, kwargs)
        fun = as_tree(fun)
        program, arrays = self._lookup(fun, args, kwargs)
        return program(arrays, fun, args, kwargs)

    def lower(self, fun: Any, args: tuple, kwargs: dict) -> "Lowered":
        fun = as_tree(fun)
        program, arrays = self._lookup(fun, args, kwargs)
        arrays = program.prepare(arrays, fun, args, kwargs)
        return Lowered(program.lower(arrays), self, program, fun)

    def _lookup(self, fun: Any, args: tuple, kwargs: dict) -> tuple[Program, tuple]:
        leaves, treedef = jtu.tree_flatten((fun, args, kwargs))
        shape = (treedef, tuple(map(type, leaves)))
        plan = self._plans.get(shape)
        if plan is None:
            plan = self._plans.get_or_make(shape, lambda: _Plan(leaves))
        context = self._backend.context
        key = (
            None if context is None else context(),
            plan.statics(leaves),
            tuple(map(id, plan.functions(leaves))),
        )
        try:
            program = plan.programs.get(key)
        except TypeError:
            raise _unhashable(fun, args, kwargs) from None
        if program is None:
            program = plan.programs.get_or_make(
                key, lambda: self._program(plan, treedef, leaves, key, fun, args)
            )
        return program, plan.arrays(leaves)

    def _program(
        self,
        plan: _Plan,
        treedef: Any,
        leaves: list[Any],
        key: tuple,
        fun: Any,
        args: tuple,
    ) -> Program:
        context = key[0]
        signature: list[Any] = list(leaves)
        for i in plan.array_idx:
            signature[i] = DYNAMIC
        for i in plan.function_idx:  # the program goes when a function dies
            signature[i] = _Weak(
                weakref.ref(leaves[i], lambda _: plan.programs.discard(key, program))
            )
        function_idx = plan.function_idx
        run = self._backend.run

        def body(arrays: tuple[Any, ...]) -> Any:
            merged = merge_leaves(signature, arrays)
            for i in function_idx:
                merged[i] = merged[i].ref()
            f, a, k = treedef.unflatten(merged)
            return split_output(run(f, a, k, context))

        kept: list[int] = []
        if self._donate.endswith("except-first") and args:
            start = len(jtu.tree_leaves(fun))
            first = range(start, start + len(jtu.tree_leaves(args[0])))
            kept = [n for n, i in enumerate(plan.array_idx) if i in first]
        targets = self._backend.targets
        program = Program(
            body,
            array_idx=plan.array_idx,
            donate=self._donate,
            kept=kept,
            targets=None
            if targets is None
            else lambda f, a, k: targets(f, a, k, context),
            names=leaf_names,
        )
        return program


def _unhashable(fun: Any, args: tuple, kwargs: dict) -> SpecError:
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
    """An eqpar call lowered ahead of time: `.compile()` gives a callable that takes
    the same arguments (same static values, shapes and placements) as the call that
    was lowered; `.as_text()` shows the program."""

    def __init__(self, lowered: Any, compiled: Compiled, program: Program, fun: Any):
        self.lowered = lowered
        self._compiled = compiled
        self._program = program
        self._fun = fun

    def as_text(self) -> str:
        return self.lowered.as_text()

    def compile(self) -> "CompiledCall":
        return CompiledCall(self.lowered.compile(), self)


class CompiledCall:
    """A call compiled ahead of time (from `Lowered.compile()`)."""

    def __init__(self, executable: Any, lowered: Lowered):
        self.executable = executable
        self._lowered = lowered

    def __call__(self, /, *args: Any, **kwargs: Any) -> Any:
        lowered = self._lowered
        fun = lowered._fun
        program, arrays = lowered._compiled._lookup(fun, args, kwargs)
        if program is not lowered._program:
            raise SpecError(
                "This ahead-of-time compiled call was lowered for other static "
                "arguments (non-array leaves) or another tree structure than the "
                "ones it was now called with. Lower it again for these arguments."
            )
        arrays = program.prepare(arrays, fun, args, kwargs)
        return program.call_compiled(self.executable, arrays)

    def as_text(self) -> str:
        return self.executable.as_text()
