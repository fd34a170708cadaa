"""`Parallel`: split a batch over the devices, run, reduce. Objax's front door, on
eqpar's dispatch core and its one shard_map runner.

One compiled program per call signature does all of it: per-example keys, padding to
a multiple of the device count, the per-device call with the axis name bound, the
reduction of the outputs and the trimming of the padding.
"""

import functools as ft
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax.extend.core import jaxpr_as_fun
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import PyTree

from ._dispatch import (
    Backend,
    Bounded,
    check_donate,
    Compiled,
    Donate,
    Lowered,
    shared,
    Transformed,
    transformed,
)
from ._errors import AxisSizeError, Checked, MeshError, SpecError, warn
from ._keys import is_legacy_key, is_scalar_key, per_example_keys
from ._mapped import AxisSpec
from ._placement import is_one_reduction, reductions_per_leaf, STACK_REDUCTIONS
from ._runner import (
    check_shard_map_options,
    eager_autodiff_check,
    gather,
    line_mesh,
    run_shard_map,
)
from ._specs import (
    abstract_signature,
    call_with,
    check_int_axes,
    is_array,
    leaf_names,
    Marker,
    resolve_call_specs,
    StaticCarrier,
)
from ._vma import names_axis, same_on_every_device, varying_axes


# "concat" | "mean" | "first" | None | callable (a `str`, not a Literal: see Reduce in
# _placement.py).
ParallelReduce = str | None | Callable[[Any], Any]
_REDUCE = ("concat", "mean", "first")


class _BatchAxes:
    """Parallel's default `in_axes`: axis 0 of every array argument is the batch,
    except the arrays of a Module or an `eqx.nn.State` (weights, state: broadcast)
    and scalars other than a typed key (one value for the whole batch: broadcast).
    A scalar typed key maps, i.e. becomes one key per example."""

    def __call__(self, leaf: Any) -> Any:
        return _DEFAULT  # replaced leaf by leaf by `_default_axes`

    def __repr__(self) -> str:
        return "batch"


BATCH = _BatchAxes()
_DEFAULT = Marker("<the default axis>")


def _default_axes(fun: Any, args: tuple, kwargs: dict) -> list[Any]:
    """`BATCH`'s axis for every leaf of `(fun, args, kwargs)`, in flatten order."""
    axes: list[Any] = [None] * len(jtu.tree_leaves(fun))
    for arg in (*args, *(kwargs[k] for k in sorted(kwargs))):
        for leaf in jtu.tree_leaves(arg, is_leaf=_is_module):
            if _is_module(leaf):
                axes += [None] * len(jtu.tree_leaves(leaf))
            elif is_array(leaf) and (np.ndim(leaf) > 0 or is_scalar_key(leaf)):
                axes.append(0)
            else:
                axes.append(None)
    return axes


def _is_module(x: Any) -> bool:
    return isinstance(x, (eqx.Module, eqx.nn.State))


class _Split(NamedTuple):
    """How one call's batch splits over the devices."""

    leaves: list[Any]
    axes: list[Any]  # per leaf: the batch axis, or None (broadcast)
    keys: list[bool]  # per leaf: a scalar key to expand into one key per example
    size: int  # examples
    pad: int  # padded examples (repeats of the last one), trimmed afterwards


MAX_SPLITS = 64
"""Call signatures per `Parallel` option set whose batch split is remembered."""


class _Parallel:
    """`Parallel`'s backend for one set of options."""

    def __init__(
        self,
        reduce: ParallelReduce | PyTree,
        axis_name: Hashable,
        in_axes: Any,
        mesh: Mesh | None,
        check_vma: bool,
    ):
        self.reduce = reduce
        self.axis_name = axis_name
        self.in_axes = in_axes
        self.mesh = mesh
        self.check_vma = check_vma
        self._splits: Bounded[_Split] = Bounded(MAX_SPLITS)

    def context(self, fun: Any, args: tuple, kwargs: dict) -> Mesh:
        del fun, args, kwargs
        return line_mesh(tuple(jax.devices()), self.axis_name)

    def split(self, fun: Any, args: tuple, kwargs: dict, mesh: Mesh) -> _Split:
        """How this call's batch splits: resolved once per signature (before the
        call, to place the inputs) and found again while it is traced, so that
        callables in `in_axes` run once."""
        leaves = jtu.tree_leaves((fun, args, kwargs))
        key = (abstract_signature((fun, args, kwargs)), mesh)
        found = self._splits.get(key)
        if found is not None:
            return found._replace(leaves=leaves)
        split = self._split(fun, args, kwargs, mesh, leaves)
        self._splits.put(key, split._replace(leaves=[]))  # no arrays kept
        return split

    def _split(
        self, fun: Any, args: tuple, kwargs: dict, mesh: Mesh, leaves: list[Any]
    ) -> _Split:
        axes = resolve_call_specs(
            self.in_axes, fun, args, kwargs, default=BATCH, what="in_axes"
        )
        if any(a is _DEFAULT for a in axes):
            defaults = _default_axes(fun, args, kwargs)
            axes = [d if a is _DEFAULT else a for a, d in zip(axes, defaults)]
        names = ft.cache(lambda: leaf_names(fun, args, kwargs))
        keys = [a is not None and is_scalar_key(x) for x, a in zip(leaves, axes)]
        size = _check_sizes(axes, keys, leaves, names)
        if size is None:
            raise SpecError(
                "Parallel splits a batch along the mapped axis of its arguments, but "
                "no argument is mapped (every array leaf has in_axes None, and the "
                "default broadcasts Modules and scalars). Pass the batch as an array "
                "argument, or map it explicitly, e.g. in_axes=(None, 0)."
            )
        devices = mesh.shape[self.axis_name]
        pad = (-size) % devices
        if pad and any(r != "concat" for r in _reduce_leaves(self.reduce)):
            raise AxisSizeError(
                f"Parallel(reduce={self.reduce!r}) got a batch of {size} examples, "
                f"which does not divide over {devices} devices. Padding would change "
                f"the result: the padded examples would enter the {self.reduce!r} "
                f"reduction. Pad the batch yourself to a multiple of {devices} "
                "(`eqpar.pad_batch`), pass a mask or count of the real examples and "
                "weight by it (e.g. the `count` of "
                "`eqpar.filter_value_and_grad_mean`), or use reduce='concat', which "
                "pads and trims for you."
            )
        return _Split(leaves, axes, keys, size, pad)

    def targets(
        self, fun: Any, args: tuple, kwargs: dict, context: Mesh | None
    ) -> list[NamedSharding]:
        """Batches split along their batch axis (replicated when padded: the
        program pads them first), everything else replicated."""
        mesh = self.mesh if self.mesh is not None else context
        assert mesh is not None
        split = self.split(fun, args, kwargs, mesh)
        out = []
        for leaf, axis, key in zip(split.leaves, split.axes, split.keys):
            if not is_array(leaf):
                continue
            if key or axis is None or split.pad:
                out.append(NamedSharding(mesh, P()))
            else:
                axis %= np.ndim(leaf)
                out.append(NamedSharding(mesh, P(*[None] * axis, self.axis_name)))
        return out

    def run(self, fun: Any, args: tuple, kwargs: dict, context: Mesh | None) -> Any:
        mesh = self.mesh if self.mesh is not None else context
        assert mesh is not None
        name, reduce = self.axis_name, self.reduce
        split = self.split(fun, args, kwargs, mesh)
        leaves, treedef = jtu.tree_flatten((fun, args, kwargs))
        names = ft.cache(lambda: leaf_names(fun, args, kwargs))
        total = split.size + split.pad
        index = np.concatenate(
            [np.arange(split.size), np.full(split.pad, split.size - 1)]
        )
        inputs, specs, where = [], [], []
        for i, (leaf, axis, key) in enumerate(zip(leaves, split.axes, split.keys)):
            if not is_array(leaf):
                continue
            if axis is None and is_scalar_key(leaf):
                _warn_broadcast_key(names()[i])
            where.append(i)
            if key:  # one key per example, by global index: any device count
                inputs.append(per_example_keys(leaf, total))
                specs.append(P(name))
            elif axis is None:
                inputs.append(leaf)
                specs.append(P())
            else:
                value = jnp.moveaxis(leaf, axis, 0)
                if split.pad:  # repeat the last example; trimmed afterwards
                    value = jnp.take(value, index, axis=0)
                inputs.append(value)
                specs.append(P(name))
        per_device_rows = total // mesh.shape[name]
        same_in = [spec == P() for spec in specs]
        # Filled while JAX traces `per_device` (one list per trace: thread-safe).
        stacked: list[bool] = []  # per output array: a stack left to reduce
        reductions: list[Any] = []  # per output array: its reduction
        out_specs: list[P] = []

        def call(*blocks: Any) -> list[Any]:
            out = call_with(treedef, leaves, where, blocks)
            per_leaf = reductions_per_leaf(reduce, out, _is_one, "Parallel")
            reductions[:] = [
                r for (r, _), x in zip(per_leaf, jtu.tree_leaves(out)) if is_array(x)
            ]
            return carry.split(out)

        carry = StaticCarrier()

        def per_device(*blocks: Any) -> Any:
            # `fun` is traced once, into a program that is then read (does a
            # collective see padded rows? which outputs are the same on every
            # device?) and run.
            closed = jax.make_jaxpr(call)(*blocks)
            if split.pad:  # padded rows must not reach a collective
                _refuse_collectives(closed, name, split)
            if not self.check_vma and any(r in ("first", "mean") for r in reductions):
                same = same_on_every_device(closed.jaxpr, same_in, name)
            else:  # typed (check_vma=True: each output says), or not needed
                same = [False] * len(closed.out_avals)
            outs = jaxpr_as_fun(closed)(*blocks)
            stacked.clear()
            out_specs.clear()
            new_leaves = []
            for x, r, known_same in zip(outs, reductions, same):
                x, spec, is_stacked = _per_device_output(
                    x, r, name, per_device_rows, self.check_vma, known_same
                )
                out_specs.append(spec)
                stacked.append(is_stacked)
                new_leaves.append(x)
            return carry.merge(new_leaves)

        out = run_shard_map(
            per_device,
            inputs,
            specs,
            lambda _: out_specs,
            mesh=mesh,
            check_vma=self.check_vma,
            who="Parallel",
        )
        out_leaves, out_def = jtu.tree_flatten(out)
        arrays = iter([x for x in out_leaves if is_array(x)])
        finished = iter(_finish(mesh, list(arrays), stacked, reductions, split))
        return out_def.unflatten(
            [next(finished) if is_array(x) else x for x in out_leaves]
        )


def _finish(
    mesh: Mesh,
    outs: list[Any],
    stacked: list[bool],
    reductions: list[Any],
    split: _Split,
) -> list[Any]:
    """The outputs as one device would return them, each by its reduction: padding
    trimmed, stacks reduced (gathered first: an Explicit axis cannot be sliced
    unevenly, indexed or handed to an arbitrary callable while sharded)."""
    done = []
    for x, is_stacked, r in zip(outs, stacked, reductions):
        if r == "concat":
            done.append(gather(mesh, x)[: split.size] if split.pad else x)
        elif r is None or not is_stacked:
            done.append(x)
        else:
            fn = STACK_REDUCTIONS[r] if isinstance(r, str) else r
            done.append(fn(gather(mesh, x)))
    return done


def _is_one(x: Any) -> bool:
    """One reduction of `Parallel` (None: stacked per device), not a prefix."""
    return x is None or is_one_reduction(x)


def _reduce_leaves(reduce: Any) -> list[Any]:
    """The reductions a `reduce` (one, or a pytree prefix of the outputs) names."""
    return jtu.tree_leaves(reduce, is_leaf=_is_one)


# Primitives that name an axis but move nothing between devices.
_LOCAL = frozenset({"axis_index", "pvary", "pcast"})


def _refuse_collectives(jaxpr: Any, axis_name: Hashable, split: _Split) -> None:
    """Raises if the traced per-device function communicates over `axis_name`."""
    found = names_axis(jaxpr.jaxpr, axis_name, _LOCAL)
    if not found:
        return
    total = split.size + split.pad
    raise AxisSizeError(
        f"Parallel(reduce='concat') pads this batch of {split.size} examples to "
        f"{total} (repeating the last example, to fill every device), and `fun` "
        f"calls a collective over {axis_name!r} (`{found}`): the padded rows would "
        "enter it (a batch mean, a sum, BatchNorm statistics) and change the "
        "result. Give Parallel a batch that divides over the devices: pad it "
        "yourself (`eqpar.pad_batch`, which returns the number of real rows) and "
        "mask the padded rows in the reduction (e.g. the `count=` of "
        "`eqpar.filter_value_and_grad_mean`), or reduce outside `fun`."
    )


def _check_sizes(
    axes: list[Any], keys: list[bool], leaves: list[Any], names: Callable[[], list]
) -> int | None:
    try:
        return check_int_axes(
            [None if k else a for a, k in zip(axes, keys)], leaves, names, "in_axes"
        )
    except AxisSizeError as e:
        legacy = [
            names()[i]
            for i, (leaf, a) in enumerate(zip(leaves, axes))
            if a is not None and is_legacy_key(leaf)
        ]
        if not legacy:
            raise
        raise AxisSizeError(
            f"{e}\n{legacy[0]} looks like a legacy `jax.random.PRNGKey` (uint32[2]), "
            "which Parallel maps like any batch array. Only typed keys "
            "(`jax.random.key(seed)`) are expanded into one key per example: pass "
            "`jax.random.key(seed)`, or `jax.random.wrap_key_data(key)` for an "
            "existing one."
        ) from None


def _warn_broadcast_key(name: str) -> None:
    warn(
        f"Parallel broadcasts the random key {name} unchanged (its in_axes is "
        "None), so every device, and every example, draws the same numbers. For "
        "per-example randomness that does not depend on the device count, map the "
        "key instead: give it in_axes 0 (the default does), and Parallel passes "
        "`fun` one key per example, `fold_in(key, example_index)`."
    )


def _per_device_output(
    leaf: Any,
    reduce: ParallelReduce,
    axis_name: Hashable,
    per_device: int,
    check_vma: bool,
    known_same: bool,
) -> tuple[Any, P, bool]:
    """One output leaf inside the per-device body: the value to return, its out_spec,
    and whether it comes back as a `(devices, ...)` stack still to be reduced.

    "first" and "mean" of a value every device holds identically (invariant over
    the axis, e.g. after `pmean`) is that value: it leaves each device as it is, with
    no stack to build or communicate. A varying value is averaged in place with one
    all-reduce ("mean"), or stacked for device 0's to be taken ("first"). Without
    replication types (`check_vma=False`), `known_same` says whether the traced
    program shows the value to be the same on every device
    (`_vma.same_on_every_device`).
    """
    if reduce == "concat":
        _check_concat(leaf, per_device)
        return leaf, P(axis_name), False
    if reduce in ("first", "mean"):
        if known_same or (check_vma and axis_name not in varying_axes(leaf)):
            return leaf, P(), False
        if reduce == "mean" and jnp.issubdtype(leaf.dtype, jnp.inexact):
            return jax.lax.pmean(leaf, axis_name), P(), False
    return leaf[None], P(axis_name), True


def _check_concat(leaf: Any, per_device: int) -> None:
    """A concatenated output must be per example: one row per example of the device,
    so that the result is what one device would return (and padding can be
    trimmed), whether or not the batch was padded."""
    if leaf.ndim == 0 or leaf.shape[0] != per_device:
        got = "a scalar" if leaf.ndim == 0 else f"{leaf.shape[0]} rows"
        raise SpecError(
            "Parallel(reduce='concat') concatenates each output along its first "
            "axis, one row per example, but an output (of per-device shape "
            f"{leaf.shape}) has {got} where each device has {per_device} examples. "
            "Return per-example outputs (first axis = the batch), or use "
            "reduce='mean', 'first', None (stacked per device) or a callable for "
            "per-device results such as a loss or a sum."
        )


class Parallel(eqx.Module):
    """Runs `fun` data-parallel: the batch (axis 0 of every mapped argument) is split
    over the devices, `fun` runs once per device on its shard with `axis_name` bound,
    and the per-device outputs are reduced.

    **Arguments:**

    - `fun`: the per-device function (plain function, method or callable Module);
        it sees its device's shard of each mapped argument.
    - `reduce`: how the outputs come back:
        - `"concat"` (default): concatenated along axis 0, in the original order,
            so a per-example function returns exactly what it would on one device.
            A batch that does not divide over the devices is padded (repeating the
            last example) and the padding trimmed.
        - `None`: stacked per device, `(devices, per_device, ...)`.
        - `"first"`: device 0's output; `"mean"`: the mean over devices. With
            `check_vma=True` an output typed the same on every device (e.g.
            `pmean`-ed gradients or updated parameters) comes back as it is, with
            no stack built or moved: the cheap way to return a replicated model.
            Under the default `check_vma=False` the same holds for every output
            that the traced program shows to be the same on every device: one
            computed only from broadcast inputs and from results of `psum`,
            `pmean`, `pmax`, `pmin` or `all_gather` over the axis (parameters
            updated with averaged gradients, a `pmean`-ed loss). Any other
            output is stacked and device 0's value (or the mean) brought back.
        - a callable applied to each output's `(devices, ...)` stack.
        - a pytree prefix of the outputs with those at its leaves, one per output
            (or subtree), e.g. `{"loss": "mean", "pred": "concat"}` for a `fun`
            returning such a dict. (An `eqx.Module` there is a prefix, not a
            callable.)
        All but `"concat"` need a batch that divides (pad it with
        `eqpar.pad_batch`).
        An empty batch gives empty outputs (as `jax.vmap` does).
    - `axis_name`: the device axis name, for collectives inside `fun`. Default: the
        only axis of `mesh`, or `"devices"` on the mesh `Parallel` builds.
    - `in_axes`: as [`eqpar.filter_vmap`][]: `None` broadcasts an argument to every
        device; non-array leaves are static. The default splits axis 0 of every
        array argument (the batch), and broadcasts the arrays of Modules (and of
        `eqx.nn.State`) and scalars: a model's weights are never split, even when
        their shape happens to fit the batch. A dict keyed by parameter name gives
        the arguments it names their spec and the others this default.
    - `mesh`: a mesh with an axis `axis_name` (default: all devices, Auto axes).
    - `check_vma`: replication typing in the per-device program, as for
        [`eqpar.filter_shard_map`][]. Off by default: `Parallel` has `jax.pmap`'s
        (and Objax's) semantics, where `jax.grad` inside `fun` gives each device its
        own gradient, so the Objax step `pmean(jax.grad(loss)(w, x), axis_name)`
        is the mean gradient, and every output may differ between devices
        (`"first"`/`"mean"` stack them). `True` types replication as
        `filter_shard_map` does: an output the same on every device comes back
        without a stack, but the gradient of a broadcast parameter is then already
        summed over the devices (`eqpar.pmean` of it raises
        `eqpar.ReplicationError`; use [`eqpar.filter_value_and_grad_mean`][]).
    - `donate`: which input buffers the compiled call may reuse, as for
        [`eqpar.filter_jit`][] (`"none"`, the default, `"all"`,
        `"all-except-first"`, `"warn"`, `"warn-except-first"`).

    **Randomness:** a scalar typed key (`jax.random.key(seed)`) in a mapped argument
    becomes one key per example, `fold_in(key, example_index)`, sharded like the
    batch: `fun` gets its shard of keys (vmap over them), and the result is the same
    on 1, 2, 4 or 8 devices. A key given with `in_axes=None` is broadcast unchanged,
    so every device draws the *same* numbers: usually a bug, and `Parallel` warns
    (`eqpar.EqparWarning`). A legacy `jax.random.PRNGKey` (`uint32[2]`) is not a
    key to `Parallel`, only data: pass a typed key.

    **Padding and collectives:** a batch that does not divide over the devices is
    padded only for `reduce="concat"`, and only when `fun` calls no collective over
    `axis_name` (the padded rows would enter it: a batch mean, a `psum`, BatchNorm
    statistics); otherwise `Parallel` raises `eqpar.AxisSizeError` saying how to
    pad and mask yourself.

    **Autodiff on an Explicit mesh:** with a mesh whose axes are Explicit,
    differentiate under `with jax.set_mesh(mesh):` or inside `jit`; outside both,
    `Parallel` raises `eqpar.MeshError` (JAX cannot do it).

    !!! example

        ```python
        import equinox as eqx, jax, jax.numpy as jnp, eqpar

        net = eqx.nn.Linear(3, 4, key=jax.random.key(0))
        x = jnp.ones((96, 3))
        forward = eqpar.filter_vmap(net)                # a pytree: net's arrays
        y = eqpar.Parallel(forward)(x)                  # (96, 4), as one device
        per_device = eqpar.Parallel(forward, reduce=None)(x)
        assert per_device.shape == (jax.device_count(), 96 // jax.device_count(), 4)
        ```
    """

    _call: Transformed
    reduce: ParallelReduce | PyTree = eqx.field(static=True)
    axis_name: Hashable = eqx.field(static=True)

    def __init__(
        self,
        fun: Checked[Callable[..., Any]],
        *,
        reduce: Checked[ParallelReduce | PyTree] = "concat",
        axis_name: Hashable | None = None,
        in_axes: PyTree[AxisSpec] = BATCH,
        mesh: Checked[Mesh | None] = None,
        check_vma: Checked[bool] = False,
        donate: Checked[Donate] = "none",
    ):
        if not callable(fun):
            raise SpecError(
                f"Parallel runs a function, but was given {type(fun).__name__} "
                f"{fun!r:.80}, which is not callable: `eqpar.Parallel(fn, ...)`."
            )
        for path, r in jtu.tree_flatten_with_path(reduce, is_leaf=_is_one)[0]:
            if not (r is None or callable(r) or (isinstance(r, str) and r in _REDUCE)):
                at = f" at {jtu.keystr(path)}" if path else ""
                raise SpecError(
                    f"Parallel got reduce={r!r}{at}; use 'concat', 'mean', 'first', "
                    "None or a callable on the (devices, ...) stack of each output, "
                    "or a pytree prefix of the outputs with those at its leaves."
                )
        check_shard_map_options(mesh, None, check_vma, "Parallel")
        donate = check_donate(donate)
        if mesh is not None and axis_name is None:
            if len(mesh.axis_names) != 1:
                raise MeshError(
                    f"Parallel got a mesh with axes {tuple(mesh.axis_names)} and no "
                    "axis_name: name the axis to split the batch over, e.g. "
                    f"`axis_name={mesh.axis_names[0]!r}`."
                )
            axis_name = mesh.axis_names[0]
        if mesh is not None and axis_name not in mesh.axis_names:
            raise MeshError(
                f"Parallel's axis_name={axis_name!r} is not an axis of the mesh, "
                f"whose axes are {tuple(mesh.axis_names)}: pass one of them (or "
                "leave axis_name out on a one-axis mesh)."
            )
        if axis_name is None:
            axis_name = "devices"
        # The backend and its options, shared by every Parallel with the same
        # options (a fresh Parallel per call compiles once).
        name = axis_name

        def make() -> Compiled:
            backend = _Parallel(reduce, name, in_axes, mesh, check_vma)
            return Compiled(
                Backend(
                    backend.run,
                    context=backend.context if mesh is None else None,
                    targets=backend.targets,
                    check=eager_autodiff_check(mesh, "Parallel"),
                ),
                donate=donate,
            )

        options = (reduce, axis_name, in_axes, mesh, check_vma, donate)
        self._call = transformed(fun, shared("parallel", options, make))
        self.reduce = reduce
        self.axis_name = axis_name

    @property
    def __wrapped__(self) -> Callable[..., Any]:
        return self._call._fun

    def __call__(self, /, *args: Any, **kwargs: Any) -> Any:
        # `object.__getattribute__` skips `eqx.Module.__getattribute__` (a Python
        # hook): 0.1 µs instead of 0.7 µs per call (`timeit`).
        return object.__getattribute__(self, "_call")(*args, **kwargs)

    def lower(self, /, *args: Any, **kwargs: Any) -> Lowered:
        """Lowers the call ahead of time, as `jax.jit(...).lower` does: returns an
        object whose `.compile()` is a callable taking the same arguments (same
        static values, shapes and placements)."""
        return self._call.lower(*args, **kwargs)
