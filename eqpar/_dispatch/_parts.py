"""A call's arguments, flattened one by one, each Module once.

A call `fun(*args, **kwargs)` is cut into *parts*: the function (or, for a bound
method of a Module, its function and its Module), each positional argument, and the
keyword arguments as one dict. Each part is flattened into a `_Token` (its tree
structure, leaf types and static values, interned so that equal parts share one
token) plus its arrays and its plain Python functions (held apart: programs key
them by identity and hold them weakly).

A Module is immutable, so the same Module object always flattens the same way: its
part is remembered (`_RECORDS`, keyed by identity, dropped when the Module dies) and
a Module passed again (a fixed model in an evaluation loop, a frozen encoder, a
built-once step's own parameters) costs a dict lookup instead of a flatten
(`benchmarks/dispatch.py`, "leaves": this is what keeps a 1000-leaf model within
10% of `jax.jit`). Only Modules whose every node is immutable (Modules, tuples,
`None`) are remembered; one holding a list or a dict is flattened on every call.
"""

import types
import weakref
from collections.abc import Hashable, Sequence
from typing import Any

import equinox as eqx
import jax.tree_util as jtu

from .._specs import ARRAY_TYPES, DYNAMIC, FUNCTION, is_array, merge_leaves, Static
from ._tables import Bounded


MAX_TOKENS = 4096
"""Distinct argument structures remembered per process."""
MAX_RECORDS = 4096
"""Live Modules whose parts are remembered per process."""


def _immutable(treedef: Any) -> bool:
    """Whether every node of `treedef` is immutable: Modules (frozen), tuples and
    named tuples, None. A list or a dict could change under a remembered Module."""
    data = treedef.node_data()
    if data is None:
        return True
    kind = data[0]
    if not (
        kind is tuple or kind is type(None) or issubclass(kind, (tuple, eqx.Module))
    ):
        return False
    return all(_immutable(child) for child in treedef.children())


class Token(Static):
    """One part's tree structure, leaf types and static values: its `Static`, each
    leaf `DYNAMIC` (an array), `FUNCTION` (a plain function) or its value.
    Interned (see `part`): equal parts share one token, hashed by identity."""

    __slots__ = ("recordable", "__weakref__")

    def __init__(self, treedef: Any, signature: tuple[Any, ...]):
        super().__init__(treedef, signature)
        self.recordable = _immutable(treedef)

    def same(self, other: "Token") -> bool:
        """Equal structure, leaf types and static values (tokens are interned, so
        this is identity unless one was dropped from its table and made again)."""
        return (
            self.treedef == other.treedef
            and len(self.signature) == len(other.signature)
            and all(
                x is y or (type(x) is type(y) and x == y)
                for x, y in zip(self.signature, other.signature)
            )
        )


Part = tuple[Token, tuple[Any, ...], tuple[Any, ...]]
"""One argument of one call: `(token, arrays, functions)`."""


_LEAF = jtu.tree_structure(0)
ARRAY = Token(_LEAF, (DYNAMIC,))
"""The token of an argument that is itself an array."""
PLAIN_FUNCTION = Token(_LEAF, (FUNCTION,))
"""The token of an argument that is itself a plain Python function."""
METHOD_FUNCTION = Token(_LEAF, (FUNCTION,))
"""The token of the function of a bound method (its Module is the next part)."""

_TOKENS: Bounded[Token] = Bounded(MAX_TOKENS)
# id(Module) -> (weak reference to it, its part)
_RECORDS: Bounded[tuple["weakref.ref[Any]", Part]] = Bounded(MAX_RECORDS)


def split_call(
    fun: Any, args: tuple, kwargs: dict, context: Hashable
) -> tuple[list[Part], tuple, tuple[Any, ...]]:
    """The parts of `fun(*args, **kwargs)` (in the order of their leaves in the
    flattened `(fun, args, kwargs)`), its program key, and its arrays.

    The key is the context, whether there are keyword arguments, every part's token
    and the identity of every plain function in the call (functions are held
    weakly, see `Compiled`).
    """
    if type(fun) is types.MethodType and isinstance(fun.__self__, eqx.Module):
        parts = [(METHOD_FUNCTION, (), (fun.__func__,)), part(fun.__self__)]
    else:
        parts = [part(fun)]
    parts.extend(map(part, args))
    if kwargs:
        parts.append(part(kwargs))
    key: list[Any] = [context, bool(kwargs)]
    ids: list[int] = []
    arrays: tuple[Any, ...] = ()
    for token, part_arrays, functions in parts:
        key.append(token)
        if part_arrays:  # tuple concatenation: no Python loop over the arrays
            arrays += part_arrays
        if functions:
            ids.extend(map(id, functions))
    return parts, tuple(key + ids), arrays


def part(x: Any) -> Part:
    """One argument's part (a remembered Module's without flattening it)."""
    t = type(x)
    if t in ARRAY_TYPES:
        return (ARRAY, (x,), ())
    if t is types.FunctionType:
        return (PLAIN_FUNCTION, (), (x,))
    found = _RECORDS.get(id(x))  # never an array: only Modules are remembered
    if found is not None and found[0]() is x:
        return found[1]
    if is_array(x):  # an array type not seen yet
        return (ARRAY, (x,), ())
    made = _made(*jtu.tree_flatten(x))
    if made[0].recordable and isinstance(x, eqx.Module):
        _remember(x, made)
    return made


def _made(leaves: list[Any], treedef: Any) -> Part:
    """The part of a tree flattened into `leaves` and `treedef`."""
    arrays, functions, signature, statics = [], [], [], []
    for leaf in leaves:
        if is_array(leaf):
            arrays.append(leaf)
            signature.append(DYNAMIC)
        elif type(leaf) is types.FunctionType:
            functions.append(leaf)
            signature.append(FUNCTION)
        else:
            signature.append(leaf)
            statics.append(leaf)
    key = (treedef, tuple(map(type, leaves)), tuple(statics))
    token = _TOKENS.get(key)  # TypeError for an unhashable static value
    if token is None:
        token = _TOKENS.get_or_make(key, lambda: Token(treedef, tuple(signature)))
    return (token, tuple(arrays), tuple(functions))


# ----------------------------------------------------------------------------------
# Outputs fed back


OutputPlan = tuple[tuple[int | None, Token, tuple[Any, ...], int, int], ...]
"""Per Module at the top of a compiled call's output: where it is (`None`: the
output itself, else its index in the output tuple), its token and functions, and
the range of its arrays among the output's."""


def plan_outputs(tree: Any, static: Static, arrays: Sequence[Any]) -> OutputPlan:
    """How to remember the parts of the Modules at the top of `tree`, a compiled
    call's output rebuilt from `static` and `arrays` (concrete), without flattening
    them: made once per output structure (the first concrete output), then used by
    `remember_outputs` on every call."""
    treedef, signature = static.treedef, static.signature
    if isinstance(tree, eqx.Module):
        children = [(None, tree, treedef, 0, len(signature))]
    elif type(tree) is tuple:
        children, start = [], 0
        for i, (item, child) in enumerate(zip(tree, treedef.children())):
            stop = start + child.num_leaves
            if isinstance(item, eqx.Module):
                children.append((i, item, child, start, stop))
            start = stop
    else:
        return ()
    plan = []
    for i, item, child, start, stop in children:
        first = sum(s is DYNAMIC for s in signature[:start])
        end = first + sum(s is DYNAMIC for s in signature[start:stop])
        leaves = merge_leaves(signature[start:stop], arrays[first:end])
        try:
            token, _, functions = _made(leaves, child)
        except TypeError:  # an unhashable static value: flattened when passed
            continue
        if token.recordable:
            plan.append((i, token, functions, first, end))
    return tuple(plan)


def remember_outputs(tree: Any, plan: OutputPlan, arrays: Sequence[Any]) -> None:
    """Remembers the parts of the Modules at the top of `tree` (see `plan_outputs`),
    so that one passed back into a call (a training loop's model) is looked up,
    not flattened."""
    for i, token, functions, first, end in plan:
        _remember(
            tree if i is None else tree[i], (token, tuple(arrays[first:end]), functions)
        )


def _remember(module: Any, made: Part) -> None:
    key, records = id(module), _RECORDS  # closed over: safe at interpreter exit
    record = (weakref.ref(module, lambda _: records.discard(key, record)), made)
    records.put(key, record)
