"""The one shard_map runner under `filter_shard_map`, `filter_pmap` and `Parallel`,
and the checks of meshes and options they share.

`run_shard_map` runs a per-device function of some arrays under `jax.shard_map`.
The function may return any pytree: its array leaves leave the devices by the specs
that `out_specs` gives once the output is known (while JAX traces it), its other
leaves come back as they are. Each front only decides its inputs, their specs and
what to do with the output.
"""

import functools as ft
import re
import traceback
from collections.abc import Callable, Hashable, Sequence, Set
from typing import Any

import jax
import jax.core
import jax.tree_util as jtu
import numpy as np
from jax.extend.core import get_opaque_trace_state
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec as P

from ._errors import MeshError, SpecError
from ._specs import AnyMesh, StaticCarrier
from ._vma import vmap_axis_error


def run_shard_map(
    fun: Callable[..., Any],
    inputs: Sequence[Any],
    in_specs: Sequence[P],
    out_specs: Callable[[Any], list[P]],
    *,
    mesh: AnyMesh,
    check_vma: bool,
    who: str,
    axis_names: Set[Hashable] = frozenset(),
) -> Any:
    """`fun(*blocks)` on every device of `mesh`, each input split by its spec.

    `out_specs(out)` gives one spec per array leaf of the per-device output `out`
    (it runs while JAX traces `fun`, so it may look at the output and raise eqpar's
    errors about it). Returns the output pytree, array leaves assembled over the
    devices, other leaves as `fun` returned them.
    """
    check_context_mesh(mesh, who)
    inputs = match_explicit(mesh, inputs, in_specs)
    # Filled while JAX traces `body`: shard_map reads `out_specs` only after the body
    # has run, which lets the specs follow an output structure unknown beforehand
    # (tests/test_shard_map.py pins this behaviour of JAX).
    specs: list[P] = []
    carry = StaticCarrier()

    def body(*blocks: Any) -> list[Any]:
        out = fun(*blocks)
        specs[:] = out_specs(out)
        return carry.split(out)

    def call() -> Any:
        return jax.shard_map(
            body,
            mesh=mesh,
            in_specs=tuple(in_specs),
            out_specs=specs,
            axis_names=set(axis_names),
            check_vma=check_vma,
        )(*inputs)

    return carry.merge(_vmap_axis_errors(call, check_vma, mesh))


def _vmap_axis_errors(call: Callable[[], Any], check_vma: bool, mesh: AnyMesh) -> Any:
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
        else:  # a tuple of a mesh axis and a vmap axis (not mesh axes alone)
            message = str(e)
            named = re.search(r"axes: \(([^)]*)\)", message)
            axes = re.findall(r"'([^']*)'", named.group(1)) if named else None
            ours = "can only accept axis_name which corresponds" in message and (
                axes is None or any(a not in mesh.axis_names for a in axes)
            )
        if ours:
            raise vmap_axis_error(
                "An axis of a `jax.lax` collective inside the function (e.g. the "
                "`pmean` of `eqx.nn.BatchNorm(axis_name=...)`)"
            ) from e
        raise


def sharding(mesh: AnyMesh, spec: P) -> Any:
    """`NamedSharding(mesh, spec)`, or the spec alone on an abstract mesh."""
    return NamedSharding(mesh, spec) if isinstance(mesh, Mesh) else spec


def gather(mesh: AnyMesh, x: Any) -> Any:
    """`x` replicated over `mesh` (an Explicit axis cannot be indexed, sliced
    unevenly or reduced over while sharded)."""
    return match_explicit(mesh, [x], [P()])[0]


def placed_spec(x: Any, mesh: AnyMesh) -> P | None:
    """The spec `x` is placed with on `mesh`: a concrete array's sharding, or under a
    trace the sharding in its type (which only Explicit mesh axes carry); `None`
    when it is not placed on `mesh` (or the trace does not say)."""
    if isinstance(x, jax.core.Tracer):
        sharding = jax.typeof(x).sharding
        target = mesh if isinstance(mesh, AbstractMesh) else mesh.abstract_mesh
        if getattr(sharding, "mesh", None) == target and any(
            t == AxisType.Explicit for t in target.axis_types
        ):
            return sharding.spec
        return None
    sharding = getattr(x, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return None
    own = sharding.mesh
    same = own == mesh if isinstance(mesh, Mesh) else own.abstract_mesh == mesh
    return sharding.spec if same else None


# ----------------------------------------------------------------------------------
# Meshes


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


def match_explicit(mesh: AnyMesh, arrays: Sequence[Any], specs: Sequence[P]) -> list:
    """Explicit mesh axes make sharding part of an array's type, and shard_map
    refuses an input whose type does not already carry its spec: reshard those
    (inside the jit)."""
    _check_explicit_inputs(mesh, arrays)
    if not any(t == AxisType.Explicit for t in mesh.axis_types):
        return list(arrays)
    return [
        x
        if _same_spec(jax.typeof(x).sharding.spec, s, x.ndim)
        else jax.sharding.reshard(x, sharding(mesh, s))
        for x, s in zip(arrays, specs)
    ]


def _check_explicit_inputs(mesh: AnyMesh, arrays: Sequence[Any]) -> None:
    """An input typed on another mesh's Explicit axes cannot be resharded onto
    `mesh` (nor silently moved there): a clear error instead of JAX's KeyError."""
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


def _same_spec(a: P, b: P, ndim: int) -> bool:
    pad = lambda s: tuple(s) + (None,) * (ndim - len(s))  # noqa: E731
    return pad(a) == pad(b)


def context_mesh(who: str) -> AnyMesh:
    """The mesh set by `jax.set_mesh` (only its abstract form under a trace); an
    eqpar `MeshError` naming `who` (what needed a mesh) when none is set. The one
    place eqpar looks the context mesh up."""
    try:
        mesh: AnyMesh = jax.sharding.get_mesh()
    except ValueError:  # under a trace only the abstract mesh is available
        mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        raise MeshError(
            f"{who} was given `mesh=None` and no mesh is set. Pass `mesh=...`, or "
            "set one for the enclosing code with `with jax.set_mesh(mesh):` (e.g. "
            "`mesh = eqpar.data_mesh()`, which spans every device, or "
            "`jax.make_mesh((n,), ('data',))`)."
        )
    return mesh


def concrete_context_mesh(who: str) -> Mesh:
    """`context_mesh(who)` for eager code that places arrays: a concrete `Mesh`
    (under a trace only the abstract mesh is known; then pass `mesh=`)."""
    mesh = context_mesh(who)
    if not isinstance(mesh, Mesh):
        raise MeshError(
            f"{who} needs the devices of the mesh, but under a trace only the "
            f"abstract context mesh {mesh} is known. Pass `mesh=...`."
        )
    return mesh


@ft.lru_cache(maxsize=64)
def line_mesh(
    devices: tuple[Any, ...], axis_name: Hashable, explicit: bool = False
) -> Mesh:
    """A 1-D mesh of `devices`, in this order, with one axis `axis_name` (Auto, or
    Explicit): the one place eqpar builds a mesh (`data_mesh`, `filter_pmap`,
    `Parallel`'s default). Built once per devices and name: equal meshes key
    programs alike anyway, and building one costs microseconds per call."""
    kind = AxisType.Explicit if explicit else AxisType.Auto
    return Mesh(np.array(devices), (axis_name,), axis_types=(kind,))


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


# ----------------------------------------------------------------------------------
# Eager autodiff on an Explicit mesh

_TOP_LEVEL = get_opaque_trace_state()


def eager_autodiff_check(
    mesh: AnyMesh | None, who: str
) -> Callable[[tuple, dict], None] | None:
    """The dispatch core's pre-call check for a fixed mesh with Explicit axes:
    autodiff outside `jit` with no context mesh, which JAX cannot do, gets eqpar's
    error (with the way out) before JAX's own, which comes too late to say anything
    useful. `None` for other meshes."""
    if not isinstance(mesh, Mesh) or AxisType.Explicit not in mesh.axis_types:
        return None

    def check(args: tuple, kwargs: dict) -> None:
        # Only under a transformation (e.g. `jax.grad`) is there anything to check:
        # at the top level the trace state is the eval state, a 1 us comparison
        # instead of a walk over every leaf.
        if get_opaque_trace_state() == _TOP_LEVEL:
            return
        if not jax.sharding.get_abstract_mesh().empty or not _eager_autodiff(
            (args, kwargs)
        ):
            return
        raise MeshError(
            f"{who} runs on a mesh with Explicit axes {mesh.axis_names} (e.g. "
            "`eqpar.data_mesh()`), and is being differentiated outside `jit`: its "
            "outputs carry their sharding in their type, and JAX can only "
            "differentiate through them outside `jit` with the mesh set as context. "
            "Wrap the gradient computation in `with jax.set_mesh(mesh):`, compile "
            "it (`eqpar.filter_jit` or `jax.jit` around the `jax.grad` call), or use "
            "a mesh with Auto axes (`jax.make_mesh(shape, names, "
            "axis_types=(AxisType.Auto,))`)."
        )

    return check


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
