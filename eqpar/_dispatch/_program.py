"""`Program`: one call signature of one transform, compiled by `jax.jit`.

A signature is a tree structure, the static (non-array) leaves and the backend's
context (e.g. the mesh). Its program is `jax.jit` of a body that takes only the
array leaves, so everything jit keys its own cache on (shapes, dtypes, weak types,
shardings, x64 and the other config and context it reads) is keyed by jit itself:
eqpar adds no key of its own that could be coarser.

The body returns the output's arrays and, as a `_Static` pytree node, its tree
structure and non-array leaves. jit caches that node with the trace it came from, so
a non-array output is whatever the trace for *these* inputs returned (Equinox's
`filter_jit` does the same).

Before the call, a program that runs on a mesh places its inputs where the backend
says they belong (through the placement cache, so that an unchanged input moves
once), and a donating or placing program refuses inputs whose buffers are gone with
an eqpar error (JAX would abort the process). Then the program runs exactly once:
nothing is retried.
"""

import operator
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.tree_util as jtu

from .. import _placement_cache
from .._errors import DeletedArrayError, SpecError, warn
from .._specs import is_concrete_array, merge_leaves, split_leaves
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


class Static:
    """A pytree node with no children: its value travels in the tree structure, so
    through `jax.jit` it is part of the cached trace, not an input or output."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value


jtu.register_pytree_node(Static, lambda s: ((), s.value), lambda v, _: Static(v))


def split_output(out: Any) -> tuple[list[Any], Static]:
    """The arrays of an output and the `Static` that `rebuild` needs for the rest."""
    leaves, treedef = jtu.tree_flatten(out)
    arrays, signature = split_leaves(leaves)
    every = len(arrays) == len(leaves)
    return arrays, Static((treedef, None if every else tuple(signature)))


def rebuild(arrays: Sequence[Any], static: Static) -> Any:
    treedef, signature = static.value
    if signature is None:
        return treedef.unflatten(arrays)
    return treedef.unflatten(merge_leaves(signature, arrays))


Targets = Callable[[Any, tuple, dict], Sequence[Any] | None]
"""`(fun, args, kwargs) -> one sharding (or None) per array leaf`, or `None` when
the backend does not place its inputs."""

_SHAPE_DTYPE = operator.attrgetter("shape", "dtype")
_DONATION_LOCK = threading.Lock()


class Program:
    """One signature's `jax.jit` program, called with the signature's array leaves.

    - `body`: `arrays -> (output arrays, Static)`, the traced function.
    - `array_idx`: where the arrays sit among the call's leaves (for error names).
    - `donate`: Equinox's values; `kept` are the positions (among the arrays) that
        `"*-except-first"` keeps.
    - `targets`: the backend's placement of the inputs, or `None`.
    - `names`: `(fun, args, kwargs) -> a name per leaf`, for errors.
    """

    __slots__ = (
        "jitted",
        "donating",
        "_call",
        "_targets",
        "_by_shape",
        "_checks",
        "_array_idx",
        "_names",
        "_donated_idx",
        "_split",
        "_quiet",
    )

    def __init__(
        self,
        body: Callable[[tuple[Any, ...]], Any],
        *,
        array_idx: Sequence[int],
        donate: Donate,
        kept: Sequence[int],
        targets: Targets | None,
        names: Callable[[Any, tuple, dict], list[str]],
    ):
        self._array_idx = list(array_idx)
        self._names = names
        self._targets = targets
        self._by_shape: Bounded[tuple[Any, ...]] = Bounded(MAX_TARGETS)
        self.donating = donate != "none"
        self._checks = self.donating or targets is not None
        self._quiet = donate.startswith("all")
        n = len(self._array_idx)
        self._donated_idx = [i for i in range(n) if i not in set(kept)]
        if not self.donating:
            self.jitted = jax.jit(body)
            self._call = self.jitted
            self._split: Callable[[tuple], tuple] = lambda arrays: (arrays,)
            return
        donated_idx, kept_idx = self._donated_idx, sorted(kept)
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
        out, static = self._call(arrays)
        return rebuild(out, static)

    def _donating_call(self, arrays: tuple[Any, ...]) -> Any:
        if not self._quiet:
            return self.jitted(*self._split(arrays))
        # JAX warns (at compile time) about donated buffers it could not reuse;
        # "all" silences that, as in Equinox. Warning filters are process-wide, so
        # the change is made under a lock and undone before anyone else's.
        with _DONATION_LOCK, warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message="Some donated buffers were not usable"
            )
            return self.jitted(*self._split(arrays))

    def prepare(
        self, arrays: tuple[Any, ...], fun: Any, args: tuple, kwargs: dict
    ) -> tuple[Any, ...]:
        """`arrays` checked for deleted buffers and placed where the program runs."""
        for i, x in enumerate(arrays):
            if is_concrete_array(x) and x.is_deleted():
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
        placed, moved = _placement_cache.place(arrays, targets)
        if moved and self.donating:
            if any(placed[i] is not arrays[i] for i in self._donated_idx):
                warn(
                    "eqpar: an input to donate was not on the devices the compiled "
                    "program runs on, so it was copied there first and the copy was "
                    "donated; the original array is still alive and its memory was "
                    "not reused. Place the inputs first (`eqpar.filter_device_put`, "
                    "`eqpar.replicate`, or the outputs of the previous step) to "
                    "donate them."
                )
        return placed

    def _deleted(
        self, i: int, fun: Any, args: tuple, kwargs: dict
    ) -> DeletedArrayError:
        name = self._names(fun, args, kwargs)[self._array_idx[i]]
        return DeletedArrayError(
            f"The input {name} has been deleted: its buffer was donated to an "
            "earlier call (`donate=...`) or deleted, so it holds no value any more. "
            "Pass the value that call returned in its place (e.g. `model = "
            "step(model, x)` in a loop), or keep a copy of the array "
            "(`jnp.copy(x)`) before donating it."
        )

    def lower(self, arrays: tuple[Any, ...]) -> Any:
        return self.jitted.lower(*self._split(arrays))

    def call_compiled(self, executable: Any, arrays: tuple[Any, ...]) -> Any:
        """Calls an ahead-of-time `executable` of this program (see `lower`)."""
        out, static = executable(*self._split(arrays))
        return rebuild(out, static)


def getter(idx: Sequence[int]) -> Callable[[Sequence[Any]], tuple]:
    """`xs -> tuple(xs[i] for i in idx)`, at C speed."""
    if len(idx) >= 2:
        return operator.itemgetter(*idx)
    if len(idx) == 1:
        (i,) = idx
        return lambda xs: (xs[i],)
    return lambda xs: ()
