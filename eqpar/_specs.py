"""Partitioning and per-leaf specs: the half of eqpar's one mechanism that decides,
for every leaf of a call, whether it is an array (dynamic) or not (static), and which
spec (a vmap axis, a `PartitionSpec`) it gets.

A call `fun(*args, **kwargs)` is always handled as the single pytree
`(fun, args, kwargs)`: the function's own arrays (a Module used as the function,
a bound method's `self`) travel as inputs like any other, never as baked-in constants.

Specs are pytree prefixes. A spec leaf is `None`, an `int`, a `PartitionSpec`, or a
callable `leaf -> spec` evaluated on every leaf below it. A spec for the whole call
is either one spec for every argument, a tuple/list with one entry per positional
argument, or a dict keyed by parameter name (which is how keyword arguments get
theirs). Resolution runs while tracing, on tracers, so a callable spec may look at a
leaf's shape or dtype, and the compiled cache keys on shapes for free.
"""

import inspect
import math
import types
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.core
import jax.tree_util as jtu
import numpy as np
from jax.sharding import AbstractMesh, Mesh, PartitionSpec as P

from ._errors import AxisSizeError, MeshError, SpecError


# ----------------------------------------------------------------------------------
# Array or not

ARRAY_TYPES: set[type] = set()
"""The types `is_array` has seen to be arrays (a set lookup for hot loops)."""
_STATIC_TYPES: set[type] = set()


def is_array(x: Any) -> bool:
    """Whether `x` is an array leaf (a JAX array or tracer, or a NumPy array/scalar).

    Same answer as `equinox.is_array`, memoised on the type: this runs for every leaf
    of every call, so it must cost a set lookup, not an `isinstance` against an ABC.
    """
    t = type(x)
    if t in ARRAY_TYPES:
        return True
    if t in _STATIC_TYPES:
        return False
    answer = isinstance(x, (jax.Array, np.ndarray, np.generic))
    (ARRAY_TYPES if answer else _STATIC_TYPES).add(t)
    return answer


CONCRETE_TYPES: set[type] = set()
"""The types `is_concrete_array` has seen to be concrete arrays (a set lookup for
hot loops; a type not in it may still be one not seen yet)."""
_OTHER_TYPES: set[type] = set()


def is_concrete_array(x: Any) -> bool:
    """Whether `x` is a `jax.Array` with a value (not a tracer): the inputs that can
    be placed, and whose buffers can be deleted or donated. Typed PRNG key arrays
    count. Memoised on the type, like `is_array`."""
    t = type(x)
    if t in CONCRETE_TYPES:
        return True
    if t in _OTHER_TYPES:
        return False
    answer = isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
    (CONCRETE_TYPES if answer else _OTHER_TYPES).add(t)
    return answer


class Marker:
    """A named sentinel: stands for something among a tree's leaves (an array, a
    function, a default), compared by identity, so no user value (not even a
    string of the same name) is ever taken for it."""

    __slots__ = ("_text",)

    def __init__(self, text: str):
        self._text = text

    def __repr__(self) -> str:
        return self._text


DYNAMIC = Marker("<array>")
"""Stands in for an array leaf in a call signature."""
FUNCTION = Marker("<function>")
"""Stands in for a plain Python function held apart from a call's other leaves
(see `_dispatch/_parts.py`)."""


def split_leaves(leaves: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """Splits flat leaves into `(arrays, signature)`: `signature` is `leaves` with
    every array replaced by `DYNAMIC`."""
    arrays = []
    signature = []
    for leaf in leaves:
        t = type(leaf)
        if t in ARRAY_TYPES or (t not in _STATIC_TYPES and is_array(leaf)):
            arrays.append(leaf)
            signature.append(DYNAMIC)
        else:
            signature.append(leaf)
    return arrays, signature


def merge_leaves(signature: Sequence[Any], arrays: Sequence[Any]) -> list[Any]:
    """Inverse of `split_leaves`."""
    it = iter(arrays)
    return [next(it) if s is DYNAMIC else s for s in signature]


class Static:
    """What is left of a pytree once its arrays are taken out: its structure and
    its other leaves (any Python value; `DYNAMIC` where an array was, `FUNCTION`
    where a plain function was held apart). The one way eqpar carries a tree's
    non-array part across a transform that moves only arrays: a call's arguments
    into a compiled program (`_dispatch/_parts.py`'s tokens), an output out of
    `jax.jit` (as pytree node data), `shard_map`, a `make_jaxpr` or a map
    (`StaticCarrier`, `_mapped.py`). Compared by identity."""

    __slots__ = ("treedef", "signature")

    def __init__(self, treedef: Any, signature: tuple[Any, ...]):
        self.treedef = treedef
        self.signature = signature

    def merge(self, arrays: Iterable[Any], functions: Iterable[Any] = ()) -> Any:
        """The tree, with `arrays` (and `functions`) put back in order."""
        array_it, function_it = iter(arrays), iter(functions)
        return self.treedef.unflatten(
            [
                next(array_it)
                if s is DYNAMIC
                else next(function_it)
                if s is FUNCTION
                else s
                for s in self.signature
            ]
        )


def split_static(tree: Any) -> tuple[list[Any], Static]:
    """`tree`'s array leaves and the rest (`Static.merge` puts them back)."""
    leaves, treedef = jtu.tree_flatten(tree)
    arrays, signature = split_leaves(leaves)
    return arrays, Static(treedef, tuple(signature))


def replace_leaves(
    treedef: Any, leaves: Sequence[Any], index: Sequence[int], values: Sequence[Any]
) -> Any:
    """`treedef` unflattened from `leaves`, with `leaves[i]` replaced by the
    matching value for each `i` in `index`."""
    new = list(leaves)
    for i, value in zip(index, values):
        new[i] = value
    return treedef.unflatten(new)


def call_with(
    treedef: Any, leaves: Sequence[Any], index: Sequence[int], values: Sequence[Any]
) -> Any:
    """Calls the flattened call `(fun, args, kwargs)` (`treedef`, `leaves`) with
    the leaves at `index` replaced by `values`: how every transform runs the
    user's function on new leaves (a device's blocks, one mapped element, a chunk,
    a microbatch)."""
    fun, args, kwargs = replace_leaves(treedef, leaves, index, values)
    return fun(*args, **kwargs)


def abstract_signature(tree: Any) -> Any:
    """What a spec callable can see of `tree`: its structure, each array leaf's
    shape and dtype, and the other leaves' values. The same for concrete arrays
    and for the tracers that stand for them in their trace, so specs resolved
    before a call (to place its inputs) are found again while it is traced, and
    a user's callable spec runs once per signature. Plain functions are held
    weakly. Raises `TypeError` for an unhashable static leaf."""
    leaves, treedef = jtu.tree_flatten(tree)
    out = (treedef, tuple(map(_abstract_leaf, leaves)))
    hash(out)
    return out


def _abstract_leaf(x: Any) -> Any:
    if is_array(x):
        return (np.shape(x), x.dtype)
    if type(x) is types.FunctionType:  # held weakly, as programs hold functions:
        return weakref.ref(x)  # a dead one's entry matches no other function
    return (type(x), x)


class StaticCarrier:
    """Carries an output's non-array part around a JAX transform that only returns
    arrays (`shard_map`, `make_jaxpr`, a scan): `split(out)`, inside the
    transformed function, returns the output's array leaves and keeps its `Static`;
    `merge(arrays)`, once the transform has returned, rebuilds the output. One
    carrier per trace (the last trace's part is kept)."""

    __slots__ = ("static",)

    def __init__(self) -> None:
        self.static: Static | None = None

    def split(self, out: Any) -> list[Any]:
        arrays, self.static = split_static(out)
        return arrays

    def merge(self, arrays: Sequence[Any]) -> Any:
        assert self.static is not None, "merge before split"
        return self.static.merge(arrays)


# ----------------------------------------------------------------------------------
# Naming arguments and leaves, for error messages


def _positional_names(fun: Callable, n: int) -> list[str]:
    try:
        params = list(inspect.signature(fun).parameters.values())
    except (TypeError, ValueError):
        params = []
    names = []
    for i in range(n):
        if i < len(params) and params[i].kind in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ):
            names.append(params[i].name)
        else:
            names.append(f"args[{i}]")
    return names


def leaf_names(fun: Any, args: tuple, kwargs: dict) -> list[str]:
    """A readable name for every leaf of `(fun, args, kwargs)`, in flatten order:
    e.g. ``argument `model` at .layers[0].weight``."""
    names = []
    for path, _ in jtu.tree_flatten_with_path(fun)[0]:
        names.append(f"the function's own leaf at {jtu.keystr(path) or '(root)'}")
    arg_names = _positional_names(fun, len(args))
    for name, arg in zip(arg_names, args):
        for path, _ in jtu.tree_flatten_with_path(arg)[0]:
            names.append(f"argument `{name}` at {jtu.keystr(path) or '(root)'}")
    for name in sorted(kwargs):
        for path, _ in jtu.tree_flatten_with_path(kwargs[name])[0]:
            names.append(f"argument `{name}` at {jtu.keystr(path) or '(root)'}")
    return names


# ----------------------------------------------------------------------------------
# Resolving specs


def _is_none(x: Any) -> bool:
    return x is None


def _describe_structure(tree: Any) -> str:
    text = str(jtu.tree_structure(tree))
    return text if len(text) < 400 else text[:400] + "..."


def _is_number(x: Any) -> bool:
    return isinstance(x, (bool, int, float, complex))


def spread_prefix(
    prefix: Any,
    tree: Any,
    is_leaf: Callable[[Any], bool],
    not_a_prefix: Callable[[Any, Exception], Exception],
) -> list[tuple[Any, Any]]:
    """`(spec leaf, subtree of tree)` pairs for a pytree prefix `prefix` of `tree`;
    `not_a_prefix(spec structure, JAX's error)` is raised when it is not one."""
    spec_leaves, spec_def = jtu.tree_flatten(prefix, is_leaf=is_leaf)
    try:
        subtrees = spec_def.flatten_up_to(tree)
    except (ValueError, TypeError) as e:
        raise not_a_prefix(spec_def, e) from None
    return list(zip(spec_leaves, subtrees))


def broadcast_specs(
    prefix: Any, tree: Any, name: str, what: str, *, numbers: bool = False
) -> list[Any]:
    """Per-leaf spec leaves for `tree`, from the spec `prefix` (callables applied to
    array leaves; non-array leaves get `None`). With `numbers=True`, Python numbers
    get their spec too (as in Equinox's `out_axes`: `out_axes=0` on a returned `1`
    broadcasts it to an array)."""

    def not_a_prefix(spec_def: Any, e: Exception) -> SpecError:
        return SpecError(
            f"The {what} given for argument `{name}` is not a pytree prefix of that "
            f"argument. The spec is {prefix!r} with structure {spec_def}; the "
            f"argument has structure {_describe_structure(tree)}. Give one spec for "
            "the whole argument, or a tree that matches the argument's structure "
            f"down to where the specs start. (JAX said: {e})"
        )

    out = []
    for spec, sub in spread_prefix(prefix, tree, _is_none, not_a_prefix):
        for leaf in jtu.tree_leaves(sub):
            if not (is_array(leaf) or (numbers and _is_number(leaf))):
                out.append(None)
            elif callable(spec):
                out.append(spec(leaf))
            else:
                out.append(spec)
    return out


def resolve_call_specs(
    spec: Any,
    fun: Any,
    args: tuple,
    kwargs: dict,
    *,
    default: Any,
    what: str,
) -> list[Any]:
    """One resolved spec per leaf of `(fun, args, kwargs)` in flatten order.

    Non-array leaves and the function's own leaves get `None` (static, resp.
    broadcast). `default` is the spec of an argument a dict spec does not mention;
    `default=REQUIRED` makes that an error.
    """
    target = fun
    pos_names = _positional_names(target, len(args))
    if isinstance(spec, dict):
        passed = set(pos_names) | set(kwargs)
        unknown = [k for k in spec if k not in passed]
        if unknown:
            known = _parameter_names(target)
            if known is not None and any(k not in known for k in unknown):
                detail = (
                    f"which are not parameters of {_fun_name(target)} (its "
                    f"parameters are {sorted(known)})"
                )
            else:
                detail = (
                    "which were not passed in this call (a parameter left to its "
                    "default value cannot be mapped or sharded: it is ambiguous "
                    "whether the default is batched)"
                )
            raise SpecError(
                f"{what} names {sorted(unknown)}, {detail}. The arguments of this "
                f"call are {sorted(passed)}. Name only arguments that are passed, "
                "positionally or by keyword."
            )
        arg_specs = [spec.get(n, default) for n in pos_names]
        kw_specs = {k: spec.get(k, default) for k in kwargs}
    elif isinstance(spec, (tuple, list)):
        if len(spec) != len(args):
            raise SpecError(
                f"{what} has {len(spec)} entries but {_fun_name(target)} was called "
                f"with {len(args)} positional arguments. Give one entry per "
                "positional argument, or a dict keyed by parameter name."
            )
        arg_specs = list(spec)
        kw_specs = {k: default for k in kwargs}
    else:
        arg_specs = [spec] * len(args)
        kw_specs = {k: spec for k in kwargs}

    for name, s in zip(pos_names, arg_specs):
        _check_given(s, name, what, len(args))
    for name, s in kw_specs.items():
        _check_given(s, name, what, len(args))

    resolved: list[Any] = [None] * len(jtu.tree_leaves(fun))
    for name, s, arg in zip(pos_names, arg_specs, args):
        resolved += broadcast_specs(s, arg, name, what)
    for name in sorted(kwargs):
        resolved += broadcast_specs(kw_specs[name], kwargs[name], name, what)
    return resolved


REQUIRED: Any = Marker("REQUIRED")


def _check_given(spec: Any, name: str, what: str, n_args: int) -> None:
    if spec is REQUIRED and not name.isidentifier():  # passed through `*args`
        entries = ", ".join(["P()"] * n_args)
        raise SpecError(
            f"Argument `{name}` has no spec in {what}. It is passed through `*args`, "
            "which a dict keyed by parameter name cannot reach: give "
            f"{what} as a tuple with one entry per positional argument (this call "
            f"passes {n_args}), e.g. `{what}=({entries},)`, or one spec for every "
            f"argument, e.g. `{what}=P()`."
        )
    if spec is REQUIRED:
        raise SpecError(
            f"Argument `{name}` has no spec in {what}. Give {what} as a dict keyed "
            "by parameter name (which also covers keyword arguments), e.g. "
            f"`{what}=dict({name}=P())`."
        )


def _parameter_names(fun: Callable) -> set[str] | None:
    try:
        params = inspect.signature(fun).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


def _fun_name(fun: Callable) -> str:
    return f"`{getattr(fun, '__qualname__', None) or type(fun).__name__}`"


def resolve_out_specs(
    spec: Any, out: Any, what: str, *, numbers: bool = False
) -> list[Any]:
    """One resolved spec per leaf of the output `out`."""
    return broadcast_specs(spec, out, "(the output)", what, numbers=numbers)


# ----------------------------------------------------------------------------------
# Mapped axes (vmap and pmap)


def check_int_axes(
    axes: Sequence[Any],
    leaves: Sequence[Any],
    names: Callable[[], list[str]],
    what: str,
) -> int | None:
    """Validates int/None axes against array leaves and returns the common mapped size
    (`None` when nothing is mapped).

    `names` is called only to build an error message.
    """
    sizes: list[tuple[int, int, int]] = []  # (leaf index, axis, size)
    for i, (axis, leaf) in enumerate(zip(axes, leaves)):
        if axis is None:
            continue
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise SpecError(
                f"{what} resolved to {axis!r} for {names()[i]}; a vmap/pmap axis "
                "must be an int or None."
            )
        ndim = np.ndim(leaf)
        if not -ndim <= axis < ndim:
            raise SpecError(
                f"{what} asks to map axis {axis} of {names()[i]}, which has shape "
                f"{tuple(np.shape(leaf))} (rank {ndim}). Map an axis that exists, or "
                "use None to broadcast this leaf."
            )
        sizes.append((i, axis, np.shape(leaf)[axis]))
    if not sizes:
        return None
    distinct = {s for _, _, s in sizes}
    if len(distinct) > 1:
        all_names = names()
        lines = "\n".join(
            f"  - {all_names[i]}: size {s} along axis {a}" for i, a, s in sizes
        )
        raise AxisSizeError(
            f"The mapped axes disagree on their size (sizes seen: "
            f"{sorted(distinct)}). Every mapped leaf must have the same size along "
            f"its mapped axis:\n{lines}\nFix the shapes, or broadcast a leaf with "
            "`None` in its spec."
        )
    return sizes[0][2]


# ----------------------------------------------------------------------------------
# PartitionSpecs against a mesh and an array (shard_map, placement)

AnyMesh = Mesh | AbstractMesh


def as_pspec(spec: Any, where: Callable[[], str], what: str) -> P:
    """A resolved spec leaf as a `PartitionSpec` (`None` means `P()`)."""
    if spec is None:
        return P()
    if isinstance(spec, P):
        return spec
    raise SpecError(
        f"{what} resolved to {spec!r} for {where()}; a shard_map spec must be a "
        "`jax.sharding.PartitionSpec` (or None, meaning P(): replicated)."
    )


def spec_axes(spec: P) -> list[Any]:
    """The mesh axes a `PartitionSpec` names, in order (repeats kept)."""
    names: list[Any] = []
    for entry in spec:
        if entry is None:
            continue
        names.extend(entry if isinstance(entry, tuple) else (entry,))
    return names


def check_spec(spec: P, mesh: AnyMesh, where: Callable[[], str], what: str) -> None:
    """Raises eqpar errors for a spec that uses a mesh axis twice or names one the
    mesh lacks (checked before sizes: a repeated axis is the real mistake behind
    an odd size error)."""
    axes = spec_axes(spec)
    repeated = sorted({str(a) for a in axes if axes.count(a) > 1})
    if repeated:
        raise SpecError(
            f"{what} gives {spec} for {where()}, which uses mesh axes {repeated} more "
            "than once. Each mesh axis can split at most one dimension of an array: "
            "split one dimension over several axes with a tuple (e.g. "
            "`P(('data', 'model'))`), or use each axis once."
        )
    unknown = [a for a in axes if a not in mesh.axis_names]
    if unknown:
        raise MeshError(
            f"{what} gives {spec} for {where()}, which names mesh axes {unknown} that "
            f"the mesh does not have; its axes are {tuple(mesh.axis_names)} (sizes "
            f"{dict(mesh.shape)})."
        )


def check_divides(
    spec: P,
    shape: tuple[int, ...],
    mesh: AnyMesh,
    where: Callable[[], str],
    what: str,
    dimension: Callable[[int], str] | None = None,
    more: str = "",
) -> None:
    """Raises eqpar errors for a spec that does not fit an array of `shape`;
    `dimension(d)` names dimension `d` in the message (e.g. with its jaxtyping
    name), `more` is appended to its advice."""
    if len(spec) > len(shape):
        raise SpecError(
            f"{what} gives {spec} ({len(spec)} dimensions) for {where()}, which has "
            f"shape {shape} (rank {len(shape)}). A spec may not be longer than the "
            "array's rank."
        )
    for dim, entry in enumerate(spec):
        if entry is None:
            continue
        axes = entry if isinstance(entry, tuple) else (entry,)
        devices = math.prod(mesh.shape[a] for a in axes)
        if shape[dim] % devices:
            named = f"dimension {dim}" if dimension is None else dimension(dim)
            raise AxisSizeError(
                f"{where()} has size {shape[dim]} along {named}, which {what} "
                f"({spec}) splits over mesh axes {axes} of {devices} devices; "
                f"{shape[dim]} is not a multiple of {devices}. Pad it to a multiple "
                f"of {devices} (e.g. `eqpar.pad_batch`, which also returns the "
                "number of real rows) and ignore the padded rows, or let "
                f"`eqpar.Parallel` pad and trim for you.{more}"
            )


def leaf_pspec(
    spec: Any,
    leaf: Any,
    mesh: AnyMesh,
    where: Callable[[], str],
    what: str,
    *,
    whole: bool = True,
    dimension: Callable[[int], str] | None = None,
    more: str = "",
) -> P:
    """The one check of a resolved spec leaf for an array leaf: a `PartitionSpec`
    (`None` is `P()`) over axes `mesh` has, each once, no longer than the array's
    rank and, for a whole array (`whole=True`; `False` for a per-device block),
    splitting each dimension evenly. `where()` names the leaf, `what` the option;
    `dimension` and `more` as for `check_divides`."""
    pspec = as_pspec(spec, where, what)
    check_spec(pspec, mesh, where, what)
    shape = tuple(np.shape(leaf))
    if whole:
        check_divides(pspec, shape, mesh, where, what, dimension, more)
    elif len(pspec) > len(shape):
        raise SpecError(
            f"{what} gives {pspec} for {where()}, which has rank {len(shape)} per "
            "shard: a spec may not be longer than the rank."
        )
    return pspec
