"""`Stacked`: L identical layers held as one Module, every array leaf with a leading
layer axis, applied by scanning over it (one trace of the block for any depth).

The design follows Haliax's `Stacked` and Flax NNX's `nnx.scan`/`nnx.remat`: the
block's own code is unchanged; the stack's sharding is the block's with the layer
axis in front (`partition_specs` reads it, see `AbstractStack`); rematerialisation
is one policy on the stack; FSDP gathers one layer's shards at a time, inside the
scan body, so the whole stack is never gathered and gradients come back sharded as
the parameters are (the gather's transpose is a reduce-scatter).
"""

from collections.abc import Callable, Hashable, Sequence
from typing import Any, Generic, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import AxisType, PartitionSpec as P
from jaxtyping import PyTree

from ._errors import Checked, SpecError
from ._jit import filter_jit
from ._model_sharding import AbstractStack, MeshAxes, partition_specs
from ._placement import filter_device_put
from ._scan import scan_typed, typed_carry
from ._specs import broadcast_specs, is_array, spec_axes, StaticCarrier


Block = TypeVar("Block")

Remat = bool | tuple[str, ...] | Callable[..., Any]
"""A rematerialisation policy: `False` (save everything), `True` (save only each
layer's input), a tuple of `jax.ad_checkpoint.checkpoint_name` names to save, or a
`jax.checkpoint_policies` policy."""


class PerLayer(eqx.Module):
    """An argument of [`eqpar.Stacked.fold`][] / [`eqpar.Stacked.scan`][] that holds
    one value per layer (each array leaf with a leading axis of the stack's length,
    e.g. `jax.random.split(key, len(stack))`): layer `i` gets slice `i`. Any other
    argument is passed to every layer as it is.

    !!! example

        ```python
        import equinox as eqx, jax, jax.numpy as jnp, eqpar

        class Noisy(eqx.Module):
            scale: jax.Array

            def __call__(self, x, key):
                return self.scale * x + jax.random.normal(key, x.shape)

        stack = eqpar.Stacked.from_layers([Noisy(jnp.float32(i)) for i in range(4)])
        x = jnp.ones(8)
        layer_keys = jax.random.split(jax.random.key(1), len(stack))
        y = stack.fold(x, eqpar.PerLayer(layer_keys))  # each layer its own key
        by_hand = x
        for layer, k in zip(stack.unstacked(), layer_keys):
            by_hand = layer(by_hand, k)
        assert jnp.allclose(y, by_hand, atol=1e-5)
        ```
    """

    value: PyTree


class Stacked(AbstractStack, Generic[Block]):
    """L layers of one structure held as one Module: each array leaf of `layers`
    has a leading layer axis of size L (as `eqx.filter_vmap(make_block)(keys)`
    builds it), and applying the stack scans over that axis, so the block is traced
    once whatever L is and compile time stays flat in depth.

    **Arguments:**

    - `layers`: the stacked block: a Module of the block's class whose array leaves
        have the leading layer axis. Build it with [`eqpar.Stacked.build`][]
        (born sharded, never L copies on one device) or
        [`eqpar.Stacked.from_layers`][].
    - `axis_name`: the name of the layer axis in
        [`eqpar.partition_specs`][] (default `"layers"`): not sharded unless `dims`
        names it (e.g. `dims={"layers": "stage"}` for pipeline stages).
    - `remat`: the rematerialisation policy of the backward pass: `False` (keep
        every intermediate), `True` (keep only each layer's input and recompute the
        layer), a tuple of names given with `jax.ad_checkpoint.checkpoint_name`
        inside the block (keep those, recompute the rest), or a
        `jax.checkpoint_policies` policy. Gradients are the same under each.

    The stack is a pytree like any Module: optax states, `eqpar.CheckpointManager`
    and `eqpar.partition_specs` (the block's specs with the layer axis in front)
    work on it; `stack[i]` is layer `i`, `stack[a:b]` a shorter stack (e.g. a
    pipeline stage), `stack.unstacked()` the tuple of layers.

    !!! example

        ```python
        import equinox as eqx, jax, jax.numpy as jnp, eqpar

        keys = jax.random.split(jax.random.key(0), 6)
        stack = eqpar.Stacked.build(lambda k: eqx.nn.Linear(4, 4, key=k), keys)
        x = jnp.ones(4)
        y = stack(x)  # the six layers applied in turn, by one scan
        by_hand = x
        for layer in stack.unstacked():
            by_hand = layer(by_hand)
        assert jnp.allclose(y, by_hand, atol=1e-6)
        ```
    """

    layers: Block
    axis_name: str = eqx.field(static=True, default="layers")
    remat: Checked[Remat] = eqx.field(static=True, default=False)

    def __check_init__(self) -> None:
        _check_remat(self.remat)
        leaves = [x for x in jtu.tree_leaves(self.layers) if is_array(x)]
        if not leaves:
            raise SpecError(
                "Stacked: `layers` holds no arrays, so it has no layer axis; build "
                "it with `eqpar.Stacked.build(make_block, keys)`."
            )
        sizes = {x.shape[0] if x.ndim else None for x in leaves}
        if len(sizes) != 1 or None in sizes:
            raise SpecError(
                "Stacked: every array leaf of `layers` needs the same leading "
                f"(layer) axis, got leading sizes {sorted(map(str, sizes))}. Build "
                "the stack with `eqpar.Stacked.build(make_block, keys)` or "
                "`eqpar.Stacked.from_layers(layers)`."
            )

    @property
    def stack_axes(self) -> tuple[str, ...]:
        return (self.axis_name,)

    # ------------------------------------------------------------- building

    @classmethod
    def build(
        cls,
        make_block: Callable[[Any], Block],
        keys: PyTree,
        *,
        axis_name: str = "layers",
        remat: Checked[Remat] = False,
        dims: Checked[dict[str, MeshAxes] | None] = None,
        paths: Checked[Sequence[tuple[str, P]] | None] = None,
        mesh: Any = None,
    ) -> "Stacked[Block]":
        """Builds a stack of `len(keys)` layers, `make_block(keys[i])` each.

        **Arguments:**

        - `make_block`: `key -> block`, e.g. `lambda k: MyBlock(..., key=k)`.
        - `keys`: one key per layer (`jax.random.split(key, depth)`); any pytree of
            arrays with a leading axis of the depth will do (layer `i` is built
            from slice `i`).
        - `axis_name`, `remat`: as for [`eqpar.Stacked`][].
        - `dims`, `paths`: sharding rules, as for [`eqpar.partition_specs`][] of
            the stack. Given either, the stack is built inside one compiled
            function and born sharded on `mesh`: no device ever holds more than
            its shards (L whole layers are never on one device).
        - `mesh`: the mesh to shard over (default: the context mesh).

        **Returns:**

        The [`eqpar.Stacked`][] of the layers `make_block(keys[i])`.

        !!! example

            ```python
            import equinox as eqx, jax, eqpar
            from jax.sharding import PartitionSpec as P

            mesh = jax.make_mesh((2, 4), ("data", "model"))
            stack = eqpar.Stacked.build(
                lambda k: eqx.nn.Linear(8, 8, key=k),
                jax.random.split(jax.random.key(0), 4),
                paths=[(r"weight", P(None, "model"))],
                mesh=mesh,
            )
            assert stack.layers.weight.shape == (4, 8, 8)
            assert stack.layers.weight.sharding.spec == P(None, "model")
            ```
        """

        def make(keys: Any) -> "Stacked[Block]":
            layers = eqx.filter_vmap(make_block)(keys)
            return cls(layers, axis_name=axis_name, remat=remat)

        if dims is None and paths is None:
            return make(keys)

        def born_sharded(keys: Any) -> "Stacked[Block]":
            stack = make(keys)
            specs = partition_specs(stack, dims=dims, paths=paths)
            return filter_device_put(stack, specs, mesh=mesh)

        if mesh is None:
            return filter_jit(born_sharded)(keys)
        with jax.set_mesh(mesh):  # Explicit axes are constrained only under it
            return filter_jit(born_sharded)(keys)

    @classmethod
    def from_layers(
        cls,
        layers: Sequence[Block],
        *,
        axis_name: str = "layers",
        remat: Checked[Remat] = False,
    ) -> "Stacked[Block]":
        """Stacks existing layers of one structure (the inverse of
        [`eqpar.Stacked.unstacked`][]).

        **Arguments:**

        - `layers`: a non-empty sequence of Modules of the same structure, shapes
            and non-array fields.
        - `axis_name`, `remat`: as for [`eqpar.Stacked`][].

        **Returns:**

        An [`eqpar.Stacked`][] holding them.
        """
        if not layers:
            raise SpecError("Stacked.from_layers: `layers` is empty.")
        dyn = [eqx.partition(layer, eqx.is_array) for layer in layers]
        static = dyn[0][1]
        for i, (d, s) in enumerate(dyn):
            same = jtu.tree_structure(d) == jtu.tree_structure(dyn[0][0])
            if not same or not eqx.tree_equal(s, static):
                raise SpecError(
                    f"Stacked.from_layers: layer {i} differs from layer 0 in "
                    "structure or in a non-array field; a stack holds layers of one "
                    "structure."
                )
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[d for d, _ in dyn])
        return cls(eqx.combine(stacked, static), axis_name=axis_name, remat=remat)

    # ------------------------------------------------------------- access

    def __len__(self) -> int:
        return next(x for x in jtu.tree_leaves(self.layers) if is_array(x)).shape[0]

    def __getitem__(self, index: int | slice) -> Any:
        """`stack[i]`: layer `i` (a block); `stack[a:b]`: the stack of those layers."""
        dyn, static = eqx.partition(self.layers, eqx.is_array)
        picked = jax.tree.map(lambda x: x[index], dyn)
        if isinstance(index, slice):
            return Stacked(
                eqx.combine(picked, static), axis_name=self.axis_name, remat=self.remat
            )
        return eqx.combine(picked, static)

    def unstacked(self) -> tuple[Block, ...]:
        """The layers, as a tuple of L blocks."""
        return tuple(self[i] for i in range(len(self)))

    # ------------------------------------------------------------- applying

    def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        """`stack(x, ...)` is `stack.fold(x, ...)`."""
        return self.fold(x, *args, **kwargs)

    def fold(self, x: Any, *args: Any, gather: PyTree = None, **kwargs: Any) -> Any:
        """Applies the layers in turn, `x = layer(x, *args, **kwargs)`, by one scan.

        **Arguments:**

        - `x`: the input of the first layer, any pytree (the scan's carry).
        - `*args`, `**kwargs`: passed to every layer; an argument wrapped in
            [`eqpar.PerLayer`][] holds one value per layer (e.g. dropout keys) and
            layer `i` gets its slice `i`.
        - `gather`: for FSDP, the mesh axes to gather each layer's parameters over
            inside the scan body, as a spec tree for the stack (what
            [`eqpar.partition_specs`][] gives for the FSDP rules alone, e.g.
            `partition_specs(stack, dims={"embed": "data"})`), or a prefix of it.
            Inside `filter_shard_map` each layer's shards are all-gathered over
            those (manual) axes where the layer is used, and the gradients come
            back reduce-scattered, sharded as the parameters are; under an
            automatic mesh it is a sharding constraint that says the same to
            XLA. The whole stack is never gathered. `None`: each layer is used as
            it is held.

        **Returns:**

        The output of the last layer.

        Inside `filter_shard_map(check_vma=True)` the carry may become per-device
        (it is cast for you, as in [`eqpar.filter_scan`][]); finding its type
        traces the block once more, abstractly (twice in all, whatever the
        depth; once outside typed `shard_map`).
        """
        out, _ = self._run(x, args, kwargs, gather, returns_y=False)
        return out

    def scan(
        self, x: Any, *args: Any, gather: PyTree = None, **kwargs: Any
    ) -> tuple[Any, Any]:
        """As [`eqpar.Stacked.fold`][] for a block that returns `(x, y)`: a per-layer
        output `y` besides the carry.

        **Arguments:** as for [`eqpar.Stacked.fold`][].

        **Returns:**

        `(x, ys)`: the last layer's `x`, and every layer's `y` stacked along a
        leading layer axis (array leaves; a non-array leaf comes back once, as it
        is).
        """
        return self._run(x, args, kwargs, gather, returns_y=True)

    def _run(
        self, x: Any, args: tuple, kwargs: dict, gather: Any, returns_y: bool
    ) -> tuple[Any, Any]:
        layers_dyn, layers_static = eqx.partition(self.layers, eqx.is_array)
        gathers = self._gathers(gather, layers_dyn)
        per_layer = [
            (i, a.value) for i, a in enumerate(args) if isinstance(a, PerLayer)
        ] + [(k, a.value) for k, a in kwargs.items() if isinstance(a, PerLayer)]
        per_dyn = [eqx.filter(v, eqx.is_array) for _, v in per_layer]
        per_static = [eqx.filter(v, eqx.is_array, inverse=True) for _, v in per_layer]
        x_dyn, x_static = eqx.partition(x, eqx.is_array)
        ys = StaticCarrier()

        def layer(c_dyn: Any, layer_dyn: Any, per: list) -> tuple[Any, Any]:
            layer_dyn = jax.tree.map(_gather_leaf, layer_dyn, gathers)
            block = eqx.combine(layer_dyn, layers_static)
            call_args, call_kwargs = list(args), dict(kwargs)
            for (where, _), d, s in zip(per_layer, per, per_static):
                value = eqx.combine(d, s)
                if isinstance(where, int):
                    call_args[where] = value
                else:
                    call_kwargs[where] = value
            out = block(eqx.combine(c_dyn, x_static), *call_args, **call_kwargs)
            new, y = out if returns_y else (out, None)
            new_dyn, new_static = eqx.partition(new, eqx.is_array)
            if jtu.tree_structure(new_dyn) != jtu.tree_structure(
                c_dyn
            ) or not eqx.tree_equal(new_static, x_static):
                raise SpecError(
                    "Stacked: a layer returned "
                    f"{jtu.tree_structure(new)} from an input "
                    f"{jtu.tree_structure(x)}; a layer of a stack maps its input to "
                    "an output of the same structure (use `stack.scan` for a block "
                    "returning `(x, y)`)."
                )
            return new_dyn, ys.split(y)

        policy = _policy(self.remat, gathering=gather is not None)
        if policy is not None:
            layer = eqx.filter_checkpoint(layer, policy=policy, prevent_cse=False)

        def body(c_dyn: Any, xs: tuple[Any, list]) -> tuple[Any, Any]:
            return layer(c_dyn, *xs)

        x_dyn = typed_carry(body, x_dyn, (layers_dyn, per_dyn))
        out_dyn, ys_dyn = scan_typed(body, x_dyn, (layers_dyn, per_dyn))
        return eqx.combine(out_dyn, x_static), ys.merge(ys_dyn)

    def _gathers(self, gather: Any, layers_dyn: Any) -> Any:
        """For each array leaf of one layer: `(dimension, mesh axes)` pairs to gather
        over in the scan body (from `gather`, a spec tree for the stack)."""
        if gather is None:
            return jax.tree.map(lambda _: _Pairs(()), layers_dyn)
        if isinstance(gather, Stacked):
            gather = gather.layers
        specs = broadcast_specs(gather, self.layers, "(the stack's layers)", "`gather`")
        pairs = []
        for leaf, spec in zip(jtu.tree_leaves(self.layers), specs):
            if not is_array(leaf):
                continue
            spec = P() if spec is None else spec
            if not isinstance(spec, P):
                raise SpecError(
                    f"Stacked: `gather` holds {spec!r:.60}, not a PartitionSpec; "
                    "pass the stack's specs for the axes to gather over, e.g. "
                    "`eqpar.partition_specs(stack, dims={'embed': 'data'})`."
                )
            entries = tuple(spec)
            if entries and entries[0] is not None:
                raise SpecError(
                    f"Stacked: `gather` gives {spec} for a leaf of shape "
                    f"{leaf.shape}, which shards the layer axis (dimension 0): each "
                    "device would hold whole layers, not a shard of every layer. "
                    "Gather over parameter dimensions (the layer axis entry "
                    "`None`); to place whole layers on devices, use pipeline "
                    "stages."
                )
            pairs.append(
                tuple(
                    (d, tuple(spec_axes(P(e))))
                    for d, e in enumerate(entries[1:])
                    if e is not None
                )
            )
        dyn_def = jtu.tree_structure(layers_dyn)
        return jtu.tree_unflatten(dyn_def, [_Pairs(p) for p in pairs])


class _Pairs:
    """A leaf (not a pytree) holding `(dimension, axes)` gather pairs."""

    def __init__(self, pairs: tuple[tuple[int, tuple[Hashable, ...]], ...]) -> None:
        self.pairs = pairs


def _gather_leaf(x: Any, pairs: _Pairs) -> Any:
    """One layer's leaf `x`, gathered over the mesh axes `pairs` names: an
    all-gather over manual axes (inside `shard_map`); on an automatic or explicit
    mesh, a sharding constraint that leaves those dimensions unsharded (after one
    that keeps them sharded going in, whose transpose keeps the gradient sharded as
    the parameter is). Named `_GATHERED`, so that no policy saves it."""
    if not pairs.pairs:
        return x
    mesh = jax.sharding.get_abstract_mesh()
    manual = set(mesh.manual_axes)
    left: list[tuple[int, tuple[Hashable, ...]]] = []
    for dim, axes in pairs.pairs:
        here = tuple(a for a in axes if a in manual)
        if here:
            x = jax.lax.all_gather(x, here, axis=dim, tiled=True)
        rest = tuple(a for a in axes if a not in manual)
        if rest:
            left.append((dim, rest))
    if left and not mesh.empty:
        x = _constrain_gathered(x, left, mesh)
    return checkpoint_name(x, _GATHERED)


def _constrain_gathered(
    x: Any, pairs: list[tuple[int, tuple[Hashable, ...]]], mesh: Any
) -> Any:
    kinds = dict(zip(mesh.axis_names, mesh.axis_types))
    gathered = dict(pairs)
    if any(kinds.get(a) == AxisType.Explicit for _, axes in pairs for a in axes):
        current = tuple(jax.typeof(x).sharding.spec)
        current += (None,) * (x.ndim - len(current))
        spec = P(*[None if d in gathered else e for d, e in enumerate(current)])
        return jax.sharding.reshard(x, spec)
    free = P.UNCONSTRAINED
    sharded = P(
        *[_entry(gathered[d]) if d in gathered else free for d in range(x.ndim)]
    )
    whole = P(*[None if d in gathered else free for d in range(x.ndim)])
    x = jax.lax.with_sharding_constraint(x, sharded)
    return jax.lax.with_sharding_constraint(x, whole)


def _entry(axes: tuple[Hashable, ...]) -> Any:
    return axes[0] if len(axes) == 1 else axes


_GATHERED = "eqpar.stacked.gathered"
"""The `checkpoint_name` of a layer's gathered parameters."""

_GATHERING = frozenset({"all_gather", "sharding_constraint", "reshard"})


def _not_gathered(prim: Any, *_: Any, **params: Any) -> bool:
    """A `jax.checkpoint` policy: save anything but a gathered parameter (the
    output of a gather, of a sharding constraint, or named `_GATHERED`), which the
    backward pass gathers again, so that the whole stack is never held gathered."""
    if prim.name in _GATHERING:
        return False
    return not (prim.name == "name" and params.get("name") == _GATHERED)


def _policy(remat: Remat, gathering: bool) -> Any:
    """The `jax.checkpoint` policy of one layer (None: no checkpoint)."""
    policies = jax.checkpoint_policies
    if remat is True:
        return policies.nothing_saveable
    if remat is False:
        return _not_gathered if gathering else None
    user = policies.save_only_these_names(*remat) if isinstance(remat, tuple) else remat
    if not gathering:
        return user

    def both(prim: Any, *args: Any, **params: Any) -> bool:
        return bool(user(prim, *args, **params)) and _not_gathered(
            prim, *args, **params
        )

    return both


def _check_remat(remat: Any) -> None:
    ok = (
        isinstance(remat, bool)
        or (isinstance(remat, tuple) and all(isinstance(n, str) for n in remat))
        or callable(remat)
    )
    if not ok:
        raise SpecError(
            f"Stacked: `remat` is {remat!r:.60}; it is `False` (no "
            "rematerialisation), `True` (recompute each layer in the backward "
            "pass), a tuple of `checkpoint_name` names to save, or a "
            "`jax.checkpoint_policies` policy."
        )
