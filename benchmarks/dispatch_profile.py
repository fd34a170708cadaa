"""Where a `filter_jit` call's time goes, piece by piece: the profile behind the
dispatch goals that are not met.

    python -m benchmarks.dispatch_profile [--leaves 10 1000] [--calls 20000]

Each piece of eqpar's hot path (`eqpar/_dispatch.py`, `Compiled.__call__`) is timed
on its own with `timeit` (best of 5 repeats, µs per call), beside the raw
`jax.jit` call it is compared with. Single pieces are timed without the async
backlog that the interleaved benchmarks include, so their sum is a lower bound.
Two rows measure what any Python between two `jax.jit` calls costs on this
machine: a loop unrelated to eqpar, alone and before each raw call.
"""

import argparse
import timeit
from collections.abc import Callable
from typing import Any


def pieces(leaves_count: int) -> dict[str, Callable[[], Any]]:
    """{piece: call} for a Module of `leaves_count` leaves (dispatch_scale's)."""
    import jax
    import jax.numpy as jnp
    import jax.tree_util as jtu

    import eqpar

    from .dispatch_scale import apply, make, per_device

    model = make(leaves_count)
    flat, treedef = jtu.tree_flatten(model)
    x = jnp.linspace(-1.0, 1.0, 64, dtype=jnp.float32).reshape(16, 4)
    raw = jax.jit(lambda ls, x: per_device(jtu.tree_unflatten(treedef, ls), x))
    wrapped = eqpar.filter_jit(
        lambda m, x: eqpar.filter_vmap(apply, in_axes=(None, 0))(m, x)
    )
    raw(flat, x)
    wrapped(model, x)
    compiled = wrapped._compiled  # noqa: SLF001 (a profile looks inside)
    fun = wrapped.__wrapped__
    wrapped(model, x)  # the second call records the Module (flatten once),
    wrapped(model, x)  # the third finds the compiled program by tokens
    from eqpar import _dispatch

    key, parts = _dispatch._fast_key(fun, (model, x), None)  # noqa: SLF001
    fast = compiled._fast[key]  # noqa: SLF001
    entry = fast.entry
    arrays = fast.arrays(parts)
    leaves, tree = jtu.tree_flatten((fun, (model, x), {}))
    shape = (tree, tuple(map(type, leaves)))
    plan = compiled._plans[shape]  # noqa: SLF001
    outs = entry.jitted(arrays)

    def busy() -> int:  # about as much Python as eqpar's fast path, unrelated to it
        total = 0
        for i in range(25):
            total += i
        return total

    jitted, recorded = entry.jitted, parts[0].arrays

    class Minimal:  # the least a filtered wrapper can do: no check at all
        def __call__(self, m: Any, x: Any) -> Any:
            return jitted(recorded + (x,))

    minimal = Minimal()

    return {
        "raw jax.jit on the flat leaves": lambda: raw(flat, x),
        "a wrapper with no checks (one call, recorded arrays + x, jit)": lambda: (
            minimal(model, x)
        ),
        "unrelated Python alone (a 25-step loop)": busy,
        "raw jax.jit + that loop before each call": lambda: (busy(), raw(flat, x)),
        "eqpar.filter_jit call (all of it)": lambda: wrapped(model, x),
        "fast: key (function, Module token, array type)": lambda: _dispatch._fast_key(  # noqa: SLF001
            fun, (model, x), None
        ),
        "fast: lookup": lambda: compiled._fast.get(key),  # noqa: SLF001
        "fast: array tuple (Module's recorded + x)": lambda: fast.arrays(parts),
        "jax.jit call on the array tuple": lambda: entry.jitted(arrays),
        "rebuild the output": lambda: entry.rebuild(outs, arrays),
        "general (a new Module): flatten (fun, args, kwargs)": lambda: jtu.tree_flatten(
            (fun, (model, x), {})
        ),
        "general: leaf types + plan lookup": lambda: compiled._plans[  # noqa: SLF001
            (tree, tuple(map(type, leaves)))
        ],
        "general: pick arrays and statics": lambda: (
            plan.arrays(leaves),
            plan.statics(leaves),
        ),
    }


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--leaves", type=int, nargs="+", default=[10, 1000])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--devices", type=int, default=8)
    args = parser.parse_args(argv)

    from ._common import machine, setup_devices, table

    setup_devices(args.devices)
    by_size = {n: pieces(n) for n in args.leaves}
    rows = []
    for name in by_size[args.leaves[0]]:
        row = [name]
        for n in args.leaves:
            calls = max(args.calls * 10 // (10 + n), 200)
            best = min(timeit.repeat(by_size[n][name], number=calls, repeat=5))
            row.append(f"{best / calls * 1e6:.2f}")
        rows.append(row)
    command = "python -m benchmarks.dispatch_profile " + " ".join(
        ["--leaves", *map(str, args.leaves), "--calls", str(args.calls)]
    )
    report = (
        f"## Dispatch profile\n\n{machine()}\n\nCommand: `{command}`\n\n"
        + table(
            ["piece", *(f"{n} leaves µs" for n in args.leaves)],
            rows,
            "l" + "r" * len(args.leaves),
        )
        + "\n"
    )
    print(report)
    return report


if __name__ == "__main__":
    main()
