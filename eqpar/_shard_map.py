"""`filter_shard_map`: `jax.shard_map` over filtered pytrees, compiled and cached."""

import functools as ft
from collections.abc import Callable, Hashable, Set
from typing import Any, overload

import jax
import jax.core
import jax.tree_util as jtu
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import PyTree

from ._dispatch import (
    Backend,
    check_donate,
    Compiled,
    decorator_or_call,
    Donate,
    shared,
    transformed,
)
from ._errors import Checked, SpecError
from ._runner import (
    check_shard_map_options,
    context_mesh,
    eager_autodiff_check,
    placed_spec,
    run_shard_map,
)
from ._specs import (
    AnyMesh,
    call_with,
    is_array,
    leaf_names,
    leaf_pspec,
    Marker,
    REQUIRED,
    resolve_call_specs,
    resolve_out_specs,
)
from ._vma import check_replicated


SpecLeaf = P | None | Callable[[Any], P | None]


INFERRED: Any = Marker("<read from each argument's placement>")
"""`filter_shard_map`'s default `in_specs`: each array's spec is read from where it
is placed."""


def _placed_specs(fun: Any, args: tuple, kwargs: dict, mesh: AnyMesh) -> list[P]:
    """The spec of every array of the call, from its placement on `mesh` (a
    concrete array's sharding, or under a trace the sharding in its type, which
    only Explicit mesh axes carry)."""
    call = (fun, args, kwargs)
    specs = []
    names = None
    for i, leaf in enumerate(jtu.tree_leaves(call)):
        if not is_array(leaf):
            continue
        spec = placed_spec(leaf, mesh)
        if spec is None:
            names = names or leaf_names(fun, args, kwargs)
            raise SpecError(_unplaced(names[i], leaf, mesh))
        specs.append(spec)
    return specs


def _unplaced(name: str, leaf: Any, mesh: AnyMesh) -> str:
    where = getattr(leaf, "sharding", None)
    placed = (
        "is a tracer whose type carries no placement on it (only Explicit mesh "
        "axes put the sharding in the type)"
        if isinstance(leaf, jax.core.Tracer)
        else f"is placed as {where}"
        if where is not None
        else "is a NumPy array (not placed anywhere)"
    )
    return (
        f"filter_shard_map was given no `in_specs`, so each argument's spec is read "
        f"from its placement on the mesh {mesh}; but {name} {placed}. Place it first "
        "(`eqpar.filter_device_put(x, spec, mesh=mesh)`, e.g. with "
        "`eqpar.partition_specs`), or give `in_specs`."
    )


class _ShardMap:
    """`filter_shard_map`'s backend for one set of options."""

    def __init__(
        self,
        in_specs: Any,
        out_specs: Any,
        mesh: AnyMesh | None,
        axis_names: frozenset[Hashable],
        check_vma: bool,
    ):
        self.in_specs = in_specs
        self.out_specs = out_specs
        self.mesh = mesh
        self.axis_names = axis_names
        self.check_vma = check_vma

    def context(self, fun: Any, args: tuple, kwargs: dict) -> Hashable:
        """Per call: the context mesh (`mesh=None`) and, with `in_specs` left out,
        each array's spec read from where it is placed."""
        mesh = self.mesh if self.mesh is not None else context_mesh("filter_shard_map")
        if self.in_specs is not INFERRED:
            return mesh
        return mesh, tuple(_placed_specs(fun, args, kwargs, mesh))

    def _mesh_and_specs(
        self, fun: Any, args: tuple, kwargs: dict, context: Any
    ) -> tuple[AnyMesh, list[P]]:
        if self.in_specs is INFERRED:
            mesh, specs = context
            return mesh, list(specs)
        mesh = self.mesh if self.mesh is not None else context
        return mesh, self.specs(fun, args, kwargs, mesh)

    def run(self, fun: Any, args: tuple, kwargs: dict, context: Any) -> Any:
        mesh, specs = self._mesh_and_specs(fun, args, kwargs, context)
        leaves, treedef = jtu.tree_flatten((fun, args, kwargs))
        where = [i for i, leaf in enumerate(leaves) if is_array(leaf)]
        arrays = [leaves[i] for i in where]

        def per_device(*blocks: Any) -> Any:
            return call_with(treedef, leaves, where, blocks)

        return run_shard_map(
            per_device,
            arrays,
            specs,
            ft.partial(self.out_specs_of, mesh),
            mesh=mesh,
            check_vma=self.check_vma,
            axis_names=self.axis_names,
            who="filter_shard_map",
        )

    def targets(
        self, fun: Any, args: tuple, kwargs: dict, context: Any
    ) -> list[NamedSharding] | None:
        if self.in_specs is INFERRED:
            return None  # every array is where its spec says, by definition
        mesh, specs = self._mesh_and_specs(fun, args, kwargs, context)
        if not isinstance(mesh, Mesh):
            return None
        return [NamedSharding(mesh, s) for s in specs]

    def specs(self, fun: Any, args: tuple, kwargs: dict, mesh: AnyMesh) -> list[P]:
        """One checked `PartitionSpec` per array leaf of the call."""
        leaves = jtu.tree_leaves((fun, args, kwargs))
        raw = resolve_call_specs(
            self.in_specs, fun, args, kwargs, default=REQUIRED, what="in_specs"
        )
        names = ft.cache(lambda: leaf_names(fun, args, kwargs))
        specs = []
        for i, (leaf, spec) in enumerate(zip(leaves, raw)):
            if not is_array(leaf):
                continue
            where = lambda i=i: names()[i]  # noqa: E731
            specs.append(leaf_pspec(spec, leaf, mesh, where, "in_specs"))
        return specs

    def out_specs_of(self, mesh: AnyMesh, out: Any) -> list[P]:
        """One checked `PartitionSpec` per array leaf of the per-device output."""
        raw = resolve_out_specs(self.out_specs, out, "out_specs")
        paths = jtu.tree_flatten_with_path(out)[0]
        specs = []
        for (path, leaf), spec in zip(paths, raw):
            if not is_array(leaf):
                continue
            where = lambda path=path: f"the output at {jtu.keystr(path) or '(root)'}"  # noqa: E731
            spec = leaf_pspec(spec, leaf, mesh, where, "out_specs", whole=False)
            if self.check_vma:
                check_replicated(leaf, spec, where, "out_specs")
            specs.append(spec)
        return specs


@overload
def filter_shard_map(
    fun: None = None,
    *,
    out_specs: PyTree[SpecLeaf],
    in_specs: PyTree[SpecLeaf] = INFERRED,
    mesh: AnyMesh | None = None,
    axis_names: Set[Hashable] | None = None,
    check_vma: bool = True,
    donate: Donate = "none",
) -> Callable[[Callable[..., Any]], Callable[..., Any]]: ...


@overload
def filter_shard_map(
    fun: Callable[..., Any],
    *,
    out_specs: PyTree[SpecLeaf],
    in_specs: PyTree[SpecLeaf] = INFERRED,
    mesh: AnyMesh | None = None,
    axis_names: Set[Hashable] | None = None,
    check_vma: bool = True,
    donate: Donate = "none",
) -> Callable[..., Any]: ...


def filter_shard_map(
    fun: Checked[Callable[..., Any] | None] = None,
    *,
    out_specs: PyTree[SpecLeaf],
    in_specs: Checked[PyTree[SpecLeaf]] = INFERRED,
    mesh: Checked[AnyMesh | None] = None,
    axis_names: Checked[Set[Hashable] | None] = None,
    check_vma: Checked[bool] = True,
    donate: Checked[Donate] = "none",
) -> Any:
    """`jax.shard_map` for pytrees with non-array leaves: array leaves are split over
    the mesh by their spec and `fun` sees each device's block; every other leaf is
    static. Compiled (`jax.jit`) and cached per signature.

    **Arguments:**

    - `fun`: the per-device function (plain function, method, or callable Module;
        a Module's own arrays are replicated).
    - `in_specs`: a pytree prefix of the arguments with `PartitionSpec` leaves (or
        `None`, meaning `P()`, or callables `leaf -> PartitionSpec`): one spec for
        all arguments, a tuple with one entry per positional argument, or a dict
        keyed by parameter name (required for keyword arguments). Left out, each
        array's spec is read from where it is placed on the mesh (as
        `jax.shard_map` infers specs on Explicit meshes): place a model with
        [`eqpar.filter_device_put`][] and [`eqpar.partition_specs`][] and pass it
        as it is; an array with no placement on the mesh raises `eqpar.SpecError`
        naming it. An array placed over several devices in another way than its
        spec asks is re-laid out for the call with an `eqpar.EqparWarning` naming
        it (a sharded model silently gathered onto every device is a cost you would
        not otherwise see).
    - `out_specs`: a pytree prefix of the output, with the same kinds of leaves.
        Non-array outputs come back as they are.
    - `mesh`: the mesh; `None` uses the context mesh (`with jax.set_mesh(mesh):`),
        looked up at each call. Auto and Explicit axes both work.
    - `axis_names`: the mesh axes `fun` is manual over (default: all of them).
    - `check_vma`: JAX's replication typing (on by default): values know which mesh
        axes they vary over, so an `out_specs` that claims replication is checked,
        and gradients of replicated inputs come back invariant (summed over the
        axes for a per-device loss): use [`eqpar.filter_value_and_grad_mean`][] to
        average gradients across devices.
    - `donate`: as for [`eqpar.filter_jit`][] (`"none"`, the default, `"all"`,
        `"all-except-first"`, `"warn"`, `"warn-except-first"`).

    **Returns:**

    The sharded function. Inputs that are not yet placed as their specs ask are
    placed for you; outputs are `jax.Array`s sharded as `out_specs` say. One
    compile cache serves every wrapper with the same options (an inline
    `filter_shard_map(f, ...)(x)` compiles once); `.lower(*args, **kwargs)` lowers
    ahead of time.

    !!! example

        ```python
        import jax, jax.numpy as jnp, eqpar
        from jax.sharding import PartitionSpec as P

        mesh = jax.make_mesh((jax.device_count(),), ("data",))

        @eqpar.filter_shard_map(mesh=mesh, in_specs=P("data"), out_specs=P())
        def total(x):
            return eqpar.psum(x.sum(), "data")

        assert total(jnp.ones(8 * jax.device_count())) == 8 * jax.device_count()
        ```
    """
    check_shard_map_options(mesh, axis_names, check_vma, "filter_shard_map")
    names = frozenset() if axis_names is None else frozenset(axis_names)
    donate = check_donate(donate)
    options = (in_specs, out_specs, mesh, names, check_vma, donate)

    def make() -> Compiled:
        backend = _ShardMap(in_specs, out_specs, mesh, names, check_vma)
        return Compiled(
            Backend(
                backend.run,
                context=backend.context
                if mesh is None or in_specs is INFERRED
                else None,
                targets=backend.targets,
                check=eager_autodiff_check(mesh, "filter_shard_map"),
            ),
            donate=donate,
        )

    caller = shared("shard_map", options, make)
    return decorator_or_call(fun, lambda f: transformed(f, caller), "filter_shard_map")
