"""Model sharding: a `PartitionSpec` for every array of a model, from the model's own
jaxtyping dimension names and from rules on leaf paths.

A Module field annotated `w: Float[Array, "embed hidden"]` names its dimensions;
`partition_specs(model, dims={"hidden": "model"})` turns those names into
`P(None, "model")`. Layers whose fields carry no names (`eqx.nn.Linear`) are sharded
by rules on their paths instead: `paths=[(r"layers\\[0\\]\\.weight", P("model",
None))]`. Whatever a rule or a name does not cover is replicated, `P()`.
"""

import dataclasses
import re
import typing
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import equinox as eqx
import jax.tree_util as jtu
from jax.sharding import PartitionSpec as P
from jaxtyping import PyTree

from ._errors import Checked, SpecError
from ._specs import is_array


MeshAxes = Hashable | tuple[Hashable, ...] | None
"""What a dimension name maps to: a mesh axis, a tuple of them, or None."""


def partition_specs(
    tree: PyTree,
    *,
    dims: Checked[Mapping[str, MeshAxes] | None] = None,
    paths: Checked[Sequence[tuple[str, P]] | None] = None,
) -> PyTree:
    """A `PartitionSpec` for every array leaf of `tree`, from jaxtyping dimension
    names and path rules.

    **Arguments:**

    - `tree`: any pytree holding arrays and Modules: a model, an optimiser state
        built from it, or a tuple of both.
    - `dims`: jaxtyping dimension name -> mesh axis (a name, a tuple of names, or
        `None`). An array that is a Module field annotated e.g.
        `Float[Array, "embed hidden"]` gets, with `dims={"hidden": "model"}`,
        `P(None, "model")`. What jaxtyping allows is understood: a variadic
        `*batch` or `...` (the names around it count from each end), fixed sizes
        and symbolic sizes (never sharded), `#name`, `?name`, `rows=4` (named
        `rows`), a leading space, and annotations written as strings (`from
        __future__ import annotations`). An optimiser state holds Modules of the
        model's classes (its moments), so they get their parameters' specs.
    - `paths`: `(regex, PartitionSpec)` pairs, matched with `re.search` against the
        leaf's path as `jax.tree_util.keystr` writes it (e.g.
        `.layers[0].weight`); the first match wins, over `dims`. This is how
        layers without names (`eqx.nn.Linear`, `eqx.nn.MLP`) are sharded.

    **Returns:**

    A pytree of the same structure: a `PartitionSpec` at every array leaf (one entry
    per dimension for an annotated field, `P()` where nothing matched), `None` at
    every other leaf, static fields as they are (as under `equinox.filter`). Hand it
    to [`eqpar.filter_device_put`][] to place the tree, or use it as
    `in_specs`/`out_specs`.

    !!! example

        ```python
        import equinox as eqx, jax, eqpar
        from jax.sharding import PartitionSpec as P
        from jaxtyping import Array, Float

        class Dense(eqx.Module):
            w: Float[Array, "embed hidden"]
            b: Float[Array, " hidden"]

        layer = Dense(jax.numpy.ones((4, 8)), jax.numpy.ones(8))
        specs = eqpar.partition_specs(layer, dims={"hidden": "model"})
        assert specs.w == P(None, "model") and specs.b == P("model")
        ```
    """
    rules = _check_paths(paths)
    names = _check_dims(dims)
    leaves, treedef = jtu.tree_flatten_with_path(tree)
    specs = []
    for path, leaf in leaves:
        if not is_array(leaf):
            specs.append(None)
            continue
        where = jtu.keystr(path)
        rule = next((spec for regex, spec in rules if regex.search(where)), None)
        if rule is not None:
            specs.append(rule)
            continue
        axes = dimension_names(tree, path) if names else None
        specs.append(_spec(axes, names, leaf.ndim) if axes is not None else P())
    return jtu.tree_unflatten(treedef, specs)


def _spec(axes: list[str | None], names: Mapping[str, MeshAxes], ndim: int) -> P:
    """One entry per dimension (as Flax NNX's `get_partition_spec` gives)."""
    return P(*[names.get(a) if a is not None else None for a in axes[:ndim]])


def _check_paths(paths: Any) -> list[tuple[re.Pattern, P]]:
    if paths is None:
        return []
    if isinstance(paths, (str, bytes)) or not isinstance(paths, Sequence):
        raise SpecError(
            f"partition_specs: `paths` must be a sequence of (regex, PartitionSpec) "
            f"pairs, e.g. `[(r'layers\\[0\\]\\.weight', P('model', None))]`, got "
            f"{paths!r:.80}."
        )
    rules = []
    for entry in paths:
        if not (isinstance(entry, tuple) and len(entry) == 2):
            raise SpecError(
                f"partition_specs: each entry of `paths` is a (regex, PartitionSpec) "
                f"pair, got {entry!r:.80}."
            )
        regex, spec = entry
        if not isinstance(spec, P):
            raise SpecError(
                f"partition_specs: the rule for {regex!r} gives {spec!r:.80}, not a "
                "`PartitionSpec` (use `P()` to replicate)."
            )
        try:
            rules.append((re.compile(regex), spec))
        except (re.error, TypeError) as e:
            raise SpecError(
                f"partition_specs: {regex!r} is not a regular expression ({e})."
            ) from None
    return rules


def _check_dims(dims: Any) -> Mapping[str, MeshAxes]:
    if dims is None:
        return {}
    if not isinstance(dims, Mapping):
        raise SpecError(
            "partition_specs: `dims` maps jaxtyping dimension names to mesh axes, "
            f"e.g. `dims={{'hidden': 'model'}}`; got {dims!r:.80}."
        )
    bad = [k for k in dims if not isinstance(k, str)]
    if bad:
        raise SpecError(
            f"partition_specs: the keys of `dims` are dimension names (strings), got "
            f"{bad[0]!r}."
        )
    return dims


# ----------------------------------------------------------------------------------
# Dimension names from annotations


def dimension_names(tree: Any, path: Sequence[Any]) -> list[str | None] | None:
    """The name of each dimension of the array at `path` in `tree`, from the
    jaxtyping annotation of the Module field holding it (`None` for a dimension
    without a name), or `None` when it is not a directly annotated field."""
    node, annotation = tree, None
    for key in path:
        annotation = None
        if isinstance(node, eqx.Module) and isinstance(key, jtu.GetAttrKey):
            annotation = _field_types(type(node)).get(key.name)
        node = _child(node, key)
        if node is _MISSING:
            return None
    if annotation is None:
        return None
    dim_str = _dim_str(annotation)
    if dim_str is None:
        return None
    return names_in(dim_str, len(getattr(node, "shape", ())))


_MISSING = object()


def _child(node: Any, key: Any) -> Any:
    try:
        if isinstance(key, jtu.GetAttrKey):
            return getattr(node, key.name)
        if isinstance(key, jtu.SequenceKey):
            return node[key.idx]
        if isinstance(key, jtu.DictKey):
            return node[key.key]
    except (AttributeError, IndexError, KeyError, TypeError):
        pass
    return _MISSING


_FIELD_TYPES: dict[type, dict[str, Any]] = {}


def _field_types(cls: type) -> dict[str, Any]:
    """A Module class's field annotations, evaluated where possible (string
    annotations from `from __future__ import annotations` too)."""
    found = _FIELD_TYPES.get(cls)
    if found is not None:
        return found
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation that cannot be evaluated here: keep the text
        hints = {}
        for klass in reversed(cls.__mro__):
            hints.update(getattr(klass, "__annotations__", {}))
    fields = {f.name for f in dataclasses.fields(cls)}
    found = {name: hint for name, hint in hints.items() if name in fields}
    _FIELD_TYPES[cls] = found
    return found


_QUOTED = re.compile(r"""\[\s*[\w.]+\s*,\s*(['"])(.*?)\1\s*\]""")


def _dim_str(annotation: Any) -> str | None:
    """The dimension string of a jaxtyping annotation (`Float[Array, "a b"]`, also
    inside `X | None` or `Optional[X]`, or as text)."""
    if isinstance(annotation, str):
        match = _QUOTED.search(annotation)
        return match.group(2) if match else None
    dim_str = getattr(annotation, "dim_str", None)
    if isinstance(dim_str, str):
        return dim_str
    for member in typing.get_args(annotation):
        found = _dim_str(member)
        if found is not None:
            return found
    return None


def names_in(dim_str: str, ndim: int) -> list[str | None]:
    """One name (or None) per dimension of an array of rank `ndim`, from a
    jaxtyping dimension string. Names before a variadic part count from the front,
    names after it from the back."""
    front: list[str | None] = []
    back: list[str | None] = []
    variadic = False
    for token in dim_str.split():
        if token == "...":
            variadic = True
            continue
        name, star = _name(token)
        if star:
            variadic = True
            continue
        (back if variadic else front).append(name)
    if not variadic:
        return (front + [None] * ndim)[:ndim]
    middle = max(ndim - len(front) - len(back), 0)
    return (front + [None] * middle + back)[:ndim]


def _name(token: str) -> tuple[str | None, bool]:
    """A dimension token's name (None: fixed, symbolic or anonymous) and whether
    it is variadic. `_hidden` (a name jaxtyping does not check) is still named
    `hidden`; only `_` alone is anonymous."""
    star = False
    while token and token[0] in "#?*":
        star = star or token[0] == "*"
        token = token[1:]
    if token == "_":
        return None, star
    if token.startswith("_"):
        token = token[1:]
    if "=" in token:  # `rows=4`: a fixed size with a label
        token = token.split("=", 1)[0]
    if not token.isidentifier():
        return None, star
    return token, star


def describe_dimension(tree: Any, path: Sequence[Any], dim: int) -> str:
    """`dimension 1 ('hidden')`, or `dimension 1` when it has no name."""
    names = dimension_names(tree, path)
    if names is not None and dim < len(names) and names[dim] is not None:
        return f"dimension {dim} ({names[dim]!r})"
    return f"dimension {dim}"


Describe = Callable[[int], str]
