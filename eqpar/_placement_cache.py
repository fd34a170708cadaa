"""Placed copies of immutable arrays, so that unchanged inputs move to the devices once.

A compiled eqpar program that runs on a mesh (`filter_pmap`, `filter_shard_map`,
`Parallel`) wants its array inputs with given shardings. An input that is elsewhere
(a Module fresh from its constructor, kept on one device between evaluation calls)
must be copied there, and `jax.jit` / `jax.pmap` copy it again on every call. JAX
arrays are immutable, though: the copy of an unchanged array is still valid on the
next call. This module remembers it, keyed on the source array's identity and the
target sharding:

- held weakly: a copy dies with its source (a `weakref` callback drops it);
- never served for a source that was deleted or donated since (`is_deleted()` is
  checked on every hit), nor a copy that was itself deleted (donated);
- NumPy arrays are mutable, so they are never cached: they are copied afresh on
  every call;
- an input a program donates gets a copy of its own from a fresh buffer, never
  cached (`place(..., fresh=...)`): donating it never deletes the source;
- bounded by the bytes of the copies (summed over the devices they occupy), oldest
  first out; `placement_cache(max_bytes=0)` (or the environment variable
  `EQPAR_PLACEMENT_CACHE_BYTES=0`) turns it off;
- safe under threads: every change holds one re-entrant lock (re-entrant because a
  source's death, which drops its copies, can happen inside any allocation).

Before that, each program checks its inputs against its own last placement
(`Last`, `reuse`): inputs already where they passed last time, or the very arrays
it copied last time (then those copies, held weakly), skip the lookup.
"""

import math
import os
import sys
import threading
import weakref
from collections import OrderedDict
from collections.abc import Collection, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType

from ._specs import CONCRETE_TYPES, is_concrete_array


ENV_VAR = "EQPAR_PLACEMENT_CACHE_BYTES"
DEFAULT_MAX_BYTES = 1 << 30
"""Default bound: 1 GiB of copies, summed over the devices that hold them."""
MAX_COPIES = 1 << 16
"""Bound on the number of copies (zero-sized arrays weigh nothing)."""


def _initial_bound() -> int:
    value = os.environ.get(ENV_VAR)
    if value is None or not value.strip():
        return DEFAULT_MAX_BYTES
    try:
        bound = int(value)
    except ValueError:
        bound = -1
    if bound < 0:
        raise ValueError(
            f"{ENV_VAR}={value!r}: expected a number of bytes >= 0 (0 turns eqpar's "
            "placement cache off)."
        )
    return bound


class _Copy:
    """One placed copy of one source array for one target sharding."""

    __slots__ = ("key", "copy", "nbytes")

    def __init__(self, key: tuple[int, Any], copy: Any, nbytes: int):
        self.key = key
        self.copy = copy
        self.nbytes = nbytes


class _Source:
    __slots__ = ("ref", "copies")

    def __init__(self, ref: weakref.ref):
        self.ref = ref
        self.copies: dict[Any, _Copy] = {}


_sources: dict[int, _Source] = {}
_lru: "OrderedDict[tuple[int, Any], _Copy]" = OrderedDict()
_stats = {"bytes": 0, "hits": 0, "misses": 0, "max_bytes": _initial_bound()}
_lock = threading.RLock()


class PlacementCacheInfo(NamedTuple):
    """The state of eqpar's placement cache (see [`eqpar.placement_cache`][]).

    !!! example

        ```python
        import eqpar

        info = eqpar.placement_cache()  # reads, changes nothing
        assert isinstance(info, eqpar.PlacementCacheInfo)
        assert 0 <= info.bytes <= info.max_bytes or info.max_bytes == 0
        ```
    """

    max_bytes: int
    """The bound on the bytes of cached copies (0: the cache is off)."""
    bytes: int
    """Bytes held by cached copies now, summed over the devices holding them."""
    copies: int
    """Number of cached copies."""
    hits: int
    """Placements served from the cache since the process started (a program
    called again with the very arrays it copied last takes those copies without a
    lookup, which is not counted)."""
    misses: int
    """Placements made (and cached, if they fit) since the process started."""


def placement_cache(
    max_bytes: int | None = None, *, clear: bool = False
) -> PlacementCacheInfo:
    """Reads or sets the bound of eqpar's placement cache.

    When a compiled eqpar program that runs on a mesh (`filter_pmap`,
    `filter_shard_map`, `Parallel`) receives an array input that is not where the
    program wants it (e.g. a Module fresh from its constructor, on one device), the
    input is copied there. The copy is kept, keyed on the source array and the
    target sharding, so the next call with the same unchanged array reuses it
    instead of copying again. A copy is held only as long as its source array is
    alive and not deleted or donated; NumPy arrays (mutable) are never cached; the
    copies are bounded by bytes, oldest first out. Results never depend on the
    cache: it only saves transfers.

    **Arguments:**

    - `max_bytes`: the new bound on the bytes of cached copies, summed over the
        devices holding them (default 1 GiB, or the environment variable
        `EQPAR_PLACEMENT_CACHE_BYTES` at import). `0` turns the cache off and drops
        every copy. `None` (default) leaves the bound as it is.
    - `clear`: drop every cached copy now (the bound stays).

    **Returns:**

    A `PlacementCacheInfo(max_bytes, bytes, copies, hits, misses)` after the change.

    !!! example

        ```python
        import equinox as eqx, jax, jax.numpy as jnp, eqpar

        model = eqx.nn.Linear(4, 4, key=jax.random.key(0))  # on one device
        forward = eqpar.filter_pmap(lambda m, x: m(x), in_axes=(None, 0))
        x = jnp.ones((jax.device_count(), 4))
        forward(model, x)  # copies the weights to every device, once
        forward(model, x)  # reuses the copies
        assert eqpar.placement_cache().copies >= 2

        previous = eqpar.placement_cache().max_bytes
        eqpar.placement_cache(max_bytes=0)  # off: every call copies again
        assert eqpar.placement_cache().copies == 0
        eqpar.placement_cache(max_bytes=previous)
        ```
    """
    with _lock:
        return _configure(max_bytes, clear)


def _configure(max_bytes: int | None, clear: bool) -> PlacementCacheInfo:
    if max_bytes is not None:
        if (
            isinstance(max_bytes, bool)
            or not isinstance(max_bytes, (int, np.integer))
            or max_bytes < 0
        ):
            raise ValueError(
                f"placement_cache: `max_bytes` must be a number of bytes >= 0 (0 "
                f"turns the cache off), got {max_bytes!r}."
            )
        _stats["max_bytes"] = int(max_bytes)
        _evict()
    if clear:
        for copy in list(_lru.values()):
            _drop(copy)
    return PlacementCacheInfo(
        max_bytes=_stats["max_bytes"],
        bytes=_stats["bytes"],
        copies=len(_lru),
        hits=_stats["hits"],
        misses=_stats["misses"],
    )


def _nbytes(copy: Any) -> int:
    sharding = copy.sharding
    shard = sharding.shard_shape(copy.shape)
    return math.prod(shard) * copy.dtype.itemsize * len(sharding.device_set)


def _forget_source(
    key: int, ref: weakref.ref, finalizing: Any = sys.is_finalizing
) -> None:
    """The source died: its copies go (at interpreter exit, nothing to do)."""
    if finalizing():
        return
    with _lock:
        source = _sources.get(key)
        if source is None or source.ref is not ref:
            return
        for copy in list(source.copies.values()):
            _drop(copy)
        _sources.pop(key, None)


def _drop(copy: _Copy) -> None:
    if _lru.pop(copy.key, None) is None:
        return
    _stats["bytes"] -= copy.nbytes
    source_id, target = copy.key
    source = _sources.get(source_id)
    if source is not None and source.copies.get(target) is copy:
        source.copies.pop(target, None)
        if not source.copies:
            _sources.pop(source_id, None)


def _evict() -> None:
    limit = _stats["max_bytes"]
    while _lru and (_stats["bytes"] > limit or len(_lru) > MAX_COPIES):
        _drop(next(iter(_lru.values())))


def _lookup(x: Any, target: Any) -> Any:
    """The cached copy of `x` placed on `target`, if there is a live one."""
    with _lock:
        if _stats["max_bytes"] == 0:
            return None
        source = _sources.get(id(x))
        if source is None or source.ref() is not x:
            return None
        copy = source.copies.get(target)
        if copy is None:
            return None
        if copy.copy.is_deleted():
            _drop(copy)
            return None
        _lru.move_to_end(copy.key)
        _stats["hits"] += 1
        return copy.copy


def _insert(x: Any, target: Any, placed: Any) -> None:
    with _lock:
        _stats["misses"] += 1
        _remember(x, target, placed)


def _remember(x: Any, target: Any, placed: Any) -> None:
    nbytes = _nbytes(placed)
    if nbytes > _stats["max_bytes"]:
        return
    key = id(x)
    source = _sources.get(key)
    if source is None or source.ref() is not x:
        if source is not None:  # an id reused by a new array: the old one is dead
            for old in list(source.copies.values()):
                _drop(old)
        source = _Source(
            weakref.ref(x, lambda ref, key=key, forget=_forget_source: forget(key, ref))
        )
        _sources[key] = source
    copy = _Copy((key, target), placed, nbytes)
    previous = source.copies.get(target)
    if previous is not None:
        _drop(previous)
        _sources[key] = source
    source.copies[target] = copy
    _lru[copy.key] = copy
    _stats["bytes"] += nbytes
    _evict()


_equivalent_memo: dict[tuple[Any, Any, int], bool] = {}


def _typed_elsewhere(sharding: Any, target: Any) -> bool:
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or AxisType.Explicit not in mesh.axis_types:
        return False
    other = getattr(target, "mesh", None)
    return other is None or other.abstract_mesh != mesh.abstract_mesh


def equivalent(sharding: Any, target: Any, ndim: int) -> bool:
    """Whether an array with `sharding` is already where `target` puts it (e.g.
    `P(None, None)` and `P()`): the compiled program takes it as it is. An array
    typed on another mesh's Explicit axes is not (its type would not match the
    program's), even on the same devices."""
    if sharding == target:
        return True
    key = (sharding, target, ndim)
    try:
        return _equivalent_memo[key]
    except KeyError:
        pass
    answer = sharding.is_equivalent_to(target, ndim) and not _typed_elsewhere(
        sharding, target
    )
    if len(_equivalent_memo) >= 1024:
        _equivalent_memo.clear()
    _equivalent_memo[key] = answer
    return answer


class Last(NamedTuple):
    """A program's last placement, for the quick check of its next call: per
    position the sharding an input may have to pass as it is, and, where an input
    was copied, that source and its copy, both held weakly (nothing here keeps an
    array alive; the cache below holds the copy as long as its source lives)."""

    targets: tuple[Any, ...]
    """Per position, the sharding the input passed with (the target itself, or the
    input's own sharding, found equal or equivalent to it: the next call's array,
    usually with that very sharding object, is then checked by identity)."""
    copies: "tuple[tuple[weakref.ref, weakref.ref] | None, ...] | None"
    """Per position, `(source, copy)` where the input was copied; `None`: nothing
    was copied."""


def last(arrays: Sequence[Any], placed: Sequence[Any], targets: Sequence[Any]) -> Last:
    """What `reuse` checks the next call against, after `arrays` were placed as
    `placed` (on `targets`). Only `jax.Array` sources are remembered (immutable:
    a NumPy array can change under the same object, so it is copied afresh every
    call)."""
    copies = tuple(
        (weakref.ref(x), weakref.ref(y))
        if y is not x and is_concrete_array(x) and is_concrete_array(y)
        else None
        for x, y in zip(arrays, placed)
    )
    passed = tuple(
        x.sharding if y is x and t is not None and is_concrete_array(x) else t
        for x, y, t in zip(arrays, placed, targets)
    )
    return Last(passed, copies if any(copies) else None)


def reuse(arrays: Sequence[Any], last: Last) -> Sequence[Any] | None:
    """The quick check before a call: `arrays` as the program takes them, if each is
    a live concrete array either already where `last.targets` puts it (a `None`
    target: anywhere) or the very source `last` copied, whose copy is still alive
    and not deleted (then the copy). `None`: `place` has to look."""
    copies = last.copies
    if copies is None:
        return arrays if _in_place(arrays, last.targets) else None
    out = list(arrays)
    for i, (x, target, copied) in enumerate(zip(arrays, last.targets, copies)):
        if type(x) not in CONCRETE_TYPES and not is_concrete_array(x):
            return None
        if x.is_deleted():
            return None
        if copied is not None and copied[0]() is x:
            copy = copied[1]()
            if copy is None or copy.is_deleted():
                return None
            out[i] = copy
        elif target is not None:
            sharding = x.sharding
            if sharding is not target and sharding != target:
                return None
    return out


def _in_place(arrays: Sequence[Any], targets: Sequence[Any]) -> bool:
    """Whether every array is a live (not deleted) concrete array with exactly its
    target sharding (a `None` target: anywhere)."""
    for x, target in zip(arrays, targets):
        if type(x) not in CONCRETE_TYPES and not is_concrete_array(x):
            return False
        if x.is_deleted():
            return False
        if target is not None:
            sharding = x.sharding
            if sharding is not target and sharding != target:
                return False
    return True


def _gathers(sharding: Any, target: Any, shape: tuple[int, ...]) -> bool:
    """Whether moving from `sharding` to `target` puts more of the array on each
    device (an all-gather), rather than less (a slice) or as much."""
    return math.prod(target.shard_shape(shape)) > math.prod(sharding.shard_shape(shape))


class Placed(NamedTuple):
    """What `place` did."""

    arrays: tuple[Any, ...]
    """The arrays, each where its target puts it."""
    moved: bool
    """Whether any array is not the one given (a copy, placed now or cached)."""
    relaid: list[int]
    """The arrays that were already spread over several devices and had to be
    gathered now (each device holds more of them than before): a deliberate
    placement the program overrides at a cost."""


def place(
    arrays: Sequence[Any], targets: Sequence[Any], fresh: Collection[int] = ()
) -> Placed:
    """`arrays` with each array moved to its target sharding (`None`: left alone).

    Arrays already there are passed as they are, and so are tracers (inside an
    outer trace JAX places them) and deleted arrays (JAX then raises its own
    error). Copies of `jax.Array` sources are looked up in the cache and
    remembered; NumPy sources are always copied afresh. The positions in `fresh`
    (inputs a program donates) get a copy of their own: never from the cache nor
    remembered in it, and sharing no buffer with the source (`device_put` would
    otherwise reuse the source's buffer on its own device, and donating the copy
    would delete the source).
    """
    out = list(arrays)
    todo: list[int] = []
    relaid: list[int] = []
    hits = False
    for i, (x, target) in enumerate(zip(arrays, targets)):
        if target is None:
            continue
        if is_concrete_array(x):
            sharding = x.sharding
            if x.is_deleted() or equivalent(sharding, target, x.ndim):
                continue
            hit = None if i in fresh else _lookup(x, target)
            if hit is not None:
                out[i], hits = hit, True
                continue
            todo.append(i)
            if len(sharding.device_set) > 1 and _gathers(sharding, target, x.shape):
                relaid.append(i)
        elif isinstance(x, (np.ndarray, np.generic)):
            todo.append(i)
    if todo:
        # `device_put` reuses the source's buffer on the source's own device (even
        # with `may_alias=False`, jax 0.10): a copy that will be donated is made
        # from a fresh buffer, so that donating it never deletes the source.
        moved = jax.device_put(
            [
                jnp.copy(arrays[i])
                if i in fresh and is_concrete_array(arrays[i])
                else arrays[i]
                for i in todo
            ],
            [targets[i] for i in todo],
        )
        for i, placed in zip(todo, moved):
            out[i] = placed
            # Under an outer trace `device_put` of a concrete array is staged and
            # gives a tracer: that is no copy to remember.
            if (
                i not in fresh
                and is_concrete_array(arrays[i])
                and is_concrete_array(placed)
            ):
                _insert(arrays[i], targets[i], placed)
    return Placed(tuple(out), hits or bool(todo), relaid)
