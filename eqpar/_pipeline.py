"""Pipeline parallelism: a stack of layers split into stages over a mesh axis, with
microbatches passed from stage to stage (GPipe).

A stack is a pytree whose array leaves carry a leading layer axis `L` (as built by
`eqx.filter_vmap(make_block)(jax.random.split(key, L))`; its other leaves are shared
by every layer). Over a stage axis of `S` devices, stage `s` holds layers
`s * L / S ... (s + 1) * L / S - 1` and nothing else. The batch is cut into `M`
microbatches; at step `t` (of `M + S - 1`) stage `s` runs its layers (one
`jax.lax.scan`, one trace of the block) on microbatch `t - s`, then hands its result
to stage `s + 1` with one `ppermute` ([`eqpar.ring_shift`][]). Stage 0 reads the
microbatches, the last stage keeps the results, and one `psum` over the stage axis
gives them to every stage. Each stage is busy `M` of the `M + S - 1` steps: the
bubble is `(S - 1) / (M + S - 1)` of the time.

The backward pass is autodiff's transpose of this schedule: the same steps in
reverse, the `ppermute`s reversed, each stage's gradients computed where its
layers live.

`pipeline` runs the schedule where the stage axis is bound (inside
`filter_shard_map`, `filter_pmap`, `filter_vmap(axis_name=...)`), on each device's
layers and batch; anywhere else it wraps itself in `filter_shard_map` over the mesh.
"""

import functools as ft
from collections.abc import Callable, Hashable
from typing import Any

import equinox as eqx
import jax
import jax.core
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import PyTree

from ._collectives import axis_size, psum, ring_shift
from ._errors import AxisSizeError, Checked, MeshError, SpecError, UnboundAxisError
from ._runner import context_mesh, placed_spec
from ._shard_map import filter_shard_map
from ._specs import AnyMesh, is_array, spec_axes
from ._stacked import Stacked
from ._vma import AxisName, manual_axes, to_varying, typed, varying_axes


class _Placed:
    def __repr__(self) -> str:
        return "<as x is placed>"


PLACED: Any = _Placed()
"""`pipeline`'s default `data_axis`: read from where `x` is placed."""


def pipeline(
    stack: PyTree,
    x: PyTree,
    *,
    microbatches: Checked[int],
    fn: Callable[[Any, Any], Any] | None = None,
    stage_axis: Hashable = "stage",
    mesh: Checked[AnyMesh | None] = None,
    data_axis: Checked[AxisName | None] = PLACED,
) -> PyTree:
    """Applies a stack of layers to `x`, one after another, split into pipeline
    stages over the mesh axis `stage_axis` (a GPipe schedule of `microbatches`).

    The result equals the sequential fold `h = x; for l in range(L): h =
    fn(layer_l, h)` (outputs and, through `jax.grad`, gradients), while each device
    of the stage axis holds and runs only its own `L / S` layers. Each stage folds
    its layers with one `jax.lax.scan` (the layer is traced once, whatever `L`) and
    is rematerialised in the backward pass, as in GPipe: a device keeps each
    step's input microbatch, not every layer's activations.

    **Arguments:**

    - `stack`: the layers: an [`eqpar.Stacked`][], or any pytree whose array
        leaves all have the layer axis `L` in front, e.g.
        `eqx.filter_vmap(make_block)(jax.random.split(key, L))`.
        Its other leaves (activation functions, static fields) are shared by every
        layer. `L` must be a multiple of the number of stages `S`. Outside a
        transform that binds `stage_axis` it is split as `P(stage_axis)` (placed
        for you if it is not placed so already); inside one, it is this stage's
        `L / S` layers.
    - `x`: the input, an array or a pytree of arrays with the batch axis in front
        (its other leaves are passed to `fn` as they are). The batch is cut into
        `microbatches` consecutive groups of rows.
    - `microbatches`: how many microbatches `M`; it must divide the batch (the
        batch on each device when the batch is split over a data axis). More
        microbatches make the bubble `(S - 1) / (M + S - 1)` smaller.
    - `fn`: `fn(layer, h) -> h` applies one layer (the stack with its layer axis
        indexed) to a microbatch of activations `h`, returning the same structure,
        shapes and dtypes. It must treat the rows of `h` independently (as
        `jax.vmap` of a per-example layer does), since microbatches pass through the
        stages separately. Default: `layer(h)`, for a stack of callable Modules
        that take a batch; for per-example Modules such as `eqx.nn.Linear`, pass
        `fn=lambda layer, h: jax.vmap(layer)(h)`.
    - `stage_axis`: the mesh axis (or bound axis name) the stages run over.
        Where it is bound (inside `filter_shard_map` and the like), `mesh` and
        `data_axis` play no part: the stack and `x` are this device's.
    - `mesh`: the mesh, for a call outside any transform binding `stage_axis`.
        Default: the context mesh (`with jax.set_mesh(mesh):`), else the mesh the
        stack is placed on.
    - `data_axis`: for such a call, the mesh axes (a name or a tuple) the batch is
        split over: data parallelism over the axes other than the stage axis, e.g.
        `"data"` on a `("data", "stage")` mesh. `None`: the batch is whole on every
        device. Default: as `x` is placed (a placed array's sharding, or under a
        trace the sharding its type carries on Explicit mesh axes), else `None`;
        inside `jax.jit` on a mesh with Auto axes, say it.

    **Returns:**

    The output of the last layer, with `x`'s structure. Inside a transform it is
    the same on every stage (one `psum` over `stage_axis`); outside, it is placed
    as `x`'s batch was.

    !!! example

        ```python
        import equinox as eqx, jax, jax.numpy as jnp, eqpar
        from jax.sharding import PartitionSpec as P

        mesh = jax.make_mesh((2, 4), ("data", "stage"))
        make = lambda key: eqx.nn.Linear(8, 8, key=key)
        stack = eqx.filter_vmap(make)(jax.random.split(jax.random.key(0), 8))
        x = jnp.linspace(-1, 1, 16 * 8).reshape(16, 8)
        placed = eqpar.filter_device_put(stack, P("stage"), mesh=mesh)
        xp = eqpar.filter_device_put(x, P("data"), mesh=mesh)

        apply = lambda layer, h: jnp.tanh(jax.vmap(layer)(h))
        y = eqpar.pipeline(placed, xp, fn=apply, microbatches=4)

        h = x  # the sequential fold on one device, for comparison
        for i in range(8):
            h = apply(jax.tree.map(lambda a: a[i] if eqx.is_array(a) else a, stack), h)
        assert jnp.allclose(y, h, atol=1e-5)
        ```
    """
    if isinstance(stack, Stacked):  # its layers: the stack with the layer axis
        stack = stack.layers
    m = _check_microbatches(microbatches)
    apply = _layer_fn(stack, fn)
    L = _layers(stack)
    _batch(x, m, 1, "")
    try:
        axis_size(stage_axis)
    except UnboundAxisError:
        pass
    else:
        return _schedule(apply, stack, x, stage_axis=stage_axis, microbatches=m)
    bound = jax.sharding.get_abstract_mesh().manual_axes
    if bound:
        raise UnboundAxisError(
            f"eqpar.pipeline runs inside a `shard_map` that is manual over {bound} "
            f"but not over the stage axis {stage_axis!r}. Make the enclosing "
            f"`filter_shard_map` manual over {stage_axis!r} too (leave out "
            "`axis_names`, or include it), or call `pipeline` outside it."
        )
    mesh = _mesh(stack, x, mesh)
    if stage_axis not in mesh.axis_names:
        raise MeshError(
            f"eqpar.pipeline got stage_axis={stage_axis!r}, which is not an axis of "
            f"the mesh {dict(mesh.shape)}. Name one of {tuple(mesh.axis_names)}, or "
            "make a mesh with a stage axis, e.g. `jax.make_mesh((2, 4), ('data', "
            "'stage'))`."
        )
    stages = mesh.shape[stage_axis]
    if L % stages:
        raise AxisSizeError(
            f"eqpar.pipeline got a stack of {L} layers ({_first_leaf(stack)}) for "
            f"the {stages} stages of mesh axis {stage_axis!r}; {L} is not a "
            f"multiple of {stages}. Each stage holds L / S layers: use a multiple "
            f"of {stages} layers, or a stage axis whose size divides {L}."
        )
    batch = _batch_axes(x, mesh, stage_axis, data_axis)
    shards = int(np.prod([mesh.shape[a] for a in spec_axes(P(batch))]))
    _batch(x, m, shards, f" over {shards} devices of mesh axes {P(batch)}")
    run = filter_shard_map(
        _Pipeline(apply, stage_axis, m),
        mesh=mesh,
        in_specs=(P(stage_axis), P(batch)),
        out_specs=P(batch),
        check_vma=True,
    )
    return run(stack, x)


class _Pipeline(eqx.Module):
    """The per-device schedule as a Module (so that `filter_shard_map`'s cache sees
    the same function for the same options)."""

    apply: Callable[[Any, Any], Any]
    stage_axis: Hashable = eqx.field(static=True)
    microbatches: int = eqx.field(static=True)

    def __call__(self, stack: PyTree, x: PyTree) -> PyTree:
        return _schedule(
            self.apply,
            stack,
            x,
            stage_axis=self.stage_axis,
            microbatches=self.microbatches,
        )


def _call_layer(layer: Any, h: Any) -> Any:
    return layer(h)


def _schedule(
    apply: Callable[[Any, Any], Any],
    stack: PyTree,
    x: PyTree,
    *,
    stage_axis: Hashable,
    microbatches: int,
) -> PyTree:
    """The GPipe schedule on one device: `stack` is this stage's layers, `x` this
    device's batch; returns the last stage's output on every stage."""
    n_stages = axis_size(stage_axis)
    m = microbatches
    stage = jax.lax.axis_index(stage_axis)
    layers, shared = eqx.partition(stack, is_array)
    inputs, x_static = eqx.partition(x, is_array)

    cast = _activation_type(layers, inputs, stage_axis)

    split = jtu.tree_map(lambda a: a.reshape(m, a.shape[0] // m, *a.shape[1:]), inputs)

    def layer_step(h: Any, layer: Any) -> tuple[Any, None]:
        out = apply(eqx.combine(layer, shared), eqx.combine(h, x_static))
        out_arrays = _check_output(out, h, x_static)
        return cast(out_arrays), None

    # Rematerialised (as in GPipe): the backward pass keeps each step's input and
    # reruns the stage, instead of keeping every layer's activations and, worse,
    # a copy of the stage's layers for every step (the scan's residuals).
    @ft.partial(jax.checkpoint, prevent_cse=False)
    def run_stage(layers: Any, h: Any) -> Any:
        return jax.lax.scan(layer_step, h, layers)[0]

    def step(carry: tuple[Any, Any], t: Any) -> tuple[tuple[Any, Any], None]:
        received, outputs = carry
        first = jtu.tree_map(
            lambda a: jax.lax.dynamic_index_in_dim(
                a, jnp.minimum(t, m - 1), keepdims=False
            ),
            split,
        )
        h = jtu.tree_map(
            lambda a, r: jnp.where(stage == 0, a, r), cast(first), received
        )
        out = run_stage(layers, h)
        done = t - (n_stages - 1)  # the microbatch the last stage finishes now
        keep = (stage == n_stages - 1) & (done >= 0)
        index = jnp.maximum(done, 0)

        def store(buffer: Any, y: Any) -> Any:
            old = jax.lax.dynamic_index_in_dim(buffer, index, keepdims=False)
            new = jnp.where(keep, y, old)
            return jax.lax.dynamic_update_index_in_dim(buffer, new, index, 0)

        outputs = jtu.tree_map(store, outputs, out)
        return (cast(ring_shift(out, stage_axis)), outputs), None

    received = cast(jtu.tree_map(lambda a: jnp.zeros(a.shape[1:], a.dtype), split))
    outputs = cast(jtu.tree_map(jnp.zeros_like, split))
    steps = jnp.arange(m + n_stages - 1)
    (_, outputs), _ = jax.lax.scan(step, (received, outputs), steps)
    last = jtu.tree_map(
        lambda a: jnp.where(stage == n_stages - 1, a, jnp.zeros_like(a)), outputs
    )
    out = psum(last, stage_axis)
    out = jtu.tree_map(lambda a: a.reshape(a.shape[0] * a.shape[1], *a.shape[2:]), out)
    return eqx.combine(out, x_static)


def _activation_type(
    layers: Any, inputs: Any, stage_axis: Hashable
) -> Callable[[Any], Any]:
    """A cast of activations to their replication type (`check_vma=True`): varying
    over the stage axis (each stage runs its own layers) and over whatever the
    inputs and layers vary over. Where the type says the layers are the same on
    every stage, or the input differs between stages, the call is a mistake that
    would give a wrong answer silently: eqpar's error instead."""
    manual = manual_axes(stage_axis)
    if not typed(manual):
        return lambda tree: tree
    for path, leaf in _array_paths(layers):
        name = next((a for a in manual if a not in varying_axes(leaf)), None)
        if name is not None:
            raise SpecError(
                f"eqpar.pipeline got a stack whose leaf at {path} is the same on "
                f"every stage of {name!r} (replicated, e.g. given `P()`): each "
                "stage would run every layer. Split the stack over the stages by "
                f"its layer axis: `in_specs=P({name!r})` for it."
            )
    for path, leaf in _array_paths(inputs):
        name = next((a for a in manual if a in varying_axes(leaf)), None)
        if name is not None:
            raise SpecError(
                f"eqpar.pipeline got x at {path} split over the stage axis "
                f"{name!r}; the stages pass microbatches along that axis, so "
                "every stage must be given the same input (its spec may not name "
                f"{name!r}; e.g. `P('data')` or `P()`)."
            )
    seen = set(manual)
    for leaf in jtu.tree_leaves((layers, inputs)):
        seen |= set(varying_axes(leaf))
    axes = tuple(sorted(seen, key=str))
    return lambda tree: jtu.tree_map(lambda a: to_varying(a, axes), tree)


# ----------------------------------------------------------------------------------
# Checks


def _check_microbatches(microbatches: Any) -> int:
    if (
        isinstance(microbatches, bool)
        or not isinstance(microbatches, (int, np.integer))
        or microbatches < 1
    ):
        raise SpecError(
            f"eqpar.pipeline got microbatches={microbatches!r}; it must be a "
            "positive int: how many groups of rows the batch is cut into (it must "
            "divide the batch)."
        )
    return int(microbatches)


def _layer_fn(stack: Any, fn: Any) -> Callable[[Any, Any], Any]:
    if fn is not None:
        if not callable(fn):
            raise SpecError(
                f"eqpar.pipeline got fn={fn!r:.80}; it must be a function "
                "`fn(layer, h) -> h` applying one layer to a microbatch."
            )
        return fn
    if not callable(stack):
        raise SpecError(
            f"eqpar.pipeline was given no `fn` and a stack of type "
            f"{type(stack).__name__}, which is not callable. Pass `fn(layer, h) -> "
            "h` applying one layer to a microbatch (e.g. `fn=lambda layer, h: "
            "jax.vmap(layer)(h)` for per-example Modules), or a stack of callable "
            "Modules that take a batch."
        )
    return _call_layer


def _array_paths(tree: Any) -> list[tuple[str, Any]]:
    return [
        (jtu.keystr(path) or "(root)", leaf)
        for path, leaf in jtu.tree_flatten_with_path(tree)[0]
        if is_array(leaf)
    ]


def _first_leaf(stack: Any) -> str:
    path, leaf = _array_paths(stack)[0]
    return f"e.g. the leaf at {path} of shape {tuple(np.shape(leaf))}"


def _leading_size(
    tree: Any, *, empty: str, scalar: str, disagree: str, prefix: str = ""
) -> tuple[int, list[tuple[str, Any]]]:
    """The leading size every array leaf of `tree` shares (a stack's layers, a
    batch's rows), and the leaves; each way that fails is an error saying `empty`,
    `scalar` (formatted with the leaf's path) or `disagree` (with the sizes), the
    leaves listed after it (their paths after `prefix`)."""
    leaves = _array_paths(tree)
    if not leaves:
        raise SpecError(empty)
    scalars = [p for p, leaf in leaves if np.ndim(leaf) == 0]
    if scalars:
        raise SpecError(scalar.format(path=scalars[0]))
    sizes = {np.shape(leaf)[0] for _, leaf in leaves}
    if len(sizes) > 1:
        lines = "\n".join(
            f"  - {prefix}{p}: shape {tuple(np.shape(leaf))}" for p, leaf in leaves
        )
        raise AxisSizeError(disagree.format(sizes=sorted(sizes)) + f":\n{lines}")
    return sizes.pop(), leaves


def _layers(stack: Any) -> int:
    """The number of layers `L` (the leading size every array leaf shares)."""
    layers, _ = _leading_size(
        stack,
        empty="eqpar.pipeline got a stack with no array leaves; it must be a pytree "
        "of layers stacked along a leading axis, e.g. "
        "`eqx.filter_vmap(make_block)(jax.random.split(key, L))`.",
        scalar="eqpar.pipeline got a stack whose leaf at {path} is a scalar; "
        "every array leaf of a stack has the layer axis in front. Build the "
        "stack with `eqx.filter_vmap(make_block)(keys)`.",
        disagree="eqpar.pipeline got a stack whose array leaves disagree on the "
        "layer axis (their leading sizes are {sizes}); every array leaf of a "
        "stack has the same number of layers in front",
    )
    return layers


def _batch(x: Any, m: int, shards: int, where: str) -> None:
    """The batch (leading size every array leaf of `x` shares) is a multiple of
    `shards * m`."""
    batch, leaves = _leading_size(
        x,
        empty="eqpar.pipeline got an input `x` with no array leaves; it must be an "
        "array (or pytree of arrays) with the batch axis in front.",
        scalar="eqpar.pipeline got an input whose leaf at {path} is a scalar; every "
        "array of `x` has the batch axis in front.",
        disagree="eqpar.pipeline got an input whose arrays disagree on the batch "
        "size ({sizes}); every array of `x` has the batch in front",
        prefix="x at ",
    )
    if batch % (shards * m):
        path, leaf = leaves[0]
        split = (
            f"split{where} into {batch // shards} rows each, then "
            if shards > 1
            else ""
        )
        raise AxisSizeError(
            f"eqpar.pipeline got x at {path} of shape {tuple(np.shape(leaf))}: a "
            f"batch of {batch} rows, {split}cut into microbatches={m}; {batch} is "
            f"not a multiple of {shards * m}. Use a number of microbatches that "
            f"divides the batch per device, or pad the batch "
            f"(`eqpar.pad_batch(x, {shards * m})`)."
        )


def _check_output(out: Any, h: Any, x_static: Any) -> Any:
    """The array part of one layer's output, which must match its input's."""
    arrays, static = eqx.partition(out, is_array)
    expected = eqx.combine(h, x_static)
    same = jtu.tree_structure(out) == jtu.tree_structure(expected) and all(
        (np.shape(a), jnp.result_type(a)) == (np.shape(b), jnp.result_type(b))
        for a, b in zip(jtu.tree_leaves(arrays), jtu.tree_leaves(h))
    )
    if not same:
        got = jtu.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), arrays)
        want = jtu.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), h)
        raise SpecError(
            "eqpar.pipeline's layer function returned a value unlike its input: "
            f"given {want}, it returned {got} (structure {jtu.tree_structure(out)}). "
            "Activations pass from stage to stage, so each layer must return the "
            "structure, shapes and dtypes it is given (project to the output size "
            "after the pipeline)."
        )
    return arrays


# ----------------------------------------------------------------------------------
# The mesh and the batch's placement, for a call outside any transform


def _mesh(stack: Any, x: Any, mesh: Any) -> AnyMesh:
    if mesh is not None:
        if not isinstance(mesh, (Mesh, AbstractMesh)):
            raise MeshError(
                f"eqpar.pipeline got mesh={mesh!r:.80}; it must be a "
                "`jax.sharding.Mesh` with a stage axis, or None."
            )
        return mesh
    if not jax.sharding.get_abstract_mesh().empty:
        return context_mesh("eqpar.pipeline")
    for leaf in jtu.tree_leaves((stack, x)):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and not isinstance(
            leaf, jax.core.Tracer
        ):
            return sharding.mesh
    raise MeshError(
        "eqpar.pipeline was called outside any transform binding the stage axis, "
        "with no `mesh=`, no context mesh and no array placed on a mesh. Pass "
        "`mesh=` (e.g. `jax.make_mesh((4,), ('stage',))`), set one with `with "
        "jax.set_mesh(mesh):`, or place the stack first "
        "(`eqpar.filter_device_put(stack, P('stage'), mesh=mesh)`)."
    )


def _batch_axes(x: Any, mesh: AnyMesh, stage_axis: Hashable, data_axis: Any) -> Any:
    """The mesh axes `x`'s batch axis is split over (`None`: not split)."""
    if data_axis is PLACED:
        return _placed_batch_axes(x, mesh, stage_axis)
    if data_axis is None:
        return None
    names = data_axis if isinstance(data_axis, tuple) else (data_axis,)
    unknown = [a for a in names if a not in mesh.axis_names]
    if unknown:
        raise MeshError(
            f"eqpar.pipeline got data_axis={data_axis!r}, which names {unknown}, not "
            f"axes of the mesh {dict(mesh.shape)}."
        )
    if stage_axis in names:
        raise SpecError(
            f"eqpar.pipeline got data_axis={data_axis!r}, which includes the stage "
            f"axis {stage_axis!r}; the stages pass microbatches along it, so the "
            "batch may be split over the other axes only."
        )
    return data_axis


def _placed_batch_axes(x: Any, mesh: AnyMesh, stage_axis: Hashable) -> Any:
    entries = set()
    for path, leaf in _array_paths(x):
        spec = placed_spec(leaf, mesh)
        entry = spec[0] if spec is not None and len(spec) else None
        if entry is not None and stage_axis in spec_axes(P(entry)):
            raise SpecError(
                f"eqpar.pipeline got x at {path} placed as {spec}, split over the "
                f"stage axis {stage_axis!r}; the stages pass microbatches along "
                "that axis, so the input must be whole on it. Place it split over "
                "the other axes only (e.g. `P('data')`) or replicated (`P()`)."
            )
        entries.add(entry)
    if len(entries) > 1:
        raise SpecError(
            f"eqpar.pipeline got arrays of x whose batch axes are placed "
            f"differently ({sorted(map(str, entries))}); place them alike."
        )
    return entries.pop()
