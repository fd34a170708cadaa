"""`filter_shard_map`: `jax.shard_map` over filtered pytrees, compiled and cached."""

import functools as ft
import math
import traceback
from collections.abc import Callable, Hashable, Set
from typing import Any, overload

import jax
import jax.core
import jax.tree_util as jtu
from jax.extend.core import get_opaque_trace_state
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import PyTree

from ._collectives import varying_axes, vmap_axis_error
from ._dispatch import (
    check_donate,
    Compiled,
    decorator_or_call,
    Donate,
    shared,
    transformed,
)
from ._errors import AxisSizeError, Checked, MeshError, ReplicationError, SpecError
from ._specs import (
    is_array,
    leaf_names,
    merge_leaves,
    REQUIRED,
    resolve_call_specs,
    resolve_out_specs,
    split_leaves,
)


SpecLeaf = P | None | Callable[[Any], P | None]
AnyMesh = Mesh | AbstractMesh


def _as_pspec(spec: Any, where: Callable[[], str], what: str) -> P:
    if spec is None:
        return P()
    if isinstance(spec, P):
        return spec
    raise SpecError(
        f"{what} resolved to {spec!r} for {where()}; a shard_map spec must be a "
        "`jax.sharding.PartitionSpec` (or None, meaning P(): replicated)."
    )


def _spec_axes(spec: P) -> list[str]:
    names = []
    for entry in spec:
        if entry is None:
            continue
        names.extend(entry if isinstance(entry, tuple) else (entry,))
    return names


def check_spec(spec: P, mesh: AnyMesh, where: Callable[[], str], what: str) -> None:
    """Raises eqpar errors for a spec naming an axis the mesh lacks."""
    unknown = [a for a in _spec_axes(spec) if a not in mesh.axis_names]
    if unknown:
        raise MeshError(
            f"{what} gives {spec} for {where()}, which names mesh axes {unknown} that "
            f"the mesh does not have; its axes are {tuple(mesh.axis_names)} (sizes "
            f"{dict(mesh.shape)})."
        )


def check_divides(
    spec: P, shape: tuple[int, ...], mesh: AnyMesh, where: Callable[[], str], what: str
) -> None:
    """Raises eqpar errors for a spec that does not fit an array of `shape`."""
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
            raise AxisSizeError(
                f"{where()} has size {shape[dim]} along dimension {dim}, which {what} "
                f"({spec}) splits over mesh axes {axes} of {devices} devices; "
                f"{shape[dim]} is not a multiple of {devices}. Pad it to a multiple "
                f"of {devices} (e.g. `eqpar.pad_batch`, which also returns the "
                "number of real rows) and ignore the padded rows, or let "
                "`eqpar.Parallel` pad and trim for you."
            )


def check_context_mesh(mesh: AnyMesh, who: str) -> None:
    """shard_map requires its mesh to agree with the context mesh, if one is set."""
    context = jax.sharding.get_abstract_mesh()
    abstract = mesh if isinstance(mesh, AbstractMesh) else mesh.abstract_mesh
    if not context.empty and context != abstract:
        raise MeshError(
            f"{who} runs on the mesh {abstract}, but a different context mesh "
            f"{context} is set (`jax.set_mesh`), and JAX requires the two to agree. "
            f"Call it outside the `with jax.set_mesh(...)` block, or run on the "
            "context mesh (`filter_shard_map` with `mesh=None`)."
        )


def match_explicit(mesh: AnyMesh, arrays: list[Any], specs: list[P]) -> list[Any]:
    """Explicit mesh axes make sharding part of an array's type, and shard_map
    refuses an input whose type does not already carry its spec: reshard those
    (inside the jit). An input typed on another mesh's Explicit axes cannot be
    resharded here: that gets a clear error instead of JAX's KeyError."""
    target = mesh if isinstance(mesh, AbstractMesh) else mesh.abstract_mesh
    for x in arrays:
        typed = jax.typeof(x).sharding
        own = getattr(typed, "mesh", None)
        if (
            own is not None
            and not own.empty
            and own != target
            and any(t == AxisType.Explicit for t in own.axis_types)
        ):
            raise MeshError(
                f"An input is sharded on the mesh {own} (Explicit axes), but this "
                f"call runs on {target}. Run on the input's mesh (pass the same "
                "`mesh=` and axis name), or move the input first with "
                "`eqpar.filter_device_put(x, spec, mesh=...)`."
            )
    if not any(t == AxisType.Explicit for t in mesh.axis_types):
        return arrays
    return [
        x
        if _same_spec(jax.typeof(x).sharding.spec, s, x.ndim)
        else jax.sharding.reshard(x, _sharding(mesh, s))
        for x, s in zip(arrays, specs)
    ]


def _shard_map_run(
    in_specs: Any,
    out_specs: Any,
    axis_names: frozenset[Hashable],
    check_vma: bool,
    fun: Any,
    args: tuple,
    kwargs: dict,
    mesh: AnyMesh,
) -> tuple[Any, list[NamedSharding] | None]:
    leaves, treedef = jtu.tree_flatten((fun, args, kwargs))
    raw = resolve_call_specs(
        in_specs, fun, args, kwargs, default=REQUIRED, what="in_specs"
    )
    names = ft.cache(lambda: leaf_names(fun, args, kwargs))
    arrays, signature = split_leaves(leaves)
    specs = []
    for i, (leaf, spec) in enumerate(zip(leaves, raw)):
        if not is_array(leaf):
            continue
        where = lambda i=i: names()[i]  # noqa: E731
        spec = _as_pspec(spec, where, "in_specs")
        check_spec(spec, mesh, where, "in_specs")
        check_divides(spec, tuple(leaf.shape), mesh, where, "in_specs")
        specs.append(spec)

    arrays = match_explicit(mesh, arrays, specs)

    out_flat: list[Any] = []  # filled while JAX traces `body` (see filter_pmap)
    structure: list[Any] = []

    def body(*values: Any) -> list[Any]:
        f, a, k = jtu.tree_unflatten(treedef, merge_leaves(signature, values))
        out = f(*a, **k)
        out_leaves, out_def = jtu.tree_flatten(out)
        out_raw = resolve_out_specs(out_specs, out, "out_specs")
        out_arrays, out_signature = split_leaves(out_leaves)
        out_names = ft.cache(
            lambda: [
                f"the output at {jtu.keystr(p) or '(root)'}"
                for p, _ in jtu.tree_flatten_with_path(out)[0]
            ]
        )
        specs_out = []
        for j, (leaf, spec) in enumerate(zip(out_leaves, out_raw)):
            if not is_array(leaf):
                continue
            where = lambda j=j: out_names()[j]  # noqa: E731
            spec = _as_pspec(spec, where, "out_specs")
            check_spec(spec, mesh, where, "out_specs")
            if len(spec) > leaf.ndim:
                raise SpecError(
                    f"out_specs gives {spec} for {where()}, which has rank "
                    f"{leaf.ndim} per shard: a spec may not be longer than the rank."
                )
            if check_vma:
                check_replicated(leaf, spec, where, "out_specs")
            specs_out.append(spec)
        out_flat[:] = specs_out
        structure[:] = [out_def, out_signature]
        return out_arrays

    check_context_mesh(mesh, "filter_shard_map")
    outs = trace_shard_map(
        lambda: jax.shard_map(
            body,
            mesh=mesh,
            in_specs=tuple(specs),
            out_specs=out_flat,
            axis_names=set(axis_names),
            check_vma=check_vma,
        )(*arrays),
        check_vma,
    )
    out_def, out_signature = structure
    out = jtu.tree_unflatten(out_def, merge_leaves(out_signature, outs))
    shardings = (
        [NamedSharding(mesh, s) for s in specs] if isinstance(mesh, Mesh) else None
    )
    return out, shardings


def check_shard_map_options(
    mesh: Any, axis_names: Any, check_vma: Any, who: str
) -> None:
    """Build-time checks of the options `filter_shard_map` and `Parallel` share."""
    if mesh is not None and not isinstance(mesh, (Mesh, AbstractMesh)):
        default = "all devices" if who == "Parallel" else "the context mesh"
        raise MeshError(
            f"{who} got mesh={mesh!r:.80} ({type(mesh).__name__}); `mesh` must be a "
            "`jax.sharding.Mesh` (e.g. `eqpar.data_mesh()` or `jax.make_mesh((n,), "
            f"('data',))`), or None for {default}."
        )
    if axis_names is not None and (
        isinstance(axis_names, (str, bytes)) or not isinstance(axis_names, Set)
    ):
        raise SpecError(
            f"{who} got axis_names={axis_names!r}; it must be a set of mesh axis "
            f"names, e.g. `axis_names={{{axis_names!r}}}` (a string would be read "
            "as a set of its characters), or None for every axis of the mesh."
        )
    if mesh is not None and axis_names is not None:
        unknown = [a for a in axis_names if a not in mesh.axis_names]
        if unknown:
            raise MeshError(
                f"{who} got axis_names={set(axis_names)!r}, which names {unknown}, "
                f"not axes of the mesh; its axes are {tuple(mesh.axis_names)}."
            )
    if not isinstance(check_vma, bool):
        raise SpecError(
            f"{who} got check_vma={check_vma!r}; it must be True (replication "
            "checking, the default) or False."
        )


def _eager_autodiff(tree: Any) -> bool:
    """Whether `tree` holds values being differentiated outside any `jit`: tracers
    whose chain of primals ends in concrete arrays. (Best effort: a tracer that
    carries no `primal`, such as a `jit` or `vmap` tracer, counts as compiled.)"""
    for leaf in jtu.tree_leaves(tree):
        if isinstance(leaf, jax.core.Tracer):
            inner: Any = leaf
            while isinstance(inner, jax.core.Tracer):
                inner = getattr(inner, "primal", None)
                if inner is None:
                    return False
            return True
    return False


def check_eager_autodiff(mesh: Mesh, tree: Any, who: str) -> None:
    """Raises `MeshError` for autodiff outside `jit` on an Explicit mesh with no
    context mesh, which JAX cannot do (its own error, raised later from inside
    `jax.grad`, asks to enter a `jit` into a mesh context)."""
    if not jax.sharding.get_abstract_mesh().empty or not _eager_autodiff(tree):
        return
    raise MeshError(
        f"{who} runs on a mesh with Explicit axes {mesh.axis_names} (e.g. "
        "`eqpar.data_mesh()`), and is being differentiated outside `jit`: its "
        "outputs carry their sharding in their type, and JAX can only differentiate "
        "through them outside `jit` with the mesh set as context. Wrap the gradient "
        "computation in `with jax.set_mesh(mesh):`, compile it (`eqpar.filter_jit` "
        "or `jax.jit` around the `jax.grad` call), or use a mesh with Auto axes "
        "(`jax.make_mesh(shape, names, axis_types=(AxisType.Auto,))`)."
    )


def check_replicated(leaf: Any, spec: P, where: Callable[[], str], what: str) -> None:
    """Raises `ReplicationError` for an output spec that claims replication over a
    mesh axis the output varies over (`check_vma=True`)."""
    missing = sorted(
        (a for a in varying_axes(leaf) if a not in _spec_axes(spec)), key=str
    )
    if missing:
        name = missing[0]
        raise ReplicationError(
            f"{what} gives {spec} for {where()}, which says it is the same on every "
            f"device along mesh axes {missing}, but it varies over them (its "
            "replication type, `check_vma=True`). Reduce it first (e.g. "
            f"`eqpar.pmean(x, {name!r})` or `eqpar.psum(x, {name!r})`), return every "
            f"device's block with a sharded spec such as `P({name!r})`, or pass "
            "`check_vma=False` to take the first device's value unchecked."
        )


def trace_shard_map(call: Callable[[], Any], check_vma: bool) -> Any:
    """Runs `call` (which traces a `shard_map`), turning JAX's bare `AssertionError`
    for a collective over a vmap axis (JAX's replication typing knows only mesh
    axes) into an eqpar error that names the switch."""
    try:
        return call()
    except (AssertionError, ValueError) as e:
        if not check_vma:
            raise
        if isinstance(e, AssertionError):
            frames = traceback.extract_tb(e.__traceback__)
            ours = bool(frames) and frames[-1].name == "pvary"
        else:  # a tuple of a mesh axis and a vmap axis
            ours = "can only accept axis_name which corresponds" in str(e)
        if ours:
            raise vmap_axis_error(
                "An axis of a `jax.lax` collective inside the function (e.g. the "
                "`pmean` of `eqx.nn.BatchNorm(axis_name=...)`)"
            ) from e
        raise


def _sharding(mesh: AnyMesh, spec: P) -> Any:
    return NamedSharding(mesh, spec) if isinstance(mesh, Mesh) else spec


def _same_spec(a: P, b: P, ndim: int) -> bool:
    pad = lambda s: tuple(s) + (None,) * (ndim - len(s))  # noqa: E731
    return pad(a) == pad(b)


def eager_autodiff_check(mesh: AnyMesh, who: str) -> Callable[[tuple, dict], None]:
    """`Compiled`'s pre-call check on a fixed mesh with Explicit axes: eager
    autodiff gets eqpar's error (with the way out) before JAX's own, which comes
    too late to say anything useful."""

    def check(args: tuple, kwargs: dict) -> None:
        # Only under a transformation (e.g. `jax.grad`) is there anything to check:
        # at the top level the trace state is the eval state, a 1 us comparison
        # instead of a walk over every leaf.
        if transformed_call():
            check_eager_autodiff(mesh, (args, kwargs), who)  # type: ignore[arg-type]

    return check


_TOP_LEVEL = get_opaque_trace_state()


def transformed_call() -> bool:
    """Whether this call runs under a JAX transformation (not at the top level)."""
    return get_opaque_trace_state() != _TOP_LEVEL


def _fixed_mesh(mesh: AnyMesh) -> Callable[[], AnyMesh]:
    return lambda: mesh


def _context_mesh() -> AnyMesh:
    try:
        mesh: AnyMesh = jax.sharding.get_mesh()
    except ValueError:  # under a trace only the abstract mesh is available
        mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        raise MeshError(
            "filter_shard_map was given `mesh=None` and no mesh is set. Pass "
            "`mesh=...`, or set one for the enclosing code with "
            "`with jax.set_mesh(mesh):` (e.g. `mesh = jax.make_mesh((n,), "
            "('data',))`)."
        )
    return mesh


@overload
def filter_shard_map(
    fun: None = None,
    *,
    in_specs: PyTree[SpecLeaf],
    out_specs: PyTree[SpecLeaf],
    mesh: AnyMesh | None = None,
    axis_names: Set[Hashable] | None = None,
    check_vma: bool = True,
    donate: Donate = "none",
) -> Callable[[Callable[..., Any]], Callable[..., Any]]: ...


@overload
def filter_shard_map(
    fun: Callable[..., Any],
    *,
    in_specs: PyTree[SpecLeaf],
    out_specs: PyTree[SpecLeaf],
    mesh: AnyMesh | None = None,
    axis_names: Set[Hashable] | None = None,
    check_vma: bool = True,
    donate: Donate = "none",
) -> Callable[..., Any]: ...


def filter_shard_map(
    fun: Checked[Callable[..., Any] | None] = None,
    *,
    in_specs: PyTree[SpecLeaf],
    out_specs: PyTree[SpecLeaf],
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
        keyed by parameter name (required for keyword arguments).
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
    if mesh is not None and not isinstance(mesh, (Mesh, AbstractMesh)):
        raise MeshError(f"`mesh` must be a jax.sharding.Mesh, got {type(mesh)}.")
    donate = check_donate(donate)
    options = (in_specs, out_specs, mesh, names, check_vma, donate)

    def make() -> Compiled:
        run = ft.partial(_shard_map_run, in_specs, out_specs, names, check_vma)
        if mesh is None:
            return Compiled(run, context_fn=_context_mesh, donate=donate)
        check = None
        if isinstance(mesh, Mesh) and AxisType.Explicit in mesh.axis_types:
            check = eager_autodiff_check(mesh, "filter_shard_map")
        return Compiled(run, context_fn=_fixed_mesh(mesh), donate=donate, check=check)

    caller = shared("shard_map", options, make)
    return decorator_or_call(fun, lambda f: transformed(f, caller), "filter_shard_map")
