"""Compile once per call signature, for every wrapper, at the cost of raw `jax.jit`.

The other half of eqpar's one mechanism. Every eqpar transform is a `Transformed`
module holding the user's function and a *caller*: for the compiling transforms a
`Compiled` dispatcher, shared (through `shared`) by every wrapper built with the same
transform and options, so `eqpar.filter_jit(step)(model, x)` written inline in a loop
compiles once, like `jax.jit` and `eqx.filter_jit`. A call:

1. flattens `(fun, args, kwargs)` once and looks the tree structure and the
   leaves' types up in a dict: a *plan* that says which leaves are arrays (and
   which are plain Python functions: those are keyed by identity and held weakly,
   so a cache never keeps a function, or what it closes over, alive);
2. picks the arrays and the static leaves out with the plan, and looks the static
   values (plus a backend context, such as the mesh) up in the plan's dict: a hit
   gives a `jax.jit` of a body that takes only the arrays;
3. calls it with the tuple of arrays and rebuilds the output from the arrays it
   returns and the non-array output leaves recorded when the body was traced.

Spec resolution, error checks and the backend transform (`jax.vmap`, `jax.shard_map`)
all happen inside the body, i.e. once per trace, never on the hot path. `jax.jit`'s
own cache then keys on shapes and dtypes. Every cache here is bounded (oldest entry
dropped first), and static leaves must be hashable, as for `jax.jit` and
`equinox.filter_jit` (a Module's static fields need not be: unhashable tree
structures are compared by value).

Two shortcuts make the paths users actually take cost no more than raw JAX:

- *Flatten once per Module.* A Module object passed again (an evaluation loop, a
  fixed model, a frozen encoder) is not flattened again: from its second call on, a
  `_Record` (held weakly, it dies with the Module) keeps its array leaves (the same
  objects, so a mutated NumPy leaf is seen) and a token standing for its tree
  structure, leaf types and static values. A call whose arguments are all such
  Modules or arrays is then looked up by tokens (`Compiled._fast`), skipping the
  flatten and the plan. Only Modules whose every node is immutable (Modules, tuples,
  None) are recorded; one holding a list or a dict is flattened on every call.
- *Place once.* A backend that runs on a mesh reports the shardings its inputs
  should have; inputs elsewhere are moved there before the call (never by a failed
  call first), and the copies of unchanged `jax.Array`s are kept by
  `_placement_cache` (weakly, bounded by bytes). A recorded Module keeps a *view*
  per compiled program: its arrays as placed, checked on each call only for
  deleted (donated) sources.
"""

import inspect
import itertools
import operator
import types
import warnings
import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Literal

import equinox as eqx
import jax
import jax.core
import jax.tree_util as jtu
import numpy as np

from . import _placement_cache
from ._errors import SpecError
from ._placement_cache import ArrayImpl
from ._specs import DYNAMIC, is_array, leaf_names, merge_leaves, split_leaves


# A backend's run: traced once per signature and shapes. Returns the output pytree
# and, when it knows them, the shardings its array inputs should have (used to place
# inputs that `jax.jit` refuses as they are).
Run = Callable[[Any, tuple, dict, Any], tuple[Any, list[Any] | None]]

Donate = Literal["all", "all-except-first", "warn", "warn-except-first", "none"]
_DONATE_VALUES = ("all", "all-except-first", "warn", "warn-except-first", "none")

# Bounds: call signatures per tree structure, tree structures per function, and
# wrappers' option sets. A long-running program that keeps making new signatures
# recompiles the oldest ones again instead of growing without bound.
MAX_ENTRIES = 256
MAX_PLANS = 256
MAX_SHARED = 256
MAX_SLOW_PLANS = 64
# Flatten-once and placement bookkeeping: recorded Modules, interned Module tokens,
# fast-path keys per transform, views per recorded Module, target shardings per
# fast key.
MAX_RECORDS = 1024
MAX_TOKENS = 1024
MAX_FAST = 1024
MAX_VIEWS = 16
MAX_FAST_TARGETS = 64
# A placing program checks its inputs' shardings on every call while it has lately
# needed to place some (and for its first `SETTLE` calls), then once every
# `CHECK_EVERY` calls: an input left unplaced in between is still correct (`jax.jit`
# moves it), only slower, until the next check.
SETTLE = 8
CHECK_EVERY = 64

_flatten = jtu.tree_flatten


def _avals(arrays: Sequence[Any]) -> tuple:
    return tuple((x.shape, x.dtype) for x in arrays)


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:
        return False


def _bounded_put(table: dict, key: Any, value: Any, limit: int) -> None:
    if len(table) >= limit:
        del table[next(iter(table))]
    table[key] = value


def check_donate(donate: Any) -> Donate:
    if not isinstance(donate, str) or donate not in _DONATE_VALUES:
        raise SpecError(
            f"`donate` must be one of {', '.join(map(repr, _DONATE_VALUES))} (as "
            f"in `equinox.filter_jit`), got {donate!r}."
        )
    return donate  # type: ignore[return-value]


class _Entry:
    """One call signature: its compiled function and what its traces recorded."""

    __slots__ = (
        "call",
        "jitted",
        "out",
        "by_avals",
        "first_avals",
        "placements",
        "donating",
        "refs",
        "serial",
        "dead",
        "checking",
        "flagged",
        "countdown",
        "clean",
        "tried",
        "aot",
        "outputs",
    )

    def __init__(self) -> None:
        self.call: Callable[[tuple[Any, ...]], list[Any]] = _unset
        self.jitted: Any = None
        self.donating = False
        self.serial = next(_SERIALS)
        self.dead = False  # a function it was compiled for died (see `_new_entry`)
        # Placement state (see `prepare`): `checking` until a trace shows that the
        # backend reports no shardings; `flagged` while inputs lately needed placing.
        self.checking = True
        self.flagged = True
        self.countdown = CHECK_EVERY
        self.clean = 0
        self.tried: set[tuple] = set()
        # Placing programs: one executable per input shapes, compiled from the
        # first trace (see `targets`).
        self.aot: dict[tuple, Any] = {}
        self.out: tuple[Any, tuple, bool] | None = None
        self.first_avals: tuple | None = None
        # Non-array outputs that differ between traces (they depend on shapes) are
        # looked up by input shapes instead. Rare; costs only those who need it.
        self.by_avals: dict[tuple, tuple[Any, tuple, bool]] | None = None
        self.placements: dict[tuple, list[Any]] = {}
        self.refs: list[Any] = []  # weak references whose death drops this entry
        # The Modules among the outputs (see `_output_modules`), recorded as they
        # are built: a model fed back as the next call's input is not flattened.
        self.outputs: list[tuple] | None = None

    def record(
        self, treedef: Any, signature: list[Any], arrays: Sequence[Any], shardings: Any
    ) -> None:
        avals = _avals(arrays)
        if shardings is not None and len(shardings) == len(arrays):
            self.placements[avals] = list(shardings)
        all_dynamic = all(s is DYNAMIC for s in signature)
        out = (treedef, tuple(signature), all_dynamic)
        if self.by_avals is not None:
            self.by_avals[avals] = out
        elif self.out is None:
            self.out, self.first_avals = out, avals
        elif not _same(self.out[:2], out[:2]):
            assert self.first_avals is not None
            self.by_avals = {self.first_avals: self.out, avals: out}

    def __call__(self, arrays: tuple[Any, ...]) -> Any:
        if self.donating:
            return self._donating(arrays)
        if self.checking:
            arrays = self.prepare(arrays)
        try:
            out_arrays = self.call(arrays)
        except Exception:
            recovered = self.recover(arrays)
            if recovered is None:
                raise
            arrays, out_arrays = recovered
        return self.rebuild(out_arrays, arrays)

    def recover(self, arrays: tuple[Any, ...]) -> tuple[tuple, list[Any]] | None:
        """After a failed call: the call again with what it lacked (inputs placed,
        the executable for these shapes, or `jax.jit` itself under an outer trace),
        or `None` when none of that was the cause."""
        if any(isinstance(x, jax.core.Tracer) for x in arrays):
            if self.call is self.jitted:
                return None
            return arrays, self.jitted(arrays)
        if self.checking:
            self.targets(arrays)  # new shapes: trace and compile for them
        avals = _avals(arrays)
        exe = self.aot.get(avals)
        placed = self.place(arrays)
        if exe is not None:
            self.call = exe
            try:
                return placed or arrays, exe(placed or arrays)
            except Exception:
                pass  # `jax.jit` decides: it retraces, or raises the real error
        elif placed is None:
            return None
        return placed or arrays, self.jitted(placed or arrays)

    def prepare(self, arrays: tuple[Any, ...]) -> tuple[Any, ...]:
        """`arrays` placed where the program wants them, through the placement
        cache, before the call (instead of after a failed one; `jax.jit` would
        also move uncommitted inputs silently, but again on every call)."""
        if not self.flagged:
            self.countdown -= 1
            if self.countdown > 0:
                return arrays
            self.countdown = CHECK_EVERY
        targets = self.targets(arrays)
        if targets is None:
            return arrays
        placed, _, moved = _placement_cache.place(arrays, targets, cache=True)
        if moved:
            self.flagged, self.clean = True, 0
        else:
            self.clean += 1
            if self.clean >= SETTLE:
                self.flagged = False
        return placed

    def targets(self, arrays: Sequence[Any]) -> list[Any] | None:
        """The shardings the program wants for `arrays`, learnt by tracing first
        when these shapes are new (so that the first call is already placed, and
        compiles once), or `None` when the backend does not say."""
        avals = _avals(arrays)
        targets = self.placements.get(avals)
        if targets is not None or avals in self.tried:
            return targets
        if any(isinstance(x, jax.core.Tracer) for x in arrays):
            return None
        if len(self.tried) >= MAX_ENTRIES:
            self.tried.clear()
            self.aot.clear()
        self.tried.add(avals)
        traced = self.jitted.trace(arrays)  # runs the body: records the shardings
        targets = self.placements.get(avals)
        if targets is None:
            if not self.placements:
                self.checking = False  # this backend places nothing (filter_jit)
            return None
        # Compiled from this trace, not by calling `jax.jit` with the placed inputs:
        # jit's trace cache keys on where the inputs are, so that call would trace
        # the function a second time. The executable takes inputs placed anywhere
        # equivalent to the targets (and moves uncommitted ones itself).
        try:
            exe = traced.lower().compile()
        except Exception:  # e.g. inputs committed to other devices: placed first
            return targets
        self.aot[avals] = exe
        self.call = exe
        return targets

    def _donating(self, arrays: tuple[Any, ...]) -> Any:
        """A donating call places inputs itself, so that it can say when what it
        donated was a copy (JAX would copy silently)."""
        if self.placements.get(_avals(arrays)) is not None:
            placed = self.place(arrays)
            if placed is not None:
                arrays = placed
            return self.rebuild(self.call(arrays), arrays)
        try:  # first call with these shapes: the shardings are learnt by tracing
            out_arrays = self.call(arrays)
        except Exception:
            placed = self.place(arrays)
            if placed is None:
                raise
            arrays = placed
            out_arrays = self.call(arrays)
        else:
            if self.misplaced(arrays):
                _warn_donated_copy()
        return self.rebuild(out_arrays, arrays)

    def misplaced(self, arrays: tuple[Any, ...]) -> bool:
        """Whether a donated input is a concrete array not where the program runs."""
        shardings = self.placements.get(_avals(arrays))
        if shardings is None:
            return False
        donated = self.call.donated_idx  # type: ignore[attr-defined]
        return any(
            isinstance(arrays[i], jax.Array)
            and not isinstance(arrays[i], jax.core.Tracer)
            and not arrays[i].sharding.is_equivalent_to(shardings[i], arrays[i].ndim)
            for i in donated
        )

    def rebuild(self, out_arrays: list[Any], in_arrays: Sequence[Any]) -> Any:
        if self.by_avals is None:
            out = self.out
        else:  # outputs that depend on shapes: not recorded
            out, self.outputs = self.by_avals[_avals(in_arrays)], []
        assert out is not None
        treedef, signature, all_dynamic = out
        # `treedef.unflatten`: `jtu.tree_unflatten` without its Python frame.
        if all_dynamic:
            result = treedef.unflatten(out_arrays)
        else:
            result = treedef.unflatten(merge_leaves(signature, out_arrays))
        outputs = self.outputs
        if outputs is None:
            outputs = self.outputs = _output_modules(result, out_arrays)
            if outputs is None:
                return result
        for pos, start, stop, token in outputs:
            if type(out_arrays[start]) is ArrayImpl:  # not under an outer trace
                rec = _new_record(result if pos is None else result[pos])
                rec.token, rec.arrays = token, tuple(out_arrays[start:stop])
        return result

    def place(self, arrays: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """Inputs moved to where the compiled program wants them, or `None` when
        they already are there (so a failure had another cause)."""
        shardings = self.placements.get(_avals(arrays))
        if shardings is None:
            return None
        if any(isinstance(x, jax.core.Tracer) for x in arrays):
            return None
        if all(
            isinstance(x, jax.Array) and x.sharding == s
            for x, s in zip(arrays, shardings)
        ):
            return None
        if self.donating:
            if self.misplaced(arrays):
                _warn_donated_copy()
            return tuple(jax.device_put(list(arrays), shardings))
        self.flagged, self.clean = True, 0
        placed, _, moved = _placement_cache.place(arrays, shardings, cache=True)
        return placed if moved else None


_SERIALS = itertools.count()


def _warn_donated_copy() -> None:
    warnings.warn(
        "eqpar: an input to donate was not on the devices the compiled program "
        "runs on, so it was copied there first and the copy was donated; the "
        "original array is still alive and its memory was not reused. Place the "
        "inputs first (`eqpar.filter_device_put`, `eqpar.replicate`, or the "
        "outputs of the previous step) to donate them.",
        UserWarning,
        stacklevel=5,
    )


def _unset(_: tuple[Any, ...]) -> list[Any]:
    raise AssertionError("unreachable: entry used before it was compiled")


class _Plan:
    """One tree structure with one leaf type per position: which leaves are arrays
    is then fixed (array-ness is a property of the type), so picking the arrays and
    the static leaves out of a call is two `itemgetter`s, with no Python loop over
    the leaves. Under it, one `_Entry` per (context, static values)."""

    __slots__ = (
        "array_idx",
        "arrays",
        "statics",
        "entries",
        "functions",
        "function_idx",
    )

    def __init__(self, leaves: list[Any]):
        self.array_idx = [i for i, leaf in enumerate(leaves) if is_array(leaf)]
        arrays = set(self.array_idx)
        static_idx = [i for i in range(len(leaves)) if i not in arrays]
        self.arrays = _getter(self.array_idx)
        self.statics = _getter(static_idx)
        self.entries: dict[Hashable, _Entry] = {}
        # Plain Python functions among the static leaves (the wrapped function, a
        # function inside a wrapper or a Module): keyed by identity, held weakly.
        self.function_idx = [
            i for i in static_idx if type(leaves[i]) is types.FunctionType
        ]
        functions = set(self.function_idx)
        self.functions = [n for n, i in enumerate(static_idx) if i in functions]

    def signature(self, leaves: list[Any]) -> list[Any]:
        signature = list(leaves)
        for i in self.array_idx:
            signature[i] = DYNAMIC
        return signature


def _getter(idx: list[int]) -> Callable[[Sequence[Any]], tuple]:
    """`leaves -> tuple(leaves[i] for i in idx)`, at C speed."""
    if len(idx) >= 2:
        return operator.itemgetter(*idx)
    if len(idx) == 1:
        (i,) = idx
        return lambda leaves: (leaves[i],)
    return lambda leaves: ()


class _Weak:
    """Stands in for a plain Python function among a signature's static leaves: the
    compiled program refers to it weakly, so that a cache never keeps a function
    (and what it closes over) alive."""

    __slots__ = ("ref",)

    def __init__(self, ref: "weakref.ref[Any]"):
        self.ref = ref


# ----------------------------------------------------------------------------------
# Flatten once per Module, place once per array


class _Token:
    """Stands for one (tree structure, leaf types, static values) of a recorded
    Module: equal Modules share one, so a fresh Module of the same structure finds
    the compiled program through the fast path too. Hashed by identity."""

    __slots__ = ()


class _View:
    """A recorded Module's arrays as one compiled program wants them placed."""

    __slots__ = ("arrays", "sources", "copies")

    def __init__(self, arrays: tuple[Any, ...], sources: tuple[Any, ...], copies: bool):
        self.arrays = arrays
        self.copies = copies  # whether any of `arrays` is a placed copy
        # The source arrays whose cached copies this view holds: checked on every
        # use, so that a source deleted or donated since is never stood in for.
        self.sources = sources


class _Record:
    """A Module object passed to a compiled call: from the second call on, its
    flattening (array leaves and token), reused while it lives. Eqx Modules are
    frozen, and only Modules whose nodes are all immutable are recorded, so the same
    object always flattens to the same leaves."""

    __slots__ = ("ref", "token", "arrays", "views", "serial", "__weakref__")

    def __init__(self, ref: "weakref.ref[Any]"):
        self.ref = ref
        self.token: _Token | None | Literal[False] = None  # False: not recordable
        self.arrays: tuple[Any, ...] = ()
        self.views: dict[Hashable, _View] = {}
        self.serial = next(_SERIALS)

    def fill(self, obj: Any) -> None:
        self.token = False
        found = _token(obj)
        if found is not None:
            self.token, self.arrays = found

    def view(self, key: Hashable, targets: Sequence[Any]) -> _View:
        placed, used, moved = _placement_cache.place(self.arrays, targets, cache=True)
        copies = sum(a is not b for a, b in zip(placed, self.arrays))
        view = _View(placed, tuple(source for source, _ in used), copies > 0)
        if copies == len(used):  # every copy is in the cache: the view may stay
            if len(self.views) >= MAX_VIEWS:
                del self.views[next(iter(self.views))]
            self.views[key] = view
            me = weakref.ref(self)
            for _, copy in used:
                copy.views.append((me, key))
        return view


def _token(obj: Any) -> tuple[_Token, tuple[Any, ...]] | None:
    """The token of a Module and its array leaves, or `None` when it cannot be
    recorded (a mutable node, a tracer, an unhashable static value)."""
    leaves, treedef = _flatten(obj)
    if not _immutable(treedef):
        return None
    arrays, statics = [], []
    for leaf in leaves:
        if is_array(leaf):
            if isinstance(leaf, jax.core.Tracer):
                return None  # inside a trace: nothing worth keeping
            arrays.append(leaf)
        else:  # functions by identity and not held, as in `Compiled._lookup`
            statics.append(id(leaf) if type(leaf) is types.FunctionType else leaf)
    key = (treedef, tuple(map(type, leaves)), tuple(statics))
    try:
        token = _TOKENS.get(key)
    except TypeError:  # an unhashable static value: the general path decides
        return None
    if token is None:
        token = _Token()
        _bounded_put(_TOKENS, key, token, MAX_TOKENS)
    return token, tuple(arrays)


_RECORDS: dict[int, _Record] = {}
_TOKENS: dict[Hashable, _Token] = {}
_is_deleted = ArrayImpl.is_deleted


def _immutable(treedef: Any) -> bool:
    """Whether every node of `treedef` is immutable: Modules (frozen), tuples and
    named tuples, None. A list or a dict could change under a recorded Module."""
    data = treedef.node_data()
    if data is None:
        return True
    kind = data[0]
    if not (
        kind is tuple or kind is type(None) or issubclass(kind, (tuple, eqx.Module))
    ):
        return False
    return all(_immutable(child) for child in treedef.children())


def _note(obj: Any) -> None:
    """Notes a Module passed to a compiled call; records it when it comes back."""
    key = id(obj)
    rec = _RECORDS.get(key)
    if rec is not None and rec.ref() is obj:
        if rec.token is None:
            rec.fill(obj)
        return

    _new_record(obj)


def _new_record(obj: Any) -> _Record:
    """A `_Record` of `obj`, registered until `obj` dies (or is evicted)."""
    key = id(obj)

    def forget(ref: Any) -> None:
        if _RECORDS.get(key) is rec:
            del _RECORDS[key]

    rec = _Record(weakref.ref(obj, forget))
    if len(_RECORDS) >= MAX_RECORDS:
        del _RECORDS[next(iter(_RECORDS))]
    _RECORDS[key] = rec
    return rec


def _output_modules(out: Any, out_arrays: list[Any]) -> list[tuple] | None:
    """Where the Modules among a call's outputs are (the output itself, or an
    element of an output tuple or list), as `(position, start, stop, token)`: their
    arrays are `out_arrays[start:stop]`. `None` while the outputs are not concrete
    arrays (under an outer trace), to look again on the next call."""
    if any(type(a) is not ArrayImpl for a in out_arrays):
        return None
    if isinstance(out, eqx.Module):
        candidates: list[tuple[int | None, Any]] = [(None, out)]
    elif type(out) in (tuple, list):
        candidates = list(enumerate(out))
    else:
        return []
    found, start = [], 0
    for pos, value in candidates:
        count = sum(map(is_array, jtu.tree_leaves(value)))
        if count and isinstance(value, eqx.Module):
            token = _token(value)
            if token is not None:
                found.append((pos, start, start + count, token[0]))
        start += count
    return found


_FunctionType = types.FunctionType
_MethodType = types.MethodType


class _Probe(eqx.Module):
    def method(self) -> None:
        pass


_BoundMethod = type(_Probe().method)  # Equinox's own bound method, a Module
_METHOD = object()  # fast-key markers: a bound method, an Equinox BoundMethod
_BOUND = object()


def _owner(fun: Any) -> Any:
    """The Module a compiled function's leaves come from, if any."""
    t = type(fun)
    if t is _MethodType:
        return fun.__self__
    if t is _BoundMethod:
        return _get(fun, "__self__")
    return fun


def _fast_key(
    fun: Any, args: tuple, context_fn: Callable[[], Hashable] | None
) -> tuple[tuple, list[Any]] | None:
    """The fast-path key of a call whose function and arguments are all plain
    functions, recorded Modules or arrays, and its parts (a `_Record` or an array
    per position), or `None`."""
    records = _RECORDS
    t = type(fun)
    parts: list[Any] = []
    if t is _FunctionType:
        key: list[Any] = [id(fun)]
    else:
        if t is _MethodType:
            owner = fun.__self__
            key = [id(fun.__func__), _METHOD]
        elif t is _BoundMethod:
            owner = _get(fun, "__self__")
            key = [id(_get(fun, "__func__")), _BOUND]
        else:
            owner, key = fun, []
        rec = records.get(id(owner))
        if rec is None or not rec.token or rec.ref() is not owner:
            return None
        key.append(rec.token)
        parts.append(rec)
    for a in args:
        t = type(a)
        if t is ArrayImpl or t is np.ndarray:
            key.append(t)
            parts.append(a)
            continue
        rec = records.get(id(a))
        if rec is None or not rec.token or rec.ref() is not a:
            return None
        key.append(rec.token)
        parts.append(rec)
    if context_fn is not None:
        key.append(context_fn())
    return tuple(key), parts


def _note_call(fun: Any, args: tuple) -> None:
    owner = _owner(fun)
    if type(owner) is not _FunctionType and isinstance(owner, eqx.Module):
        _note(owner)
    for a in args:
        if type(a) is not ArrayImpl and isinstance(a, eqx.Module):
            _note(a)


class _Fast:
    """A fast-path hit: the compiled entry for a call by tokens, and where each
    part's arrays go.

    For a program that runs on a mesh, a call goes through `placed` (views of the
    recorded Modules, the placement cache for array arguments) until `SETTLE`
    calls in a row with the same recorded Modules found everything already where
    the program wants it. From then on it is *settled*: those Modules' arrays and
    the array arguments go to the compiled program as they are (for an array
    placed elsewhere the executable raises, and the call goes the long way; an
    uncommitted one it moves itself, as `jax.jit` does), and every `CHECK_EVERY`
    calls `placed` looks again. A settled view holds no copies, so there is no
    cached copy whose source could have been donated or deleted since."""

    __slots__ = (
        "entry",
        "is_rec",
        "bounds",
        "targets",
        "arrays",
        "records",
        "settled",
        "clean",
        "countdown",
    )

    def __init__(self, entry: _Entry, parts: list[Any]):
        self.entry = entry
        self.is_rec = tuple(type(p) is _Record for p in parts)
        bounds, start = [], 0
        for p, r in zip(parts, self.is_rec):
            stop = start + (len(p.arrays) if r else 1)
            bounds.append((start, stop))
            start = stop
        self.bounds = bounds
        self.targets: dict[tuple, list[Any]] = {}
        self.arrays = _CONCAT.get(self.is_rec, self._arrays)
        self.records = _getter([n for n, r in enumerate(self.is_rec) if r])
        self.settled: tuple[Any, ...] | None = None  # the records it settled with
        self.clean = 0
        self.countdown = CHECK_EVERY

    def _arrays(self, parts: list[Any]) -> tuple[Any, ...]:
        out: tuple[Any, ...] = ()
        for p, r in zip(parts, self.is_rec):
            out += p.arrays if r else (p,)
        return out

    def __call__(self, parts: list[Any]) -> Any:
        entry = self.entry
        if entry.donating or not entry.checking:
            return entry(self.arrays(parts))
        settled = self.settled
        if settled is None or self.records(parts) != settled:
            return self.placed(parts)
        self.countdown -= 1
        if self.countdown <= 0:  # look again now and then: one call settles again
            self.settled, self.clean = None, SETTLE - 1
            return self.placed(parts)
        arrays = self.arrays(parts)
        try:
            out_arrays = entry.call(arrays)
        except Exception:  # e.g. an argument placed elsewhere: the long way
            self.settled, self.clean = None, 0
            return self.placed(parts)
        return entry.rebuild(out_arrays, arrays)

    def placed(self, parts: list[Any]) -> Any:
        """The call of a program that runs on a mesh: a recorded Module's arrays
        come from its view for this program (placed once), an array argument is
        placed through the placement cache when it is not where it belongs."""
        entry = self.entry
        shapes = tuple(
            p.serial if r else (p.shape, p.dtype) for p, r in zip(parts, self.is_rec)
        )
        targets = self.targets.get(shapes)
        if targets is None:
            arrays = self.arrays(parts)
            targets = entry.targets(arrays)
            if targets is None:
                return entry(arrays)
            if len(self.targets) >= MAX_FAST_TARGETS:
                self.targets.clear()
            self.targets[shapes] = targets
        pieces: list[Any] = []
        key = (entry.serial, shapes)
        moved = False
        for p, r, (start, stop) in zip(parts, self.is_rec, self.bounds):
            if r:
                view = p.views.get(key)
                if view is None or (
                    view.sources and any(map(_is_deleted, view.sources))
                ):
                    view = p.view(key, targets[start:stop])
                pieces.extend(view.arrays)
                moved = moved or view.copies
            elif type(p) is ArrayImpl and _placement_cache.equivalent(
                p.sharding, targets[start], p.ndim
            ):
                pieces.append(p)
            else:
                pieces.extend(
                    _placement_cache.place((p,), targets[start:stop], cache=True)[0]
                )
                moved = True
        arrays = tuple(pieces)
        try:
            out_arrays = entry.call(arrays)
        except Exception:
            # A view's copy deleted since (say): forget the views, go the long way.
            for p, r in zip(parts, self.is_rec):
                if r:
                    p.views.pop(key, None)
            self.clean = 0
            return entry(self.arrays(parts))
        if moved:
            self.clean = 0
        else:
            self.clean += 1
            if self.clean >= SETTLE:
                self.settled, self.countdown = self.records(parts), CHECK_EVERY
        return entry.rebuild(out_arrays, arrays)


# The array tuple of the commonest calls, without a loop: f(model, x), f(model),
# model(x), f(x), f(model, x, y).
_CONCAT: dict[tuple[bool, ...], Callable[[list[Any]], tuple[Any, ...]]] = {
    (True, False): lambda p: p[0].arrays + (p[1],),
    (True,): lambda p: p[0].arrays,
    (False,): lambda p: (p[0],),
    (True, False, False): lambda p: p[0].arrays + (p[1], p[2]),
    (False, False): lambda p: (p[0], p[1]),
}


class _MethodNode:
    """A bound method of a Module, flattened as its function (a static leaf, keyed
    by identity) and its Module (a subtree whose arrays are inputs, as for
    Equinox's own bound methods), so that `filter_pmap(model.__call__)` of a fresh
    Module of the same structure finds the same compiled program. The backend gets
    it as the function: it calls like the bound method."""

    __slots__ = ("func", "owner")

    def __init__(self, func: Any, owner: Any):
        self.func, self.owner = func, owner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.func(self.owner, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:  # names arguments in errors
        return inspect.signature(types.MethodType(self.func, self.owner))

    def __getattr__(self, name: str) -> Any:  # __name__, __qualname__, ...
        if name in ("func", "owner"):
            raise AttributeError(name)
        return getattr(types.MethodType(self.func, self.owner), name)


jtu.register_pytree_with_keys(
    _MethodNode,
    lambda m: (
        ((jtu.GetAttrKey("__func__"), m.func), (jtu.GetAttrKey("__self__"), m.owner)),
        None,
    ),
    lambda _, children: _MethodNode(*children),
    flatten_func=lambda m: ((m.func, m.owner), None),
)


def _as_tree(fun: Any) -> Any:
    if type(fun) is _MethodType and isinstance(fun.__self__, eqx.Module):
        return _MethodNode(fun.__func__, fun.__self__)
    return fun


class Compiled:
    """The compile cache of one transform with one set of options, shared by every
    wrapper that has them (see `shared`).

    `run(fun, args, kwargs, context)` is the backend; `context` is a hashable value
    computed per call by `context_fn` (e.g. the mesh) that is part of the key.
    `check(args, kwargs)`, if given, runs before every call that is not found by
    the fast path (which takes only concrete arrays and recorded Modules, so a call
    with tracers among its arguments always gets it).
    """

    def __init__(
        self,
        run: Run,
        *,
        context_fn: Callable[[], Hashable] | None = None,
        donate: Donate = "none",
        check: Callable[[tuple, dict], None] | None = None,
    ):
        self._run = run
        self._context_fn = context_fn
        self._check = check
        self._donate = check_donate(donate)
        # (tree structure, leaf types) -> plan; types too, because 1, 1.0 and True
        # are equal and hash alike but trace differently.
        self._plans: dict[Hashable, _Plan] = {}
        self._slow_plans: list[tuple[Any, _Plan]] = []
        # Fast-path key (see `_fast_key`) -> the entry the general path found for it.
        self._fast: dict[Hashable, _Fast] = {}

    def __call__(self, fun: Any, args: tuple, kwargs: dict) -> Any:
        # The hot paths (benchmarks/dispatch*.py; keep them lean, no Python loop over
        # the leaves). Fast: the function and each argument by identity or type, one
        # dict lookup, one call. General: one flatten, a tuple of the leaves' types,
        # two dict lookups, two itemgetters and one call.
        if not kwargs:
            found = _fast_key(fun, args, self._context_fn)
            if found is not None:
                key, parts = found
                fast = self._fast.get(key)
                if fast is None or fast.entry.dead:
                    return self._fast_miss(found, fun, args)
                entry = fast.entry
                if entry.checking or entry.donating:
                    return fast(parts)
                arrays = fast.arrays(parts)
                try:
                    out_arrays = entry.call(arrays)
                except Exception:
                    return entry(arrays)  # the long way, which can recover
                return entry.rebuild(out_arrays, arrays)
            _note_call(fun, args)
        if self._check is not None:
            self._check(args, kwargs)
        entry, arrays = self._lookup(fun, args, kwargs)
        return entry(arrays)

    def _fast_miss(self, found: tuple[tuple, list[Any]], fun: Any, args: tuple) -> Any:
        key, parts = found
        entry, arrays = self._lookup(fun, args, {})
        fast = _Fast(entry, parts)
        mine = fast.arrays(parts)
        if len(mine) == len(arrays) and all(map(operator.is_, mine, arrays)):
            _bounded_put(self._fast, key, fast, MAX_FAST)
        return entry(arrays)

    def lower(self, fun: Any, args: tuple, kwargs: dict) -> "Lowered":
        entry, arrays = self._lookup(fun, args, kwargs)
        if entry.donating:
            lowered = entry.jitted.lower(*entry.call.split(arrays))  # type: ignore
        else:
            lowered = entry.jitted.lower(arrays)
        return Lowered(lowered, self, entry, fun)

    def _lookup(self, fun: Any, args: tuple, kwargs: dict) -> tuple[_Entry, tuple]:
        fun = _as_tree(fun)
        leaves, treedef = _flatten((fun, args, kwargs))
        shape = (treedef, tuple(map(type, leaves)))
        try:
            plan = self._plans[shape]
        except KeyError:
            plan = _Plan(leaves)
            _bounded_put(self._plans, shape, plan, MAX_PLANS)
        except TypeError:  # a Module static field that cannot be hashed
            plan = self._slow_plan(shape, leaves)
        arrays = plan.arrays(leaves)
        statics = plan.statics(leaves)
        if plan.functions:  # keyed by identity, not held (see `_Weak`)
            statics = list(statics)
            for n in plan.functions:
                statics[n] = id(statics[n])
            statics = tuple(statics)
        key = (None if self._context_fn is None else self._context_fn(), statics)
        try:
            entry = plan.entries[key]
        except KeyError:
            entry = self._new_entry(treedef, plan, leaves, key, fun, args)
            _bounded_put(plan.entries, key, entry, MAX_ENTRIES)
        except TypeError:
            raise self._unhashable(fun, args, kwargs) from None
        return entry, arrays

    def _slow_plan(self, shape: tuple, leaves: list[Any]) -> _Plan:
        """Tree structures that cannot be hashed (a Module static field holding a
        list, say) are compared by value, as Equinox allows them."""
        for known, plan in self._slow_plans:
            if _same(known, shape):
                return plan
        plan = _Plan(leaves)
        if len(self._slow_plans) >= MAX_SLOW_PLANS:
            del self._slow_plans[0]
        self._slow_plans.append((shape, plan))
        return plan

    def _unhashable(self, fun: Any, args: tuple, kwargs: dict) -> SpecError:
        names = leaf_names(fun, args, kwargs)
        leaves = _flatten((fun, args, kwargs))[0]
        culprits = []
        for name, leaf in zip(names, leaves):
            if is_array(leaf):
                continue
            try:
                hash(leaf)
            except TypeError:
                culprits.append(f"{name} ({type(leaf).__name__})")
        where = "; ".join(culprits) if culprits else "(unknown)"
        return SpecError(
            "Every non-array leaf of a call is static: part of the compiled "
            "signature, so it must be hashable (as for `jax.jit` static arguments "
            f"and `equinox.filter_jit`). Not hashable: {where}. Make it hashable "
            "(e.g. a frozen dataclass, or a tuple instead of a list), turn it into "
            "an array, or close over it in the function instead of passing it."
        )

    def _new_entry(
        self,
        treedef: Any,
        plan: _Plan,
        leaves: list[Any],
        key: tuple,
        fun: Any,
        args: tuple,
    ) -> _Entry:
        entry = _Entry()
        run = self._run
        signature = plan.signature(leaves)
        if plan.function_idx:
            entries = plan.entries

            def forget(_: Any) -> None:
                entry.dead = True  # fast-path keys hold its id: never serve it again
                if entries.get(key) is entry:
                    del entries[key]

            refs = []
            for i in plan.function_idx:
                ref = weakref.ref(signature[i], forget)
                refs.append(ref)
                signature[i] = _Weak(ref)
            entry.refs = refs

        def body(arrays: tuple[Any, ...]) -> list[Any]:
            merged = merge_leaves(signature, arrays)
            if plan.function_idx:
                merged = [x.ref() if type(x) is _Weak else x for x in merged]
            f, a, k = jtu.tree_unflatten(treedef, merged)
            out, shardings = run(f, a, k, key[0])
            out_leaves, out_treedef = jtu.tree_flatten(out)
            out_arrays, out_signature = split_leaves(out_leaves)
            entry.record(out_treedef, out_signature, arrays, shardings)
            return out_arrays

        if self._donate == "none":
            entry.jitted = entry.call = jax.jit(body)
            return entry
        entry.checking = False  # a donating call places by itself (`_donating`)
        keep_first = self._donate.endswith("except-first")
        kept: set[int] = set()
        if keep_first and args:
            before = len(jtu.tree_leaves(fun))
            first = range(before, before + len(jtu.tree_leaves(args[0])))
            kept = {n for n, i in enumerate(plan.array_idx) if i in first}
        donated_idx = [n for n in range(len(plan.array_idx)) if n not in kept]
        kept_idx = sorted(kept)
        n = len(plan.array_idx)

        def split_body(donated: tuple, kept_arrays: tuple) -> list[Any]:
            arrays: list[Any] = [None] * n
            for i, v in zip(donated_idx, donated):
                arrays[i] = v
            for i, v in zip(kept_idx, kept_arrays):
                arrays[i] = v
            return body(tuple(arrays))

        entry.jitted = jax.jit(split_body, donate_argnums=0)
        entry.call = _DonatingCall(
            entry.jitted, donated_idx, kept_idx, quiet=self._donate.startswith("all")
        )
        entry.donating = True
        return entry


class _DonatingCall:
    __slots__ = ("jitted", "donated", "kept", "quiet", "donated_idx")

    def __init__(
        self,
        jitted: Any,
        donated_idx: list[int],
        kept_idx: list[int],
        quiet: bool,
    ):
        self.jitted, self.quiet, self.donated_idx = jitted, quiet, donated_idx
        self.donated = _getter(donated_idx)
        self.kept = _getter(kept_idx)

    def split(self, arrays: tuple) -> tuple[tuple, tuple]:
        return self.donated(arrays), self.kept(arrays)

    def __call__(self, arrays: tuple) -> list[Any]:
        if not self.quiet:
            return self.jitted(self.donated(arrays), self.kept(arrays))
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message="Some donated buffers were not usable"
            )
            return self.jitted(self.donated(arrays), self.kept(arrays))


class Lowered:
    """An eqpar call lowered ahead of time: `.compile()` gives a callable that takes
    the same arguments (same shapes, same static values) as the call that was
    lowered; `.as_text()` shows the program."""

    def __init__(self, lowered: Any, compiled: Compiled, entry: _Entry, fun: Any):
        self.lowered = lowered
        self._compiled = compiled
        self._entry = entry
        self._fun = fun

    def as_text(self) -> str:
        return self.lowered.as_text()

    def compile(self) -> "CompiledCall":
        return CompiledCall(self.lowered.compile(), self)


class CompiledCall:
    """A call compiled ahead of time (from `Lowered.compile()`)."""

    def __init__(self, executable: Any, lowered: Lowered):
        self.executable = executable
        self._lowered = lowered

    def __call__(self, /, *args: Any, **kwargs: Any) -> Any:
        lowered = self._lowered
        entry, arrays = lowered._compiled._lookup(lowered._fun, args, kwargs)
        if entry is not lowered._entry:
            raise SpecError(
                "This ahead-of-time compiled call was lowered for other static "
                "arguments (non-array leaves) or another tree structure than the "
                "ones it was now called with. Lower it again for these arguments."
            )
        if entry.donating:
            out = self.executable(*entry.call.split(arrays))  # type: ignore
        else:
            out = self.executable(arrays)
        return entry.rebuild(out, arrays)

    def as_text(self) -> str:
        return self.executable.as_text()


# ----------------------------------------------------------------------------------
# One caller per transform and options, shared by every wrapper

_SHARED: dict[Hashable, Any] = {}


def _options_key(kind: str, options: Any) -> Hashable | None:
    leaves, treedef = jtu.tree_flatten(options, is_leaf=lambda x: x is None)
    key = (kind, treedef, tuple((type(leaf), leaf) for leaf in leaves))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def shared(kind: str, options: Any, make: Callable[[], Any]) -> Any:
    """The caller (e.g. a `Compiled`) for transform `kind` with `options`, made once
    and shared by every wrapper with equal options: a fresh wrapper per call reuses
    the compiled programs. Options that cannot be hashed get a caller of their own.
    """
    key = _options_key(kind, options)
    if key is None:
        return make()
    try:
        return _SHARED[key]
    except KeyError:
        caller = make()
        _bounded_put(_SHARED, key, caller, MAX_SHARED)
        return caller


_get = object.__getattribute__


class Transformed(eqx.Module):
    """A transformed function: a pytree (its function's arrays are leaves) that binds
    as a method and dispatches through its shared caller."""

    _fun: Callable
    _compiled: Any = eqx.field(static=True)

    @property
    def __wrapped__(self) -> Callable:
        return self._fun

    def __call__(self, /, *args: Any, **kwargs: Any) -> Any:
        # `object.__getattribute__` skips `eqx.Module.__getattribute__` (a Python-level
        # hook that wraps bound methods): two plain reads on the hot path instead.
        return _get(self, "_compiled")(_get(self, "_fun"), args, kwargs)

    def lower(self, /, *args: Any, **kwargs: Any) -> Lowered:
        """Lowers the call ahead of time, as `jax.jit(...).lower` does: returns an
        object whose `.compile()` is a callable taking the same arguments."""
        compiled = _get(self, "_compiled")
        if not isinstance(compiled, Compiled):
            raise SpecError(
                "This transform does not compile on its own (filter_vmap maps like "
                "`jax.vmap`), so it has nothing to lower. Lower a compiled function "
                "that calls it: `eqpar.filter_jit(f).lower(*args)`."
            )
        return compiled.lower(_get(self, "_fun"), args, kwargs)

    def __get__(self, instance: Any, owner: Any) -> Any:
        del owner
        if instance is None:
            return self
        return eqx.Partial(self, instance)


_WRAPPER_FIELDS = ("__module__", "__name__", "__qualname__", "__doc__")
_set = object.__setattr__


def transformed(fun: Callable, caller: Any) -> Any:
    """A `Transformed` of `fun`, named after it (as `eqx.module_update_wrapper` and
    `functools.wraps` do).

    Built field by field, because wrappers are often built inline, once per call:
    `eqx.Module.__init__` plus `eqx.module_update_wrapper` (which flattens and
    rebuilds the wrapper, and so the whole Module it wraps) cost 20 to 100 us; this
    costs 3. The result is the same dataclass with the same fields. Only the
    string attributes are copied (not `__annotations__`, a dict): they are part of
    the wrapper's tree structure, which must stay hashable to be a cache key.
    """
    wrapper = object.__new__(Transformed)
    _set(wrapper, "_fun", fun)
    _set(wrapper, "_compiled", caller)
    for name in _WRAPPER_FIELDS:
        try:
            value = getattr(fun, name)
        except AttributeError:
            continue
        _set(wrapper, name, value)
    return wrapper


def decorator_or_call(fun: Any, make: Callable[[Callable], Any], who: str) -> Any:
    """`@t`, `@t(...)` and `t(fn, ...)` in one place."""
    if fun is None:
        return lambda f: decorator_or_call(f, make, who)
    if not callable(fun):
        raise SpecError(
            f"{who} transforms a function, but was given {type(fun).__name__} "
            f"{fun!r:.80}, which is not callable. Pass the function first "
            f"(`{who}(fn, ...)`), or use `@{who}(...)` as a decorator."
        )
    return make(fun)
