"""Putting pytrees on devices: meshes, placement, replication, padding.

All of these act on array leaves and leave every other leaf alone, like the
transforms. Specs are `PartitionSpec`s (or pytree prefixes of them), checked against
the mesh and the arrays with the same errors `filter_shard_map` raises.
"""

from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.core
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import PyTree

from ._errors import AxisSizeError, Checked, MeshError, SpecError
from ._model_sharding import describe_dimension
from ._runner import context_mesh, line_mesh
from ._specs import (
    AnyMesh,
    broadcast_specs,
    is_array,
    leaf_pspec,
    spec_axes,
    spread_prefix,
)


def data_mesh(
    axis_name: str = "data",
    devices: Sequence[Any] | None = None,
    *,
    explicit: bool = False,
) -> Mesh:
    """A 1-D mesh over all devices (or the given ones), for data parallelism.

    **Arguments:**

    - `axis_name`: the name of its one axis.
    - `devices`: the devices, in order (default: `jax.devices()`).
    - `explicit`: give the axis JAX's Explicit type instead of Auto.

    **Returns:**

    A `jax.sharding.Mesh`, usable as `mesh=` or as a context mesh
    (`with jax.set_mesh(eqpar.data_mesh()):`). Its axis is Auto by default, so that
    the obvious next line works: outputs can be indexed eagerly (`y[0]`), arrays
    placed on it pass to `Parallel` on all devices, and `jax.grad` works outside
    `jit`. For a 2-D mesh (model sharding), `jax.make_mesh((2, 4), ("data",
    "model"))`.

    !!! warning

        With `explicit=True` sharding is part of an array's type: JAX then needs
        the mesh as context to differentiate outside `jit` (eqpar raises
        `eqpar.MeshError` for `jax.grad` of an eager call), and a sharded output
        must be gathered (`eqpar.filter_device_put(y, P(), mesh=mesh)`) before it
        is indexed eagerly.

    !!! example

        ```python
        import jax, jax.numpy as jnp, eqpar
        from jax.sharding import PartitionSpec as P

        mesh = eqpar.data_mesh()  # every device, one axis called "data"
        assert mesh.axis_names == ("data",) and mesh.size == jax.device_count()
        x = eqpar.filter_device_put(jnp.ones((jax.device_count(), 3)), P("data"),
                                    mesh=mesh)
        assert x[0].tolist() == [1.0, 1.0, 1.0]  # Auto axis: indexable eagerly
        ```
    """
    devs = list(jax.devices() if devices is None else devices)
    if not devs:
        raise MeshError("`devices` must be non-empty (or None for all devices).")
    return line_mesh(tuple(devs), axis_name, explicit)


def _mesh_or_context(mesh: AnyMesh | None, who: str) -> AnyMesh:
    return mesh if mesh is not None else context_mesh(who)


def filter_device_put(
    tree: PyTree, spec: PyTree, *, mesh: AnyMesh | None = None
) -> PyTree:
    r"""Places the array leaves of `tree` on `mesh`, sharded as `spec` says; inside
    a compiled function, constrains them to be sharded so.

    **Arguments:**

    - `tree`: any pytree; non-array leaves are returned as they are.
    - `spec`: a `PartitionSpec` for every array leaf, or a pytree prefix of `tree`
        with `PartitionSpec` (or `None`, meaning `P()`) leaves, or callables
        `leaf -> PartitionSpec` (e.g. what [`eqpar.partition_specs`][] returns).
    - `mesh`: the mesh (default: the context mesh).

    **Returns:**

    `tree` with each array leaf sharded by `NamedSharding(mesh, spec)`. Outside a
    trace that is a `jax.device_put`. Under a trace (inside `eqpar.filter_jit` or
    `jax.jit`) it is a sharding constraint, so a model built inside a compiled
    function is born sharded and never whole on one device:
    `jax.lax.with_sharding_constraint` on Auto mesh axes, `jax.sharding.reshard`
    on Explicit ones (which JAX allows only with the mesh set as context, `with
    jax.set_mesh(mesh):`). A dimension that its mesh axes do not divide raises
    `eqpar.AxisSizeError` naming the leaf, the dimension (with its jaxtyping name,
    when the leaf is an annotated Module field) and both sizes.

    !!! example

        ```python
        import equinox as eqx, jax, eqpar
        from jax.sharding import PartitionSpec as P

        mesh = jax.make_mesh((2, 4), ("data", "model"))
        mlp = eqx.nn.MLP(8, 8, 16, 1, key=jax.random.key(0))
        specs = eqpar.partition_specs(
            mlp, paths=[(r"layers\[0\]\.weight", P("model", None))]
        )
        placed = eqpar.filter_device_put(mlp, specs, mesh=mesh)
        assert placed.layers[0].weight.sharding.spec == P("model", None)
        ```
    """
    mesh = _mesh_or_context(mesh, "filter_device_put")
    specs = broadcast_specs(spec, tree, "(the tree to place)", "the spec")
    leaves, treedef = jtu.tree_flatten_with_path(tree)
    out = [leaf for _, leaf in leaves]
    eager: list[int] = []
    for i, ((path, leaf), s) in enumerate(zip(leaves, specs)):
        if not is_array(leaf):
            continue

        def where(path: Any = path) -> str:
            return f"the leaf at {jtu.keystr(path) or '(root)'}"

        pspec = leaf_pspec(
            s,
            leaf,
            mesh,
            where,
            "the spec",
            dimension=lambda d, path=path: describe_dimension(tree, path, d),
            more=_MODEL_ADVICE,
        )
        specs[i] = pspec
        if isinstance(leaf, jax.core.Tracer):
            out[i] = _constrain(leaf, mesh, pspec)
        else:
            eager.append(i)
    if eager:
        if not isinstance(mesh, Mesh):
            raise MeshError(
                "filter_device_put has only an abstract mesh here (the context "
                "mesh seen inside a trace) to place concrete arrays on: pass "
                "`mesh=` a `jax.sharding.Mesh`."
            )
        moved = jax.device_put(
            [out[i] for i in eager], [NamedSharding(mesh, specs[i]) for i in eager]
        )
        for i, x in zip(eager, moved):
            out[i] = x
    return jtu.tree_unflatten(treedef, out)


_MODEL_ADVICE = (
    " For a model's weights: shard that dimension over mesh axes whose size divides "
    "it, or leave it unsharded (`None` in its spec, or no entry for its name in "
    "`partition_specs`' `dims`)."
)


def _constrain(x: Any, mesh: AnyMesh, spec: P) -> Any:
    """`x` (a tracer) constrained to be sharded by `spec`: Auto axes through
    `with_sharding_constraint`, Explicit ones through `reshard` (part of the type)."""
    kinds = dict(zip(mesh.axis_names, mesh.axis_types))
    explicit = [a for a in spec_axes(spec) if kinds[a] == AxisType.Explicit]
    if not explicit:
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
    if len(explicit) != len(spec_axes(spec)):
        raise MeshError(
            f"filter_device_put got {spec}, which mixes Explicit axes {explicit} "
            "with Auto ones of the same mesh inside a compiled function; JAX "
            "constrains the two kinds differently. Use a mesh whose axes are all "
            "Auto or all Explicit."
        )
    if jax.sharding.get_abstract_mesh().empty:
        raise MeshError(
            f"filter_device_put inside a compiled function shards over Explicit mesh "
            f"axes {explicit}, which JAX allows only with the mesh set as context: "
            "call the compiled function under `with jax.set_mesh(mesh):`, or use a "
            "mesh with Auto axes (`jax.make_mesh(shape, names, axis_types=...)`)."
        )
    return jax.sharding.reshard(x, NamedSharding(mesh, spec))


def replicate(tree: PyTree, *, mesh: Mesh | None = None) -> PyTree:
    """Every array leaf of `tree` on every device of `mesh` (a full copy each).

    Same as `filter_device_put(tree, P(), mesh=mesh)`.

    !!! example

        ```python
        import equinox as eqx, jax, eqpar

        mesh = eqpar.data_mesh()
        model = eqpar.replicate(eqx.nn.Linear(3, 2, key=jax.random.key(0)), mesh=mesh)
        assert model.weight.sharding.is_fully_replicated
        assert len(model.weight.sharding.device_set) == jax.device_count()
        ```
    """
    return filter_device_put(tree, P(), mesh=mesh)


# `str` rather than a Literal: an unknown string gets eqpar's own error, with the
# list of choices, also when a runtime type checker is active.
Reduce = str | Callable[[Any], Any]  # "first" | "mean" | "sum" | "stack" | callable

# Reductions of a (devices, ...) stack, shared by unreplicate and Parallel.
STACK_REDUCTIONS: dict[str, Callable[[Any], Any]] = {
    "first": lambda x: x[0],
    "mean": lambda x: jnp.mean(x, axis=0),
    "sum": lambda x: jnp.sum(x, axis=0),
    "stack": lambda x: x,
}


def _is_copies(x: Any, sharding: jax.sharding.Sharding) -> bool:
    """Whether `x` is a copy per device (as `replicate` makes) rather than a stack
    with a leading device axis.

    Replicated over several devices, it is a copy. On one device the two can look
    alike (JAX drops the spec of a size-1 mesh axis, so a 1-device `filter_pmap`
    output is a replicated `(1, ...)` array too), but a device axis there has size
    1: an array placed on a mesh whose leading axis is not 1 (or a scalar) is a
    copy, and one with a leading 1 is read as the device axis (Objax's semantics).
    """
    if not sharding.is_fully_replicated:
        return False
    if len(sharding.device_set) > 1:
        return True
    return isinstance(sharding, NamedSharding) and (x.ndim == 0 or x.shape[0] != 1)


_EXPECTS = (
    "unreplicate expects per-device values: a leading axis with one entry per "
    "device, each device holding its own (as `filter_pmap` and "
    "`Parallel(reduce=None)` return), or an array replicated over several devices "
    "(`eqpar.replicate`)."
)


def _per_device(x: Any, where: str) -> Any:
    """`x` as a stack of per-device values along axis 0, gathered onto every device
    when it is sharded over Explicit mesh axes (which cannot be indexed or reduced
    over while sharded). Raises for an array whose leading axis is not a device
    axis."""
    if isinstance(x, jax.core.Tracer):  # under a trace placement is unknown
        return x
    sharding = getattr(x, "sharding", None)
    if sharding is not None and _is_copies(x, sharding):  # one copy per device
        return jnp.broadcast_to(x, (len(sharding.device_set), *x.shape))
    if np.ndim(x) == 0:
        raise SpecError(
            f"unreplicate got {where}, a scalar with no device axis. " + _EXPECTS
        )
    if sharding is None:
        raise SpecError(
            f"unreplicate got {where}, a NumPy array of shape {np.shape(x)}, which "
            "carries no placement, so its leading axis cannot be a device axis. "
            + _EXPECTS
            + " If it does hold one value per device, reduce it directly (`x[0]`, "
            "`x.mean(0)`)."
        )
    devices = len(sharding.device_set)
    rows = sharding.shard_shape(x.shape)[0]
    if not (rows == 1 and (x.shape[0] > 1 or devices == 1)):
        placed = (
            "on one device"
            if devices == 1
            else f"split over {devices} devices with {rows} rows of it on each"
            if rows < x.shape[0]
            else f"on {devices} devices, not split along it"
        )
        raise SpecError(
            f"unreplicate got {where}, of shape {x.shape}, whose leading axis (size "
            f"{x.shape[0]}) is not a device axis: it lies {placed}. "
            + _EXPECTS
            + " If the leading axis does hold one value per device (e.g. gathered "
            "onto one device), reduce it directly (`x[0]`, `x.mean(0)`)."
        )
    if (
        isinstance(sharding, NamedSharding)
        and any(t == AxisType.Explicit for t in sharding.mesh.axis_types)
        and not sharding.is_fully_replicated
    ):
        x = jax.device_put(x, NamedSharding(sharding.mesh, P()))
    return x


def _one_reduction(reduce: Any, where: str) -> Callable[[Any], Any]:
    """The function of a `(devices, ...)` stack that `reduce` names."""
    if isinstance(reduce, str):
        if reduce not in STACK_REDUCTIONS:
            raise SpecError(
                f"unreplicate got reduce={reduce!r}{where}; use one of "
                f"{sorted(STACK_REDUCTIONS)} or a callable on the (devices, ...) stack."
            )
        return STACK_REDUCTIONS[reduce]
    if callable(reduce):
        return reduce
    raise SpecError(
        f"unreplicate's `reduce` must be a string or callable, or a pytree prefix of "
        f"`tree` with those at its leaves: got {reduce!r}{where}."
    )


def is_one_reduction(x: Any) -> bool:
    """A leaf of a `reduce` prefix: a name or a function (a Module, callable or not,
    is a tree to look into: it is how a prefix shaped like a model is written)."""
    return isinstance(x, str) or (callable(x) and not isinstance(x, eqx.Module))


def reductions_per_leaf(
    reduce: Any, tree: Any, is_one: Callable[[Any], bool], who: str
) -> list[tuple[Any, str]]:
    """For each leaf of `tree` (in `jtu.tree_leaves` order), its reduction and where
    in `reduce` it was given (`" at ['stats']"`, or `""` for one reduction for the
    whole tree), from `reduce`: one reduction (`is_one(reduce)`), or a pytree
    prefix of `tree` with reductions at its leaves. Shared by `unreplicate` and
    `Parallel`, whose reductions differ (`is_one`) but not how they spread."""
    count = len(jtu.tree_leaves(tree))
    if is_one(reduce):
        return [(reduce, "")] * count

    def not_a_prefix(spec_def: Any, e: Exception) -> SpecError:
        return SpecError(
            f"{who}: `reduce` is neither a reduction (a string or callable) nor a "
            f"pytree prefix of the tree it reduces: it has structure {spec_def}. "
            "Give one reduction for the whole tree, or a tree that matches it down "
            "to where the reductions start (e.g. "
            f"`{{'stats': 'mean', 'step': 'first'}}` for a dict). (JAX said: {e})"
        )

    pairs = spread_prefix(reduce, tree, is_one, not_a_prefix)
    paths = [p for p, _ in jtu.tree_flatten_with_path(reduce, is_one)[0]]
    out = []
    for path, (r, sub) in zip(paths, pairs):
        out.extend(
            [(r, f" at {jtu.keystr(path) or '(root)'}")] * len(jtu.tree_leaves(sub))
        )
    return out


def unreplicate(tree: PyTree, reduce: Checked[Reduce | PyTree] = "first") -> PyTree:
    """Reduces per-device values to one, leaf by leaf (Objax's table), each leaf
    with its own reduction if need be.

    **Arguments:**

    - `tree`: a pytree whose array leaves hold per-device values: a leading device
        axis (split over the devices, one entry on each, as `filter_pmap` and
        `Parallel(reduce=None)` return), or a copy on each device (an array
        replicated with [`eqpar.replicate`][]). Non-array leaves pass through. On
        one device, where the two look alike, an array placed on a mesh counts as
        a copy unless its leading axis has size 1 (a one-device axis). Any other
        array (one never replicated, a NumPy array, a concatenated batch) raises
        `eqpar.SpecError` rather than reading its axis 0 as devices.
    - `reduce`: `"first"` (device 0's value, dtype kept), `"mean"` (a float mean),
        `"sum"`, `"stack"` (the per-device values stacked on a leading axis) or a
        callable applied to each leaf's `(devices, ...)` stack; or a pytree prefix
        of `tree` with those at its leaves, one reduction per leaf or subtree (as
        Objax's variables each carry their own `reduce`), e.g.
        `{"stats": "mean", "step": "first"}`. An `eqx.Module` in `reduce` is a
        prefix (its fields hold the reductions), never a callable reduction.

    **Returns:**

    The reduced tree, e.g. `arange(5)` replicated on 8 devices gives
    `[0, 8, 16, 24, 32]` with `"sum"`.

    !!! example

        ```python
        import jax.numpy as jnp
        from jax.sharding import PartitionSpec as P

        import eqpar

        mesh = eqpar.data_mesh()
        n = mesh.devices.size
        # BatchNorm statistics differ per device; the step counter does not.
        per_device = {
            "mean": jnp.outer(jnp.arange(n, dtype=jnp.float32), jnp.ones(3)),
            "step": jnp.full(n, 7),
        }
        per_device = eqpar.filter_device_put(per_device, P("data"), mesh=mesh)
        out = eqpar.unreplicate(per_device, reduce={"mean": "mean", "step": "first"})
        assert out["step"] == 7 and out["step"].dtype == per_device["step"].dtype
        assert jnp.allclose(out["mean"], (n - 1) / 2)
        ```
    """
    for path, r in jtu.tree_flatten_with_path(reduce, is_one_reduction)[0]:
        _one_reduction(r, f" at {jtu.keystr(path)}" if path else "")  # even unused
    leaves, treedef = jtu.tree_flatten_with_path(tree)
    fns = [
        _one_reduction(r, where)
        for r, where in reductions_per_leaf(
            reduce, tree, is_one_reduction, "unreplicate"
        )
    ]
    out = [
        fn(_per_device(leaf, f"the leaf at {jtu.keystr(path) or '(root)'}"))
        if is_array(leaf)
        else leaf
        for fn, (path, leaf) in zip(fns, leaves)
    ]
    return jtu.tree_unflatten(treedef, out)


def pad_batch(tree: PyTree, multiple: int, *, axis: int = 0) -> tuple[PyTree, int]:
    """Pads every array leaf along `axis` up to a multiple of `multiple`.

    Padded entries repeat the last real one (valid inputs: no division by zero or
    log of zero in the padding), so they are harmless to compute; drop them from
    anything you reduce, e.g. with `mask = jnp.arange(padded_size) < n_real` or
    the `count=` of [`eqpar.filter_value_and_grad_mean`][].

    **Arguments:**

    - `tree`: a batch: any pytree whose array leaves share their size along `axis`.
    - `multiple`: e.g. the number of devices.
    - `axis`: the batch axis.

    **Returns:**

    `(padded, n_real)`: the padded tree and the original batch size.

    !!! example

        ```python
        import jax.numpy as jnp, eqpar

        batch = {"x": jnp.arange(10.0), "y": jnp.arange(10)}
        padded, n = eqpar.pad_batch(batch, 8)
        assert n == 10 and padded["x"].shape == (16,)
        assert (padded["x"][10:] == 9.0).all()  # repeats of the last real entry
        ```
    """
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise SpecError(f"`multiple` must be a positive int, got {multiple!r}.")
    leaves, treedef = jtu.tree_flatten_with_path(tree)
    sizes = {}
    for path, leaf in leaves:
        if is_array(leaf):
            if not -np.ndim(leaf) <= axis < np.ndim(leaf):
                raise SpecError(
                    f"pad_batch: the leaf at {jtu.keystr(path) or '(root)'} has shape "
                    f"{np.shape(leaf)}, with no axis {axis}."
                )
            sizes[jtu.keystr(path) or "(root)"] = np.shape(leaf)[axis]
    if not sizes:
        raise SpecError("pad_batch got a tree with no array leaves.")
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{k}: {v}" for k, v in sizes.items())
        raise AxisSizeError(
            f"pad_batch: the array leaves disagree on their size along axis {axis} "
            f"({listing})."
        )
    n = next(iter(sizes.values()))
    if n == 0:
        raise AxisSizeError(
            "pad_batch got an empty batch (size 0): nothing to pad from."
        )
    pad = (-n) % multiple
    if pad == 0:
        return tree, n
    index = np.concatenate([np.arange(n), np.full(pad, n - 1)])
    padded = [
        jnp.take(leaf, index, axis=axis) if is_array(leaf) else leaf
        for _, leaf in leaves
    ]
    return jtu.tree_unflatten(treedef, padded), n
