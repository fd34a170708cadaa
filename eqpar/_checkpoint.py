"""Checkpoints of sharded pytrees, on orbax-checkpoint.

One idea: a pytree is saved as its *array leaves* (the leaves
`equinox.tree_serialise_leaves` saves: arrays, NumPy scalars, Python numbers and
bools), keyed by their path (`jax.tree_util.keystr`), with orbax's
`StandardCheckpointHandler`; everything else (a Module's static fields, activation
functions, the tree's structure) is not saved but taken from a `like` tree at restore
time, as `equinox.tree_deserialise_leaves` does. The arrays are read straight onto
their target shardings (those of `like`'s arrays, or given ones), which may be on
another mesh, another number of devices or another number of processes than the ones
that wrote them.

Nothing here is a file format of eqpar's own: a checkpoint is an ordinary orbax one
(a dict `{path: array}`), and the properties that matter come from orbax: every
process writes its own shards, saves run in the background, and a step becomes
visible only once every process has finished writing it (it is written under
`<step>.orbax-checkpoint-tmp` and renamed), so a run killed while saving resumes from
the previous checkpoint, never from a partial one.
"""

import os
import types
from collections.abc import Iterable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, Sharding
from jaxtyping import PyTree

from ._errors import Checked, CheckpointError, SpecError, warn
from ._runner import concrete_context_mesh
from ._specs import spread_prefix


def _orbax() -> Any:
    """`orbax.checkpoint`, imported on first use: it takes a noticeable part of a
    second to import, which programs that never checkpoint should not pay."""
    import orbax.checkpoint

    return orbax.checkpoint


# ----------------------------------------------------------------------------------
# Leaves


def _is_saved(x: Any) -> bool:
    """Whether a leaf of a tree to save is saved: what Equinox's serialisation saves
    (arrays, NumPy scalars, Python bool/int/float/complex)."""
    return eqx.is_array_like(x)


def _is_read(x: Any) -> bool:
    """Whether a leaf of `like` is read from the checkpoint (it may also be a
    `jax.ShapeDtypeStruct`, e.g. from `eqx.filter_eval_shape`)."""
    return isinstance(x, jax.ShapeDtypeStruct) or eqx.is_array_like(x)


def _name(path: tuple) -> str:
    return jtu.keystr(path) or "(root)"


def _is_key(dtype: Any) -> bool:
    return jnp.issubdtype(dtype, jax.dtypes.prng_key)


def _stored(x: Any) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype a leaf has on disk (a typed key is stored as its data)."""
    if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)):
        if _is_key(x.dtype):
            data = jax.eval_shape(
                jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype)
            )
            return tuple(data.shape), np.dtype(data.dtype)
        return tuple(x.shape), np.dtype(x.dtype)
    x = np.asarray(x)
    return x.shape, x.dtype


def _describe(shape: Iterable[int], dtype: Any) -> str:
    return f"{np.dtype(dtype).name}[{', '.join(str(d) for d in shape)}]"


def _storable(dtype: Any) -> bool:
    """Whether orbax (tensorstore) can store arrays of `dtype`: numbers and bools
    (bfloat16 and the other ML dtypes included); not strings, objects or dates."""
    return bool(jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.bool_))


# The kinds of NumPy dtype a Python number of `like` accepts: its own kind at any
# width, which it holds exactly (a Python float is a float64, a Python int is
# unbounded). A value of another kind (a saved `0.5` into `like`'s `0`) would be
# converted with a loss, so it is an error, as an array of another dtype is.
_PYTHON_KINDS = {bool: "b", int: "iu", float: "f", complex: "c"}


def _python_kind(x: Any) -> str | None:
    """The dtype kinds a Python-number leaf of `like` accepts (None: not one)."""
    for t in (bool, int, float, complex):  # bool first: it is an int too
        if isinstance(x, t):
            return _PYTHON_KINDS[t]
    return None


def _example_of_kind(dtype: np.dtype) -> str:
    return {"b": "False", "i": "0", "u": "0", "f": "0.0", "c": "0j"}.get(
        dtype.kind, "0"
    )


def _short_list(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ----------------------------------------------------------------------------------
# Where restored arrays go


def _is_spec_leaf(x: Any) -> bool:
    return x is None or isinstance(x, (P, Sharding))


def _spec_per_leaf(spec: Any, like: Any, leaves: list) -> list[Any]:
    """One spec leaf (`None`, a `PartitionSpec` or a `Sharding`) per leaf of `like`,
    from `spec`: one for every leaf, or a pytree prefix of `like`."""
    if _is_spec_leaf(spec):
        return [spec] * len(leaves)

    def not_a_prefix(spec_def: Any, e: Exception) -> SpecError:
        return SpecError(
            "CheckpointManager.restore: `spec` is not a pytree prefix of `like`. "
            f"`spec` has structure {spec_def}; give one spec for every leaf, or a "
            "tree that matches `like` down to where the specs start (e.g. "
            f"`{{'model': P(), 'key': P('data')}}` for a dict). (JAX said: {e})"
        )

    pairs = spread_prefix(spec, like, _is_spec_leaf, not_a_prefix)
    bad = [s for s, _ in pairs if not _is_spec_leaf(s)]
    if bad:
        raise SpecError(
            "CheckpointManager.restore: `spec` must be a PartitionSpec, a "
            "jax.sharding.Sharding, None, or a pytree prefix of `like` with those at "
            f"its leaves; found {bad[0]!r}."
        )
    out = []
    for s, sub in pairs:
        out.extend([s] * len(jtu.tree_leaves(sub)))
    assert len(out) == len(leaves)
    return out


def _target_sharding(x: Any, spec: Any, mesh: Mesh | None, name: str) -> Sharding:
    """Where the array leaf `x` of `like` is restored to."""
    if spec is None:
        spec = getattr(x, "sharding", None)
        if spec is None:  # a ShapeDtypeStruct without a sharding
            return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if isinstance(spec, P):
        if mesh is None:
            mesh = concrete_context_mesh(
                f"CheckpointManager.restore (placing the leaf at {name} by the "
                f"PartitionSpec {spec})"
            )
        try:
            spec = NamedSharding(mesh, spec)
        except (ValueError, TypeError) as e:
            raise SpecError(
                f"CheckpointManager.restore: the spec {spec} for the leaf at {name} "
                f"does not fit the mesh {dict(mesh.shape)}: {e}"
            ) from None
    assert isinstance(spec, Sharding)
    if isinstance(spec, NamedSharding) and len(spec.spec) > len(x.shape):
        # A scalar under a spec given for a whole tree (`spec=P("data")`) too: it
        # has no dimension to split, and replicating it instead would quietly
        # ignore the spec, so the leaf is named and the fix said.
        raise SpecError(
            f"CheckpointManager.restore: the spec {spec.spec} splits "
            f"{len(spec.spec)} dimension(s) of the leaf at {name}, which has shape "
            f"{tuple(x.shape)} (rank {len(x.shape)}). Give `spec` as a pytree "
            f"prefix of `like` with P() (replicated) for this leaf, e.g. "
            f"`{{'params': P('data'), 'step': P()}}`."
        )
    try:
        spec.shard_shape(tuple(x.shape))
    except (ValueError, TypeError) as e:
        raise SpecError(
            f"CheckpointManager.restore: the leaf at {name}, of shape "
            f"{tuple(x.shape)}, cannot be placed by {spec}: {e} Choose a spec whose "
            "mesh axes divide the dimensions they split, or P() to replicate it."
        ) from None
    return spec


def _from_disk(value: Any, like: Any) -> Any:
    """A restored value, in the kind of `like`'s leaf."""
    if isinstance(like, (jax.Array, jax.ShapeDtypeStruct)):
        return value
    value = np.asarray(value)
    if isinstance(like, np.ndarray):
        return value
    if isinstance(like, np.generic):
        return value[()]  # of like's dtype (checked)
    return type(like)(value.item())  # a Python number of the saved kind (checked)


def _check_folder(directory: str) -> None:
    """Raises `CheckpointError` when `directory` is, or would be created inside,
    something that is not a folder (orbax would fail later, in a background
    thread)."""
    path = directory
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent
    if not os.path.isdir(path):
        where = "is" if path == directory else f"would be inside {path}, which is"
        raise CheckpointError(
            f"CheckpointManager: the checkpoint directory {directory} {where} a file, "
            "not a folder. Pass the path of a folder (it is created if missing), "
            "e.g. one next to that file."
        )


def _describe_folder(folder: str) -> str:
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return "nothing readable"
    return "nothing" if not names else _short_list(names, 3)


# ----------------------------------------------------------------------------------
# The manager


class CheckpointManager:
    """Saves and restores sharded pytrees (a Module, an optax state, random keys,
    step counters...) in a directory of numbered checkpoints, from every process.

    A thin layer over `orbax.checkpoint.CheckpointManager` with
    `StandardCheckpointHandler`. Saving writes the array leaves of a pytree (what
    `eqx.tree_serialise_leaves` would write: arrays, NumPy scalars and Python
    numbers); restoring reads them into the structure of a `like` tree, which also
    provides every other leaf (static fields, functions) and, by default, where each
    array goes (its sharding). Typed random keys (`jax.random.key`) and optax states
    (NamedTuples, `optax.EmptyState`) are ordinary pytrees here.

    In a multi-process run (after `eqpar.initialize()`), create it, `save` and
    `restore` on **every** process, with the same arguments: each process writes and
    reads only its own shards, and orbax synchronises them. A checkpoint can be
    restored onto other shardings, another mesh, another number of devices or of
    processes.

    A step becomes visible (to `latest_step`, `all_steps`, `restore`) only once every
    process has finished writing it: a run killed while saving leaves an unfinished
    `<step>.orbax-checkpoint-tmp` folder, which is never restored and is removed by
    the next `CheckpointManager` on that directory. A folder named like a step that
    is not a checkpoint (e.g. an empty `5/` made by hand) is ignored with an
    `eqpar.EqparWarning` naming it; remove it (with `max_to_keep`, `save` refuses
    until then: orbax would count it among the checkpoints kept).

    **Arguments:**

    - `directory`: the folder of checkpoints (created if missing; a file there is
        an `eqpar.CheckpointError`); one sub-folder per step. It must be
        reachable by every process (a shared file system or a bucket orbax
        supports).
    - `max_to_keep`: keep only the latest this many checkpoints (default: all).
    - `async_save`: save in the background: `save` returns once the arrays are
        copied to host memory (so they may be changed or donated right after), and
        the writing overlaps with training. The next `save`, `restore`, `wait` and
        `close` wait for it to finish.

    Use it as a context manager, or call `close()`: it waits for the last save. (A
    process that ends without it loses a save still in progress, safely: an
    unfinished checkpoint is never restored.)

    !!! example

        ```python
        import tempfile

        import equinox as eqx
        import jax
        import optax

        import eqpar

        model = eqx.nn.MLP(2, 2, 8, 1, key=jax.random.key(0))
        optimiser = optax.adam(1e-3)
        state = optimiser.init(eqx.filter(model, eqx.is_array))
        train = {"model": model, "opt": state, "key": jax.random.key(1)}

        with eqpar.CheckpointManager(tempfile.mkdtemp(), max_to_keep=2) as ckpt:
            ckpt.save(100, train)
            assert ckpt.latest_step() == 100
            # `like`: same structure, any values; gives statics and shardings.
            fresh = eqx.nn.MLP(2, 2, 8, 1, key=jax.random.key(5))
            like = {
                "model": fresh,
                "opt": optimiser.init(eqx.filter(fresh, eqx.is_array)),
                "key": jax.random.key(0),
            }
            restored = ckpt.restore(like)
        assert (restored["model"].layers[0].weight == model.layers[0].weight).all()
        ```
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: Checked[int | None] = None,
        async_save: bool = True,
    ):
        if max_to_keep is not None and (
            not isinstance(max_to_keep, int)
            or isinstance(max_to_keep, bool)
            or max_to_keep < 1
        ):
            raise CheckpointError(
                f"`max_to_keep` must be a positive integer or None (keep all), got "
                f"{max_to_keep!r}."
            )
        self._directory = os.path.abspath(os.fspath(directory))
        _check_folder(self._directory)
        ocp = _orbax()
        self._manager = ocp.CheckpointManager(
            self._directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True,
                create=True,
            ),
            item_handlers=ocp.StandardCheckpointHandler(),
        )
        self._closed = False
        self._max_to_keep = max_to_keep
        self._finished: set[int] = set()  # steps seen to be whole checkpoints
        self._strays: set[int] = set()  # step-like folders warned about

    @property
    def directory(self) -> str:
        """The folder of checkpoints, as an absolute path."""
        return self._directory

    def _steps(self) -> list[int]:
        """The finished checkpoints, in increasing order: orbax's steps, less any
        folder that is only named like one (e.g. an empty `5/`), which orbax would
        list and then fail to read. Such a folder is skipped with a warning rather
        than refused: it need not stop a run from resuming from the checkpoints
        that are whole. Waits for a save in progress."""
        self._manager.wait_until_finished()
        steps = []
        for step in sorted(self._manager.all_steps()):
            if step not in self._finished:
                folder = os.path.join(self._directory, str(step))
                if not (
                    os.path.isdir(folder)
                    and _orbax().path.format_utils.is_orbax_checkpoint(folder)
                ):
                    if step not in self._strays:
                        self._strays.add(step)
                        warn(
                            f"CheckpointManager: {folder} is named like the "
                            f"checkpoint of step {step} but is not one (it holds "
                            f"{_describe_folder(folder)}); it is ignored. Remove it "
                            "(or move it out of the checkpoint directory)."
                        )
                    continue
                self._finished.add(step)
            steps.append(step)
        return steps

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise CheckpointError(
                f"CheckpointManager.{what}: this manager of {self._directory} is "
                "closed; create a new `eqpar.CheckpointManager` for it."
            )

    def save(self, step: Checked[int], tree: PyTree) -> None:
        """Saves the array leaves of `tree` as checkpoint number `step`.

        Every process must call it, with the same `step` and a tree of the same
        structure (its arrays may be sharded across the processes: each writes its
        own shards). The checkpoint becomes visible once it is completely written
        (with `async_save`, after `save` has returned: `wait()` waits for it).

        **Arguments:**

        - `step`: the checkpoint's number, larger than every step saved before in
            this directory (usually the training step).
        - `tree`: any pytree. Its array leaves (JAX and NumPy arrays, NumPy
            scalars, Python numbers and bools) are saved, with their paths; every
            other leaf is left out (restore gets it from `like`). Arrays hold
            numbers or bools: a NumPy array of strings, objects or dates is an
            `eqpar.CheckpointError` naming its leaf.
        """
        self._check_open("save")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise CheckpointError(
                f"CheckpointManager.save: `step` must be a non-negative integer, got "
                f"{step!r}."
            )
        leaves = jtu.tree_flatten_with_path(tree)[0]
        items = {}
        for path, leaf in leaves:
            if _is_saved(leaf):
                value = (
                    leaf
                    if isinstance(leaf, (jax.Array, np.ndarray))
                    else np.asarray(leaf)
                )
                if not (_storable(value.dtype) or _is_key(value.dtype)):
                    raise CheckpointError(
                        f"CheckpointManager.save: the leaf at {_name(path)} is an "
                        f"array of dtype {value.dtype} (shape {value.shape}), which a "
                        "checkpoint cannot store: only numbers and bools can. Keep "
                        "strings, objects and dates out of the saved tree (e.g. as "
                        "a Python string, which is not saved and comes back from "
                        "`like`), or encode them as numbers."
                    )
                items[_name(path)] = value
        if not items:
            raise CheckpointError(
                "CheckpointManager.save: the tree has no array leaves, so there is "
                "nothing to save. Save the arrays (e.g. a Module's parameters, an "
                "optimiser state) that training changes."
            )
        steps = self._steps()
        latest = steps[-1] if steps else None
        if self._strays and self._max_to_keep is not None:
            folders = [os.path.join(self._directory, str(s)) for s in self._strays]
            raise CheckpointError(
                f"CheckpointManager.save: {_short_list(sorted(folders))} in the "
                "checkpoint directory is named like a step but is not a checkpoint; "
                f"with max_to_keep={self._max_to_keep}, orbax would count it among "
                "the checkpoints kept and delete a real one in its place. Remove it "
                "(or move it out of the directory), then save."
            )
        if step in self._strays:
            raise CheckpointError(
                f"CheckpointManager.save: step {step} cannot be saved: "
                f"{os.path.join(self._directory, str(step))} already exists and is "
                "not a checkpoint. Remove that folder, or save another step."
            )
        if latest is not None and step <= latest:
            raise CheckpointError(
                f"CheckpointManager.save: step {step} is not after the latest "
                f"checkpoint in {self._directory}, which is step {latest}. Save "
                "larger steps; to continue a run, restore the latest checkpoint "
                "first (`restore(like)`); to start afresh, use a new directory."
            )
        self._manager.save(step, args=_orbax().args.StandardSave(items), force=True)

    def restore(
        self,
        like: PyTree,
        *,
        step: Checked[int | None] = None,
        spec: PyTree = None,
        mesh: Mesh | None = None,
    ) -> PyTree:
        """Reads a checkpoint into the structure of `like`.

        Every process of a multi-process run must call it, with the same arguments.

        **Arguments:**

        - `like`: a pytree of the structure that was saved (e.g. a freshly built
            Module and optimiser state: any values will do). Its non-array leaves
            are returned as they are. Each array leaf says what is read: a
            `jax.Array` or `jax.ShapeDtypeStruct` gives a `jax.Array` with its
            sharding (a `ShapeDtypeStruct` without one: this process's first
            device), a NumPy array gives a NumPy array, a NumPy scalar gives one of
            its type. Shapes and dtypes must be the saved ones: nothing is cast
            on the way in (cast after restoring). A Python number gives one of its
            type holding the saved value, so it must be of the saved kind (a
            `float` for any saved float, an `int` for any saved integer, a `bool`,
            a `complex`): a saved `0.5` restored with `like`'s `0` is an error,
            never a silent `0`.
        - `step`: which checkpoint (default: the latest).
        - `spec`: where the arrays go instead of `like`'s shardings: a
            `PartitionSpec` (on `mesh`) or a `jax.sharding.Sharding` for every array,
            or a pytree prefix of `like` with those (or `None`: keep `like`'s) at
            its leaves (one spec per leaf, or per subtree). A spec longer than a
            leaf's rank is an error naming the leaf, scalars included (give them
            `P()` in a prefix such as `{'params': P('data'), 'step': P()}`): a
            scalar is never silently replicated in place of the split asked for.
        - `mesh`: the mesh of `PartitionSpec`s in `spec` (default: the context
            mesh).

        **Returns:**

        A pytree like `like`, with the checkpoint's values.

        **Raises:**

        `eqpar.CheckpointError` when there is no (finished) checkpoint, or `like`
        does not have the saved leaves, shapes and dtypes.
        """
        self._check_open("restore")
        steps = self._steps()
        if step is None:
            step = steps[-1] if steps else None
            if step is None:
                raise CheckpointError(
                    f"CheckpointManager.restore: there is no checkpoint in "
                    f"{self._directory} (an unfinished one, left by a run that died "
                    "while saving, does not count). Check `latest_step()` first: it "
                    "is None when there is nothing to resume from."
                )
        elif step not in steps:
            raise CheckpointError(
                f"CheckpointManager.restore: there is no checkpoint of step {step!r} "
                f"in {self._directory}; the steps there are {steps}."
            )
        saved = self._saved_leaves(step)

        leaves, treedef = jtu.tree_flatten_with_path(like)
        specs = _spec_per_leaf(spec, like, leaves)
        wanted = {_name(path): leaf for path, leaf in leaves if _is_read(leaf)}
        missing = [n for n in wanted if n not in saved]
        extra = [n for n in saved if n not in wanted]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"`like` has leaves not in it: {_short_list(missing)}")
            if extra:
                parts.append(f"it has leaves `like` lacks: {_short_list(extra)}")
            raise CheckpointError(
                f"CheckpointManager.restore: `like` does not have the structure of "
                f"the checkpoint of step {step} in {self._directory}: "
                + "; ".join(parts)
                + ". Pass a `like` built the way the saved tree was (the same "
                "Module with the same sizes, the same optimiser, the same containers "
                "and keys); its values do not matter."
            )

        targets = {}
        for (path, leaf), s in zip(leaves, specs):
            if not _is_read(leaf):
                continue
            name = _name(path)
            shape, dtype = _stored(leaf)
            saved_shape, saved_dtype = saved[name]
            kinds = _python_kind(leaf)
            if kinds is not None and shape == saved_shape:
                if saved_dtype.kind not in kinds:
                    raise CheckpointError(
                        f"CheckpointManager.restore: the leaf at {name} was saved as "
                        f"{_describe(saved_shape, saved_dtype)} but `like` has the "
                        f"Python {type(leaf).__name__} {leaf!r} there, which would "
                        "not hold the saved value exactly. Put a Python number of "
                        f"the saved kind there (e.g. "
                        f"`{_example_of_kind(saved_dtype)}`), and convert after "
                        "restoring if you need another type."
                    )
            elif shape != saved_shape or dtype != saved_dtype:
                raise CheckpointError(
                    f"CheckpointManager.restore: the leaf at {name} was saved as "
                    f"{_describe(saved_shape, saved_dtype)} but `like` has "
                    f"{_describe(shape, dtype)} there (typed keys are stored as their "
                    "key data). Pass a `like` with the saved shapes and dtypes, and "
                    "cast after restoring if you need another dtype."
                )
            if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)):
                targets[name] = jax.ShapeDtypeStruct(
                    leaf.shape,
                    leaf.dtype,
                    sharding=_target_sharding(leaf, s, mesh, name),
                )
            else:  # read as NumPy, on every process
                targets[name] = np.empty(saved_shape, saved_dtype)

        values = self._manager.restore(
            step, args=_orbax().args.StandardRestore(targets)
        )
        out = [
            _from_disk(values[_name(path)], leaf) if _is_read(leaf) else leaf
            for path, leaf in leaves
        ]
        return jtu.tree_unflatten(treedef, out)

    def _saved_leaves(self, step: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """`{name: (shape, dtype)}` of the leaves stored at `step`."""
        metadata = self._manager.item_metadata(step)
        tree = getattr(metadata, "tree", metadata)
        if not isinstance(tree, dict):
            raise CheckpointError(
                f"The checkpoint of step {step} in {self._directory} was not written "
                "by `eqpar.CheckpointManager` (it is not a dict of arrays); read it "
                "with orbax directly."
            )
        out = {}
        for name, meta in tree.items():
            shape = getattr(meta, "shape", None)
            dtype = getattr(meta, "dtype", None)
            if shape is None or dtype is None:
                raise CheckpointError(
                    f"The checkpoint of step {step} in {self._directory} has a leaf "
                    f"{name!r} that is not an array; it was not written by "
                    "`eqpar.CheckpointManager`: read it with orbax directly."
                )
            out[name] = (tuple(shape), np.dtype(dtype))
        return out

    def latest_step(self) -> int | None:
        """The step of the latest finished checkpoint, or `None` if there is none
        (a fresh start). Waits for a save in progress."""
        self._check_open("latest_step")
        steps = self._steps()
        return steps[-1] if steps else None

    def all_steps(self) -> list[int]:
        """The steps of every finished checkpoint kept, in increasing order. Waits
        for a save in progress."""
        self._check_open("all_steps")
        return self._steps()

    def wait(self) -> None:
        """Waits until a save in progress is completely written (and visible)."""
        if not self._closed:
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for a save in progress and releases the manager's resources.
        Calling it again does nothing."""
        if not self._closed:
            self._closed = True
            self._manager.wait_until_finished()
            self._manager.close()

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: types.TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"eqpar.CheckpointManager({self._directory!r})"
