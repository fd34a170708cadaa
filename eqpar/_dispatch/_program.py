"""`Program`: one call signature of one transform, compiled by `jax.jit`.

A signature is a tree structure, the static (non-array) leaves and the backend's
context (e.g. the mesh). Its program is `jax.jit` of a body that takes only the
array leaves, so everything jit keys its own cache on (shapes, dtypes, weak types,
shardings, x64 and the other config and context it reads) is keyed by jit itself:
eqpar adds no key of its own that could be coarser.

The body returns the output itself when all its leaves are arrays; otherwise its
tree structure and non-array leaves travel as the node data of a `_WithStatic`
pytree node, which jit caches with the trace it came from: a non-array output is
whatever the trace for *these* inputs returned (Equinox's `filter_jit` does the
same).

Before the call, a program that runs on a mesh places its inputs where the backend
says they belong (through the placement cache, so that an unchanged input moves
once), and a donating or placing program refuses inputs whose buffers are gone with
an eqpar error (JAX would abort the process). Then the program runs exactly once:
nothing is retried.
"""

import operator
import re
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.tree_util as jtu

from .. import _placement_cache
from .._errors import DeletedArrayError, SpecError, warn
from .._specs import CONCRETE_TYPES, is_concrete_array, split_static, Static
from ._parts import OutputPlan, plan_outputs, remember_outputs
from ._tables import Bounded


Donate = Literal["all", "all-except-first", "warn", "warn-except-first", "none"]
DONATE_VALUES = ("all", "all-except-first", "warn", "warn-except-first", "none")

MAX_TARGETS = 64
"""Input shapes per program whose target shardings are remembered."""


def check_donate(donate: Any) -> Donate:
    if not isinstance(donate, str) or donate not in DONATE_VALUES:
        raise SpecError(
            f"`donate` must be one of {', '.join(map(repr, DONATE_VALUES))} (as "
            f"in `equinox.filter_jit`), got {donate!r}."
        )
    return donate  # type: ignore[return-value]


def split_output(out: Any) -> Any:
    """What the traced body returns: the output itself when its leaves are all
    arrays (jit rebuilds it), otherwise a `_WithStatic` (see `output`)."""
    arrays, static = split_static(out)
    if len(arrays) == len(static.signature):
        return out
    return _WithStatic(arrays, _Output(static.treedef, static.signature))


class _Output(Static):
    """The `Static` of a compiled output (one per trace), with its `OutputPlan`
    once a concrete output has been rebuilt from it."""

    __slots__ = ("plan",)

    def __init__(self, treedef: Any, signature: tuple[Any, ...]):
        super().__init__(treedef, signature)
        self.plan: OutputPlan | None = None


class _WithStatic:
    """An output with non-array leaves: its arrays are the pytree's children and its
    `Static` (tree structure, non-array leaves) the node data, so that through
    `jax.jit` the rest is part of the cached trace it came from, as in Equinox's
    `filter_jit`."""

    __slots__ = ("arrays", "static")

    def __init__(self, arrays: Any, static: _Output):
        self.arrays = arrays
        self.static = static


jtu.register_pytree_node(
    _WithStatic,
    lambda w: ((w.arrays,), w.static),
    lambda static, children: _WithStatic(children[0], static),
)


def output(out: Any) -> Any:
    """The user's output from what the compiled body returned.

    The Modules at its top (the output, or the items of an output tuple) have their
    parts remembered as they are rebuilt (see `_parts.remember_outputs`): a model
    fed back into the next call, as in a training loop, is looked up there instead
    of flattened again.
    """
    if type(out) is not _WithStatic:
        return out
    static, arrays = out.static, out.arrays
    tree = static.merge(arrays)
    # Only concrete outputs: under an outer transform some may be tracers (an
    # eager `jax.vmap` or `jax.grad` leaves others concrete), whose parts differ.
    if CONCRETE_TYPES.issuperset(map(type, arrays)) or all(
        map(is_concrete_array, arrays)
    ):
        plan = static.plan
        if plan is None:  # two threads may both make it: the same plan
            plan = static.plan = plan_outputs(tree, static, arrays)
        if plan:
            remember_outputs(tree, plan, arrays)
    return tree


Targets = Callable[[Any, tuple, dict], Sequence[Any] | None]
"""`(fun, args, kwargs) -> one sharding (or None) per array leaf`, or `None` when
the backend does not place its inputs."""

_SHAPE_DTYPE = operator.attrgetter("shape", "dtype")


class _QuietDonation:
    """While any `donate="all"`-style call runs, JAX's warning about donated buffers
    it could not reuse (given when it lowers a program) is ignored, as in Equinox.

    Python's warning filters are one list for the whole process, not per thread:
    one filter is put in when the first such call starts and taken out when the
    last one ends. The lock guards only that count, never a call: donating calls
    run concurrently and nest (a donating program called while another traces).
    A `"warn"` program lowered by another thread during that window is silenced
    too; nothing else is.
    """

    _MESSAGE = "Some donated buffers were not usable"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = 0

    def __enter__(self) -> None:
        with self._lock:
            self._active += 1
            if self._active == 1:
                warnings.filterwarnings("ignore", message=self._MESSAGE)

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._active -= 1
            if self._active == 0:
                entry = ("ignore", re.compile(self._MESSAGE, re.I), Warning, None, 0)
                try:  # another `catch_warnings` may have taken it out already
                    warnings.filters.remove(entry)  # pyright: ignore
                except ValueError:
                    pass


_QUIET_DONATION = _QuietDonation()


class Program:
    """One signature's `jax.jit` program, called with the signature's array leaves.

    - `body`: `arrays -> (output arrays, Static)`, the traced function.
    - `n_arrays`: how many arrays a call passes.
    - `donate`: Equinox's values; `kept` are the positions (among the arrays) that
        `"*-except-first"` keeps.
    - `targets`: the backend's placement of the inputs, or `None`.
    - `names`: `(fun, args, kwargs) -> a name per array`, for errors.
    """

    __slots__ = (
        "jitted",
        "donating",
        "_call",
        "_targets",
        "_by_shape",
        "_last",
        "_checks",
        "_names",
        "_donated_idx",
        "_split",
        "_quiet",
        "_fresh",
    )

    def __init__(
        self,
        body: Callable[[tuple[Any, ...]], Any],
        *,
        n_arrays: int,
        donate: Donate,
        kept: Sequence[int],
        targets: Targets | None,
        names: Callable[[Any, tuple, dict], list[str]],
    ):
        self._names = names
        self._targets = targets
        self._by_shape: Bounded[tuple[Any, ...]] = Bounded(MAX_TARGETS)
        # The last placement (None: none yet): any thread may replace it; each
        # reads one consistent value.
        self._last: _placement_cache.Last | None = None
        self.donating = donate != "none"
        self._checks = self.donating or targets is not None
        self._quiet = donate.startswith("all")
        self._donated_idx = [i for i in range(n_arrays) if i not in set(kept)]
        # Donated inputs that must be copied get copies of their own (see `place`).
        self._fresh = frozenset(self._donated_idx) if self.donating else frozenset()
        if not self.donating:
            self.jitted = jax.jit(body)
            self._call = self.jitted
            self._split: Callable[[tuple], tuple] = lambda arrays: (arrays,)
            return
        n, donated_idx, kept_idx = n_arrays, self._donated_idx, sorted(kept)
        donated_of, kept_of = getter(donated_idx), getter(kept_idx)

        def split_body(donated: tuple, kept_arrays: tuple) -> Any:
            arrays: list[Any] = [None] * n
            for i, x in zip(donated_idx, donated):
                arrays[i] = x
            for i, x in zip(kept_idx, kept_arrays):
                arrays[i] = x
            return body(tuple(arrays))

        self.jitted = jax.jit(split_body, donate_argnums=0)
        self._split = lambda arrays: (donated_of(arrays), kept_of(arrays))
        self._call = self._donating_call

    def __call__(
        self, arrays: tuple[Any, ...], fun: Any, args: tuple, kwargs: dict
    ) -> Any:
        if self._checks:
            arrays = self.prepare(arrays, fun, args, kwargs)
        try:
            out = self._call(arrays)
        except Exception as e:  # JAX's own error for a deleted input: say which
            gone = [i for i, x in enumerate(arrays) if _deleted_array(x)]
            if not gone:
                raise
            raise self._deleted(gone[0], fun, args, kwargs) from e
        return out if type(out) is not _WithStatic else output(out)

    def _donating_call(self, arrays: tuple[Any, ...]) -> Any:
        if not self._quiet:
            return self.jitted(*self._split(arrays))
        with _QUIET_DONATION:
            return self.jitted(*self._split(arrays))

    def prepare(
        self, arrays: tuple[Any, ...], fun: Any, args: tuple, kwargs: dict
    ) -> tuple[Any, ...]:
        """`arrays` checked for deleted buffers and placed where the program runs.

        The common case first: every input is a live array either already where
        the last placement put its position, or the very array the last placement
        copied, whose copy is still alive (an unplaced model called again); then
        nothing is looked up. Otherwise the targets for these input shapes are
        found (the backend computes them once per shapes) and whatever is
        elsewhere is placed.
        """
        last = self._last
        if last is not None:
            ready = _placement_cache.reuse(arrays, last)
            if ready is not None:
                return tuple(ready)
        for i, x in enumerate(arrays):
            if _deleted_array(x):
                raise self._deleted(i, fun, args, kwargs)
        if self._targets is None:
            return arrays
        shapes = tuple(map(_SHAPE_DTYPE, arrays))
        targets = self._by_shape.get(shapes)
        if targets is None:
            found = self._targets(fun, args, kwargs)
            if found is None:
                return arrays
            targets = self._by_shape.get_or_make(shapes, lambda: tuple(found))
        placed = _placement_cache.place(arrays, targets, self._fresh)
        self._last = _placement_cache.last(arrays, placed.arrays, targets)
        if placed.relaid:
            names = self._names(fun, args, kwargs)
            warn(_relaid(names, arrays, targets, placed.relaid))
        if placed.moved and self.donating:
            if any(placed.arrays[i] is not arrays[i] for i in self._donated_idx):
                warn(
                    "eqpar: an input to donate was not on the devices the compiled "
                    "program runs on, so it was copied there first and the copy was "
                    "donated; the original array is still alive and its memory was "
                    "not reused. Place the inputs first (`eqpar.filter_device_put`, "
                    "`eqpar.replicate`, or the outputs of the previous step) to "
                    "donate them."
                )
        return placed.arrays

    def _deleted(
        self, i: int, fun: Any, args: tuple, kwargs: dict
    ) -> DeletedArrayError:
        name = self._names(fun, args, kwargs)[i]
        return DeletedArrayError(
            f"The input {name} has been deleted: its buffer was donated to an "
            "earlier call (`donate=...`) or deleted, so it holds no value any more. "
            "Pass the value that call returned in its place (e.g. `model = "
            "step(model, x)` in a loop), or keep a copy of the array "
            "(`jnp.copy(x)`) before donating it."
        )

    def lower(self, arrays: tuple[Any, ...]) -> Any:
        if not self._quiet:
            return self.jitted.lower(*self._split(arrays))
        with _QUIET_DONATION:
            return self.jitted.lower(*self._split(arrays))

    def call_compiled(self, executable: Any, arrays: tuple[Any, ...]) -> Any:
        """Calls an ahead-of-time `executable` of this program (see `lower`)."""
        return output(executable(*self._split(arrays)))


def _deleted_array(x: Any) -> bool:
    return is_concrete_array(x) and x.is_deleted()


def _relaid(
    names: list[str], arrays: Sequence[Any], targets: Sequence[Any], relaid: list[int]
) -> str:
    def layout(sharding: Any) -> str:
        return str(getattr(sharding, "spec", sharding))

    listed = "; ".join(
        f"{names[i]}: placed as {layout(arrays[i].sharding)}, "
        f"the call asks for {layout(targets[i])}"
        for i in relaid
    )
    return (
        f"eqpar: an argument sharded over several devices was gathered before the "
        f"call, because this call asks for less sharding (e.g. a sharded model "
        f"copied whole onto every device): {listed}. Give it the spec it has "
        "(leave `in_specs` out to use each argument's placement), or place it as "
        "the call asks first."
    )


def getter(idx: Sequence[int]) -> Callable[[Sequence[Any]], tuple]:
    """`xs -> tuple(xs[i] for i in idx)`, at C speed."""
    if len(idx) >= 2:
        return operator.itemgetter(*idx)
    if len(idx) == 1:
        (i,) = idx
        return lambda xs: (xs[i],)
    return lambda xs: ()
