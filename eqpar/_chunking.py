"""Memory-bounded mapping: `filter_vmap`'s chunked map, the automatic chunk size read
from XLA's memory analysis, and per-example random keys.

A chunked map runs one compiled body over every chunk: a `lax.scan` over chunk
indices whose body slices `chunk` examples out of each mapped input
(`dynamic_slice`), maps the element function over them (`vmap`) and writes the
results into the output buffers in place (`dynamic_update_slice`). The last chunk,
when `chunk` does not divide the size, starts early (at `size - chunk`) and so
recomputes a few examples of the one before it with the very same program: no
second body for a remainder, no padded copy of the inputs and no trimmed copy of the
outputs. The element function is traced once per call (into a jaxpr that the scan
body replays), whatever the remainder.

`chunk_size="auto"` picks the largest chunk whose compiled temporaries fit a memory
budget. It never tries chunk sizes at run time: it compiles the map (on abstract
shapes, nothing runs) and reads `temp_size_in_bytes` from XLA's own
`memory_analysis()`, first unchunked, then at two small widths that give the fixed
cost and the per-example slope; the predicted chunk is compiled once more to confirm
it (at most a few compiles, once per call signature, then cached).
"""

import logging
import math
import os
import warnings
from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax.extend.core import jaxpr_as_fun

from ._dispatch import Bounded
from ._errors import EqparError, EqparWarning, SpecError
from ._mapped import MappedCall
from ._specs import is_array
from ._vma import to_varying, varying_axes


logger = logging.getLogger("eqpar")

DEFAULT_MEMORY_FRACTION = 0.25
"""`memory_budget=None`: this fraction of the device's memory, where the backend
reports it (`device.memory_stats()["bytes_limit"]`, e.g. on GPU and TPU)."""

DEFAULT_CPU_BUDGET = 2**30
"""`memory_budget=None` on a backend that reports no memory limit (CPU): 1 GiB."""

MAX_CHOICES = 256
"""Chunk choices cached per `filter_vmap` option set (least recently used out
first)."""

_MAX_PROBES = 6


# ----------------------------------------------------------------------------------
# The chunked map


def _varying(x: Any) -> frozenset[Hashable]:
    try:
        return varying_axes(x)
    except Exception:  # numpy values carry no type
        return frozenset()


def initial_buffer(shape: tuple[int, ...], like: Any) -> Any:
    """A buffer of `shape` with the dtype and replication type of `like` (an output
    of the traced body), to be filled in place by the scan."""
    buf = jnp.zeros(shape, like.dtype)  # typed keys too
    vary = getattr(like, "manual_axis_type", None)
    axes = tuple(vary.varying) if vary is not None else ()
    return to_varying(buf, axes) if axes else buf


def broadcast_values(call: MappedCall) -> list[Any]:
    return [call.leaves[i] for i in call.broadcast_index]


def run_unchunked(
    call: MappedCall,
    size: int,
    mapped: Sequence[Any] | None = None,
    broadcast: Sequence[Any] | None = None,
) -> tuple[list[Any], list[Any]]:
    """The whole map as one `vmap` (no axis name: a chunked map cannot have one)."""
    mapped = call.mapped if mapped is None else mapped
    broadcast = broadcast_values(call) if broadcast is None else broadcast
    return jax.vmap(
        call.inner,
        in_axes=(list(call.axes), None),
        out_axes=(0, None),
        axis_size=size,
    )(list(mapped), list(broadcast))


def run_chunked(
    call: MappedCall,
    size: int,
    chunk: int,
    mapped: Sequence[Any] | None = None,
    broadcast: Sequence[Any] | None = None,
) -> tuple[list[Any], list[Any]]:
    """Maps `chunk` elements at a time with one compiled body (see the module
    docstring); `mapped`/`broadcast` replace the call's own leaves (for probes)."""
    mapped = list(call.mapped if mapped is None else mapped)
    broadcast = list(broadcast_values(call) if broadcast is None else broadcast)
    axes = list(call.axes)
    n_chunks = -(-size // chunk)
    # Inside `shard_map` with replication checking, a broadcast value that meets a
    # per-device one is cast to varying. Cast it once here, before the loop: left to
    # the body, the cast would sit in every iteration, and under autodiff its
    # transpose (a `psum`) would run once per chunk (the trap NetKet documents).
    vary = tuple(sorted(set().union(*map(_varying, mapped)), key=str))
    if vary:
        broadcast = [
            to_varying(jnp.asarray(b), vary) if is_array(b) else b for b in broadcast
        ]

    def body(m: list[Any], b: list[Any]) -> tuple[list[Any], list[Any]]:
        if m:
            return jax.vmap(
                call.inner, in_axes=(axes, None), out_axes=(0, None), axis_size=chunk
            )(m, b)
        # Only `axis_size`: every element gets the same (broadcast) inputs.
        return jax.vmap(
            lambda _i: call.inner([], b), out_axes=(0, None), axis_size=chunk
        )(jnp.arange(chunk))

    # Trace the element function once (on the first chunk's shapes); the scan body
    # replays the traced program, so a remainder costs no second trace.
    first = [jax.lax.slice_in_dim(x, 0, chunk, axis=a) for x, a in zip(mapped, axes)]
    closed, shapes = jax.make_jaxpr(body, return_shape=True)(first, broadcast)
    program = jaxpr_as_fun(closed)
    out_tree = jtu.tree_structure(shapes)
    mapped_shapes, unmapped_shapes = shapes
    init = (
        [initial_buffer((size, *s.shape[1:]), s) for s in mapped_shapes],
        [initial_buffer(tuple(s.shape), s) for s in unmapped_shapes],
    )
    inputs_b = jtu.tree_leaves(broadcast)

    def step(carry: Any, i: Any) -> tuple[Any, None]:
        buffers, _ = carry
        start = jnp.minimum(i * chunk, size - chunk)
        pieces = [
            jax.lax.dynamic_slice_in_dim(x, start, chunk, axis=a)
            for x, a in zip(mapped, axes)
        ]
        mapped_out, unmapped_out = jtu.tree_unflatten(
            out_tree, program(*pieces, *inputs_b)
        )
        buffers = [
            jax.lax.dynamic_update_slice_in_dim(buf, y, start, axis=0)
            for buf, y in zip(buffers, mapped_out)
        ]
        return (buffers, list(unmapped_out)), None

    (mapped_out, unmapped_out), _ = jax.lax.scan(
        step, init, jnp.arange(n_chunks, dtype=jnp.int32)
    )
    return list(mapped_out), list(unmapped_out)


# ----------------------------------------------------------------------------------
# The memory budget


def _host_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def device_memory(device: Any = None) -> int | None:
    """The memory of `device` (default: the first local device) in bytes, as its
    backend reports it (`memory_stats()["bytes_limit"]`), or `None` (CPU)."""
    device = jax.local_devices()[0] if device is None else device
    try:
        stats = device.memory_stats()
    except Exception:
        stats = None
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"])


def check_memory_budget(memory_budget: Any, chunk_size: Any) -> None:
    """Build-time checks of `memory_budget` (and that it goes with "auto")."""
    if memory_budget is None:
        return
    if chunk_size != "auto":
        raise SpecError(
            f"filter_vmap got memory_budget={memory_budget!r} with "
            f"chunk_size={chunk_size!r}; the budget is what `chunk_size='auto'` "
            "sizes its chunks by. Pass `chunk_size='auto'` as well, or drop "
            "`memory_budget`."
        )
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)):
        raise SpecError(
            f"filter_vmap: `memory_budget` must be a number of bytes (an int, e.g. "
            f"`2**30`) or a fraction of the device's memory (a float in (0, 1], e.g. "
            f"0.5), got {memory_budget!r}."
        )
    if isinstance(memory_budget, int) and memory_budget < 1:
        raise SpecError(
            f"filter_vmap: `memory_budget={memory_budget}` bytes leaves no room for "
            "any chunk: give a positive number of bytes, or a fraction of the "
            "device's memory (a float in (0, 1])."
        )
    if isinstance(memory_budget, float) and not 0.0 < memory_budget <= 1.0:
        raise SpecError(
            f"filter_vmap: `memory_budget={memory_budget}` is a float, i.e. a "
            "fraction of the device's memory, and must lie in (0, 1]. For a number "
            "of bytes pass an int (e.g. `memory_budget=2**30` for 1 GiB)."
        )


def resolve_budget(memory_budget: int | float | None) -> int:
    """Bytes from `memory_budget` (see `filter_vmap`)."""
    if isinstance(memory_budget, int):
        return memory_budget
    limit = device_memory()
    if memory_budget is None:
        return (
            DEFAULT_CPU_BUDGET
            if limit is None
            else int(limit * DEFAULT_MEMORY_FRACTION)
        )
    if limit is None:
        limit = _host_memory()
    if limit is None:
        raise SpecError(
            f"filter_vmap: `memory_budget={memory_budget}` is a fraction of the "
            "device's memory, but neither the backend nor the operating system "
            "reports how much there is. Pass a number of bytes (an int) instead."
        )
    return max(1, int(limit * memory_budget))


# ----------------------------------------------------------------------------------
# Choosing the chunk


class ChunkChoice:
    """What `chunk_size="auto"` chose for one call signature."""

    __slots__ = ("chunk", "temp", "unchunked_temp", "budget", "probes", "fits")

    def __init__(
        self,
        chunk: int,
        temp: int,
        unchunked_temp: int,
        budget: int,
        probes: dict[int, int],
    ):
        self.chunk = chunk
        self.temp = temp
        self.unchunked_temp = unchunked_temp
        self.budget = budget
        self.probes = probes
        self.fits = temp <= budget

    def __repr__(self) -> str:
        return (
            f"ChunkChoice(chunk={self.chunk}, temp={self.temp}, "
            f"unchunked_temp={self.unchunked_temp}, budget={self.budget})"
        )


def _spec(x: Any) -> jax.ShapeDtypeStruct:
    aval = jax.typeof(x)
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=aval.weak_type)


def temp_bytes(call: MappedCall, size: int, chunk: int) -> int:
    """XLA's `temp_size_in_bytes` for the map of `call` compiled on its own, in
    chunks of `chunk` (unchunked when `chunk >= size`). Nothing runs."""
    mapped = [_spec(x) for x in call.mapped]
    broadcast = [_spec(b) for b in broadcast_values(call)]

    def program(mapped: list[Any], broadcast: list[Any]) -> Any:
        if chunk >= size:
            return run_unchunked(call, size, mapped, broadcast)
        return run_chunked(call, size, chunk, mapped, broadcast)

    try:
        compiled = jax.jit(program).lower(mapped, broadcast).compile()
    except EqparError:
        raise
    except ValueError as e:
        if "out_axes" in str(e):  # an unmapped output that is not: see MappedCall
            raise
        raise _probe_error(e) from e
    except Exception as e:  # e.g. an axis name bound only by an enclosing map
        raise _probe_error(e) from e
    analysis = compiled.memory_analysis()
    if analysis is None:
        raise SpecError(
            "filter_vmap(chunk_size='auto') sizes chunks by XLA's memory analysis, "
            f"which the {jax.default_backend()!r} backend does not provide. Pass an "
            "int `chunk_size` instead."
        )
    return int(analysis.temp_size_in_bytes)


def _probe_error(e: Exception) -> SpecError:
    return SpecError(
        "filter_vmap(chunk_size='auto') measures the map by compiling it on its own "
        "(abstract shapes, nothing runs), and that failed: "
        f"{type(e).__name__}: {str(e)[:400]}. This happens when the mapped function "
        "needs something only its surroundings provide, such as a collective over "
        "an axis that an enclosing `shard_map`/`vmap` binds. Pass an int "
        "`chunk_size` instead (`eqpar.chosen_chunk_size` run outside shows a good "
        "one)."
    )


def _balance(chunk: int, size: int) -> int:
    """The smallest chunk with as many chunks as `chunk` needs: as few examples
    computed twice (in the last, overlapping chunk) as possible, and less memory."""
    return -(-size // -(-size // chunk))


def _predict(known: dict[int, int], budget: int, size: int) -> int:
    """The largest chunk whose temporaries the line through the measured widths
    nearest the budget keeps within it (fixed cost + per-example slope)."""
    fit = sorted((c, t) for c, t in known.items() if c < size)
    below = [(c, t) for c, t in sorted(known.items()) if t <= budget]
    above = [(c, t) for c, t in sorted(known.items()) if t > budget]
    if below and above and above[0][0] > below[-1][0]:
        (c0, t0), (c1, t1) = below[-1], above[0]
    elif len(fit) >= 2:
        (c0, t0), (c1, t1) = fit[-2:] if not above else fit[:2]
    else:
        return 1
    slope = (t1 - t0) / (c1 - c0)
    if slope <= 0:
        return c1 if t1 <= budget else c0
    return int(math.floor(c0 + (budget - t0) / slope))


def choose_chunk(call: MappedCall, size: int, budget: int) -> ChunkChoice:
    """The largest chunk (up to `size`) whose compiled temporaries fit `budget`."""
    known: dict[int, int] = {size: temp_bytes(call, size, size)}
    unchunked = known[size]
    if unchunked <= budget or size == 1:
        return ChunkChoice(size, unchunked, unchunked, budget, known)
    # Two small widths: the fixed cost and the per-example slope.
    wide = max(2, min(size // 2, 64))
    narrow = max(1, wide // 8)
    for c in dict.fromkeys((_balance(narrow, size), _balance(wide, size))):
        if c < size:
            known[c] = temp_bytes(call, size, c)
    for _ in range(_MAX_PROBES):
        candidate = _balance(min(max(_predict(known, budget, size), 1), size), size)
        if candidate in known:
            break
        known[candidate] = temp_bytes(call, size, candidate)
    fitting = [c for c, t in known.items() if t <= budget]
    if not fitting:
        if 1 not in known:
            known[1] = temp_bytes(call, size, 1)
        chunk = 1 if known[1] <= budget else min(known, key=known.__getitem__)
    else:
        chunk = max(fitting)
    return ChunkChoice(chunk, known[chunk], unchunked, budget, known)


class ChunkCache:
    """Chunk choices per call signature (tree structure, static leaves, shapes and
    dtypes of the array leaves, specs), in a `Bounded` table (least recently used
    dropped first). A choice is measured outside any lock (it compiles); two
    threads that ask at once may both measure, and the last one is kept."""

    def __init__(self, memory_budget: int | float | None):
        self.memory_budget = memory_budget
        self._budget: int | None = None
        self._choices: Bounded[ChunkChoice] = Bounded(MAX_CHOICES)

    def budget(self) -> int:
        if self._budget is None:
            self._budget = resolve_budget(self.memory_budget)
        return self._budget

    def choose(self, call: MappedCall, size: int, who: str) -> ChunkChoice:
        key = _signature(call)
        if key is not None:
            found = self._choices.get(key)
            if found is not None:
                return found
        budget = self.budget()
        choice = choose_chunk(call, size, budget)
        if not choice.fits:
            warnings.warn(
                f"{who}(chunk_size='auto'): even one example at a time needs "
                f"{_fmt(choice.temp)} of temporaries, over the memory budget of "
                f"{_fmt(budget)}; mapping {choice.chunk} at a time (the least memory "
                "measured). Raise `memory_budget`, or reduce the memory the function "
                "needs per example.",
                EqparWarning,
                stacklevel=4,
            )
        logger.debug(
            "%s(chunk_size='auto'): %d examples in chunks of %d; compiled "
            "temporaries %s (unchunked %s), budget %s; measured widths %s",
            who,
            size,
            choice.chunk,
            _fmt(choice.temp),
            _fmt(choice.unchunked_temp),
            _fmt(budget),
            {c: _fmt(t) for c, t in sorted(choice.probes.items())},
        )
        if key is not None:
            self._choices.put(key, choice)
        return choice


def _signature(call: MappedCall) -> Hashable | None:
    parts: list[Any] = []
    for leaf in call.leaves:
        if is_array(leaf):
            aval = jax.typeof(leaf)
            parts.append((aval.shape, aval.dtype, aval.weak_type))
        else:
            parts.append((type(leaf), leaf))
    key = (call.treedef, tuple(parts), tuple(call.index), tuple(call.axes), call.size)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _fmt(b: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= scale:
            return f"{b / scale:.1f} {unit}"
    return f"{b} B"
