"""Model sharding: a `PartitionSpec` for every array of a model, from the model's own
jaxtyping dimension names and from rules on leaf paths.

A Module field annotated `w: Float[Array, "embed hidden"]` names its dimensions;
`partition_specs(model, dims={"hidden": "model"})` turns those names into
`P(None, "model")`. Layers whose fields carry no names (`eqx.nn.Linear`) are sharded
by rules on their paths instead: `paths=[(r"layers\\[0\\]\\.weight", P("model",
None))]`. Whatever a rule or a name does not cover is replicated, `P()`.

An annotation names a leaf's *trailing* dimensions. Leading dimensions beyond it are
a stack of layers: named by the stack's layer axis when the leaf sits inside an
`AbstractStack` (`eqpar.Stacked`), unnamed (never sharded) for a stack built by
hand with `filter_vmap`. A rank the annotation cannot explain is an error, and so
is a `dims` name or a `paths` rule that matches nothing: never a silent `P()`.
"""

import dataclasses
import difflib
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
        An annotation names a leaf's *trailing* dimensions: the leading layer
        axis of an [`eqpar.Stacked`][] is named by its `axis_name` (`"layers"`,
        sharded only if named here), extra leading dimensions of a stack built by
        hand with `filter_vmap` are never sharded, and a rank the annotation
        cannot explain is an `eqpar.SpecError` naming the leaf. A name that names
        no dimension of any array (a typo such as `"hiden"`), or that is only a
        variadic name (`*batch`), is an `eqpar.SpecError` listing the names there
        are.
    - `paths`: `(regex, PartitionSpec)` pairs, matched with `re.search` against the
        leaf's path as `jax.tree_util.keystr` writes it (e.g.
        `.layers[0].weight`); the first match wins, over `dims`. This is how
        layers without names (`eqx.nn.Linear`, `eqx.nn.MLP`) are sharded. A rule
        that matches no array leaf is an `eqpar.SpecError` listing the paths.

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
    used_rules: set[int] = set()
    seen = _Seen()
    specs = []
    for path, leaf in leaves:
        if not is_array(leaf):
            specs.append(None)
            continue
        where = jtu.keystr(path)
        hits = [i for i, (regex, _) in enumerate(rules) if regex.search(where)]
        used_rules.update(hits)
        if not names:  # path rules alone: annotations are not read
            specs.append(rules[hits[0]][1] if hits else P())
            continue
        if hits:  # a rule gives its spec: the annotation need not fit it
            try:
                leaf_dimension_names(tree, path, seen)
            except SpecError:
                pass
            specs.append(rules[hits[0]][1])
            continue
        axes = leaf_dimension_names(tree, path, seen)
        if axes is None:
            specs.append(P())
        else:
            specs.append(P(*[names.get(a) if a is not None else None for a in axes]))
    _check_all_used(rules, used_rules, names, seen, leaves)
    return jtu.tree_unflatten(treedef, specs)


class _Seen:
    """The dimension names met while reading a tree: plain and variadic ones."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.variadic: set[str] = set()


def _check_all_used(
    rules: list[tuple[re.Pattern, P]],
    used: set[int],
    names: Mapping[str, MeshAxes],
    seen: _Seen,
    leaves: Sequence[tuple[Any, Any]],
) -> None:
    """A `dims` name or a `paths` rule that matches nothing is an error, never a
    silent `P()`. (An error rather than a warning: the legitimate use it refuses, a
    table of rules shared by several models, is narrowed by the caller in one line,
    while a typo that leaves a large model replicated on every device is found only
    when memory runs out, if ever.)"""
    paths = [jtu.keystr(p) for p, leaf in leaves if is_array(leaf)]
    shown = ", ".join(paths[:6]) + (", ..." if len(paths) > 6 else "")
    for i, (regex, spec) in enumerate(rules):
        if i not in used:
            raise SpecError(
                f"partition_specs: the `paths` rule ({regex.pattern!r}, {spec}) "
                f"matches no array leaf. Its regex is searched for (`re.search`) in "
                f"each leaf's path, written as `jax.tree_util.keystr` writes it; the "
                f"array leaves here are at: {shown or '(none)'}. Fix the regex or "
                "drop the rule."
            )
    known = sorted(seen.names)
    for name in names:
        bare = name.lstrip("*")
        if name in seen.names:
            continue
        if bare in seen.variadic or name.startswith("*"):
            raise SpecError(
                f"partition_specs: `dims` names {name!r}, a variadic dimension "
                f"(`*{bare}`) in the annotations: it stands for any number of "
                "dimensions, so no one of them can be sharded by name. Name the "
                'dimension to shard in the annotation (e.g. `"*batch tokens '
                "hidden\"` and `dims={'tokens': ...}`) or give a `paths` rule with "
                "a full `PartitionSpec` for those leaves."
            )
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise SpecError(
            f"partition_specs: `dims` names {name!r}, which names no dimension of "
            f"any array here.{hint} The dimension names in this tree's jaxtyping "
            f"annotations are: {', '.join(map(repr, known)) or '(none)'}. Fix the "
            "name or drop it from `dims`; arrays without annotated fields (e.g. "
            "`eqx.nn.Linear`) are sharded by `paths` rules instead."
        )


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


class AbstractStack(eqx.Module):
    """A Module holding a stack of layers in its field `layers`: every array leaf
    there has `len(stack_axes)` leading dimensions (the stack), named by
    `stack_axes`, in front of the dimensions its own annotation names. This is how
    `partition_specs` reads an [`eqpar.Stacked`][]."""

    layers: eqx.AbstractVar[Any]

    @property
    def stack_axes(self) -> tuple[str, ...]:
        raise NotImplementedError


def dimension_names(tree: Any, path: Sequence[Any]) -> list[str | None] | None:
    """The name of each dimension of the array at `path` in `tree` (`None` for a
    dimension without a name), from the jaxtyping annotation of the Module field
    holding it and the layer axes of the stacks around it; `None` when nothing
    names any of them or its rank does not fit its annotation."""
    try:
        return leaf_dimension_names(tree, path, _Seen())
    except SpecError:
        return None


def leaf_dimension_names(
    tree: Any, path: Sequence[Any], seen: _Seen
) -> list[str | None] | None:
    """As `dimension_names`, recording the names met in `seen`; a rank that the
    annotation and the stacks around the leaf cannot explain is a `SpecError`."""
    node, annotation = tree, None
    stacked: list[str] = []
    for key in path:
        annotation = None
        if isinstance(node, eqx.Module) and isinstance(key, jtu.GetAttrKey):
            annotation = _field_types(type(node)).get(key.name)
            if isinstance(node, AbstractStack) and key.name == "layers":
                stacked.extend(node.stack_axes)
        node = _child(node, key)
        if node is _MISSING:
            return None
    seen.names.update(stacked)
    shape = tuple(getattr(node, "shape", ()))
    dim_str = _dim_str(annotation) if annotation is not None else None
    if dim_str is None:
        if not stacked:
            return None
        if len(shape) < len(stacked):
            raise _rank_error(path, shape, None, stacked, len(stacked))
        return [*stacked] + [None] * (len(shape) - len(stacked))
    front, back, variadic = _names(dim_str)
    seen.names.update(n for n in front + back if n is not None)
    seen.variadic.update(n for n in variadic if n is not None)
    inner = len(shape) - len(stacked)
    if not variadic:
        # Leading dimensions beyond the annotation: a stack built by hand.
        if inner < len(front):
            raise _rank_error(path, shape, dim_str, stacked, len(front))
        return [*stacked] + [None] * (inner - len(front)) + front
    if inner < len(front) + len(back):
        raise _rank_error(path, shape, dim_str, stacked, len(front) + len(back))
    middle = inner - len(front) - len(back)
    return [*stacked] + front + [None] * middle + back


def _rank_error(
    path: Sequence[Any],
    shape: tuple[int, ...],
    dim_str: str | None,
    stacked: list[str],
    needed: int,
) -> SpecError:
    where = jtu.keystr(tuple(path)) or "(root)"
    layers = (
        f" inside a stack whose layer axes {stacked} come first," if stacked else ""
    )
    what = f"its annotation {dim_str!r} names" if dim_str is not None else "there are"
    return SpecError(
        f"partition_specs: the array at {where} has shape {shape} (rank "
        f"{len(shape)}), but{layers} {what} at least {needed + len(stacked)} "
        "dimensions: its rank cannot be explained, so no dimension name is lined up "
        "with it. Fix the annotation or the array (an annotation names a leaf's "
        "trailing dimensions; a stack adds leading ones), or give that leaf a "
        f"`paths` rule with its full `PartitionSpec`, e.g. `paths=[({where!r}, "
        "P())]`."
    )


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


def _names(
    dim_str: str,
) -> tuple[list[str | None], list[str | None], list[str | None]]:
    """A jaxtyping dimension string read as (the names before a variadic part, the
    names after it, the variadic part's names: `[]` when there is none, `[None]`
    for `...`). Names before a variadic part count from the front, names after it
    from the back; a dimension without a name is `None`."""
    front: list[str | None] = []
    back: list[str | None] = []
    variadic: list[str | None] = []
    for token in dim_str.split():
        if token == "...":
            variadic.append(None)
            continue
        name, star = _name(token)
        if star:
            variadic.append(name)
            continue
        (back if variadic else front).append(name)
    return front, back, variadic


def names_in(dim_str: str, ndim: int) -> list[str | None]:
    """One name (or None) per dimension of an array of rank `ndim`, from a
    jaxtyping dimension string, lined up as `partition_specs` does: without a
    variadic part the names are the trailing dimensions; with one, names before it
    count from the front and names after it from the back."""
    front, back, variadic = _names(dim_str)
    if not variadic:
        return ([None] * ndim + front)[-ndim:] if ndim else []
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
