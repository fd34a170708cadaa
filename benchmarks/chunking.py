"""Memory-bounded mapping: `filter_vmap(chunk_size="auto", memory_budget=B)` and
microbatched gradients.

Workloads (float32, one device):

- grid: QuantEcon's f(x, y) = cos(x^2 + y^2) / (1 + x^2 + y^2) on an n x n grid
  (n = 6000), reduced over y for every x (`filter_vmap(row_max)`), so each row is
  a real intermediate;
- ensemble: E MLPs (32 -> 256 -> 256 -> 10) mapped over their stacked weights, each
  applied to the same batch of 512 inputs;
- PSF: the demo microscope's point-spread function at P depths (`scope.psf`, a
  pupil, an inverse 2-D FFT and an intensity per depth).

For each, the unchunked map's compiled temporaries `T` (XLA's
`memory_analysis().temp_size_in_bytes`), then for budgets B from 1% to 100% of T
the chunk "auto" picks and the temporaries of the program it runs (compiled on its
own): the goal is <= B for every budget that one example fits (below
that, auto warns and maps one at a time; the table says so). Throughput: at
B = 10% of T, "auto" against every hand-picked chunk size (powers of two) whose
program fits B, timed interleaved; the goal is within 10% of the fastest.

Microbatched training: an MLP 64 -> 512 -> 512 -> 1, mean squared error, on all
devices (`filter_shard_map`), `filter_value_and_grad_mean(microbatch=k)` for k from
16 to the whole per-device batch: the step's temporaries against k (goal: they
scale with k, not with the batch), examples/s of k = batch/4 against the
unaccumulated step, and the gradient against the full-batch one-device gradient
(goal 1e-6). Compile count: the element function of a chunked map under
`filter_jit`, traced once per signature, for sizes with every kind of remainder.
"""

import statistics
import warnings
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

import eqpar
from eqpar.demo.optics import make_microscope

from ._common import blocking, Goal, interleaved, ratio_goal, Result, table


def mib(b: float) -> str:
    return f"{b / 2**20:.2f}"


# ---------------------------------------------------------------- workloads


def _f(x: Any, y: Any) -> Any:
    r2 = x**2 + y**2
    return jnp.cos(r2) / (1 + r2)


def _row_max(x: Any, y: Any) -> Any:
    return jnp.max(_f(x, y))


def grid_workload(quick: bool) -> tuple[Callable, tuple, Callable, int]:
    n = 1000 if quick else 6000
    x = jnp.linspace(-3.0, 3.0, n, dtype=jnp.float32)
    y = jnp.linspace(-3.0, 3.0, n, dtype=jnp.float32)

    def make(**kw: Any) -> Callable:
        return eqpar.filter_vmap(_row_max, in_axes=(0, None), **kw)

    def reference(x: Any, y: Any) -> Any:
        return jax.vmap(_row_max, in_axes=(0, None))(x, y)

    return make, (x, y), reference, n


def ensemble_workload(quick: bool) -> tuple[Callable, tuple, Callable, int]:
    members = 16 if quick else 64
    keys = jax.random.split(jax.random.key(0), members)
    ensemble = eqx.filter_vmap(lambda k: eqx.nn.MLP(32, 10, 256, 2, key=k))(keys)
    batch = jax.random.normal(jax.random.key(1), (512, 32))

    def member(model: Any, x: Any) -> Any:
        return jax.nn.log_softmax(jax.vmap(model)(x))

    def make(**kw: Any) -> Callable:
        return eqpar.filter_vmap(member, in_axes=(eqx.if_array(0), None), **kw)

    def reference(model: Any, x: Any) -> Any:
        return eqx.filter_vmap(member, in_axes=(eqx.if_array(0), None))(model, x)

    return make, (ensemble, batch), reference, members


def psf_workload(quick: bool) -> tuple[Callable, tuple, Callable, int]:
    size, planes = (64, 32) if quick else (256, 128)
    scope = make_microscope(size)
    zs = jnp.linspace(-4.0, 4.0, planes)

    def psf(scope: Any, z: Any) -> Any:
        return scope.psf(z)

    def make(**kw: Any) -> Callable:
        return eqpar.filter_vmap(psf, in_axes=(None, 0), **kw)

    def reference(scope: Any, z: Any) -> Any:
        return jax.vmap(scope.psf)(z)

    return make, (scope, zs), reference, planes


WORKLOADS = {
    "grid (QuantEcon, row max)": grid_workload,
    "ensemble of MLPs": ensemble_workload,
    "microscope PSF": psf_workload,
}


def _program(mapped: Callable) -> Callable:
    """`mapped` as one compiled program over the arrays of its arguments."""
    return eqpar.filter_jit(lambda *a: mapped(*a))


def _timed(
    programs: dict[str, Callable], args: tuple, quick: bool
) -> dict[str, list[float]]:
    """Seconds per call of each compiled program on `args`, waited for, in
    interleaved rounds."""
    fns = {k: blocking(lambda p=p: p(*args)) for k, p in programs.items()}
    return interleaved(
        fns,
        calls=3 if quick else 10,
        rounds=3 if quick else 9,
        block=lambda v: v,
        warmup=2,
    )


def _temps_of(mapped: Callable, args: tuple) -> int:
    lowered = _program(mapped).lower(*args)  # type: ignore[attr-defined]
    return int(lowered.lowered.compile().memory_analysis().temp_size_in_bytes)


def budgets(
    make: Callable, args: tuple, reference: Callable, size: int, fractions: tuple
) -> tuple[list[list[str]], bool, int, int]:
    unchunked = _temps_of(make(), args)
    one = _temps_of(make(chunk_size=1), args)  # the least any chunk can need
    expect = reference(*args)
    rows, ok, met = [], True, 0
    for fraction in fractions:
        budget = max(1, int(unchunked * fraction))
        mapped = make(chunk_size="auto", memory_budget=budget)
        with warnings.catch_warnings():  # a budget below one example warns
            warnings.simplefilter("ignore", eqpar.EqparWarning)
            chunk = eqpar.chosen_chunk_size(mapped, *args)
        measured = _temps_of(mapped, args)
        out = _program(mapped)(*args)
        close = bool(
            np.allclose(np.asarray(out), np.asarray(expect), rtol=1e-4, atol=1e-5)
        )
        fits = measured <= budget
        feasible = one <= budget
        if feasible:
            ok = ok and fits and close
            met += fits and close
        rows.append(
            [
                f"{fraction:.0%}",
                mib(budget),
                f"{chunk} of {size}",
                mib(measured),
                ("yes" if fits else "**no**")
                if feasible
                else f"below one example ({mib(one)} MiB): not possible",
                "yes" if close else "**no**",
            ]
        )
    return rows, ok, unchunked, met


def throughput(
    make: Callable, args: tuple, size: int, unchunked: int, quick: bool
) -> tuple[list[list[str]], Goal]:
    budget = max(1, unchunked // 10)
    auto = make(chunk_size="auto", memory_budget=budget)
    chosen = eqpar.chosen_chunk_size(auto, *args)
    hand = [c for c in (2**k for k in range(0, 14)) if c < size]
    fitting: list[int] = []  # the largest that fit: the fastest candidates
    for c in reversed(hand):  # compiled from the largest down, until enough fit
        if _temps_of(make(chunk_size=c), args) <= budget:
            fitting.insert(0, c)
            if len(fitting) == (2 if quick else 4):
                break
    programs = {"auto": _program(auto)}
    for c in fitting:
        programs[f"chunk {c}"] = _program(make(chunk_size=c))
    samples = _timed(programs, args, quick)
    medians = {k: statistics.median(v) for k, v in samples.items()}
    best = min((k for k in medians if k != "auto"), key=medians.__getitem__)
    rows = [
        [
            k,
            f"{medians[k] * 1e3:.2f}",
            f"{min(samples[k]) * 1e3:.2f}-{max(samples[k]) * 1e3:.2f}",
        ]
        for k in programs
    ]
    goal = ratio_goal(
        f"auto (chunk {chosen}) vs best hand-picked ({best}) at 10% budget: time",
        samples["auto"],
        samples[best],
        at_most=1.10,
    )
    return rows, goal


# ---------------------------------------------------------------- training


def _mse(model: Any, x: Any, y: Any) -> Any:
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)


def training(quick: bool) -> tuple[str, list[Goal]]:
    devices = jax.device_count()
    per = 256 if quick else 1024
    model = eqx.nn.MLP(64, 1, 512, 2, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (devices * per, 64))
    y = jnp.sin(x[:, :1])
    mesh = eqpar.data_mesh("data")

    def step(microbatch: int | None) -> Callable:
        return eqpar.filter_shard_map(
            lambda m, x, y: eqpar.filter_value_and_grad_mean(
                _mse, "data", microbatch=microbatch
            )(m, x, y),
            mesh=mesh,
            in_specs=(P(), P("data"), P("data")),
            out_specs=P(),
        )

    ref_value, ref_grads = eqx.filter_jit(eqx.filter_value_and_grad(_mse))(model, x, y)
    ks = [k for k in (16, 64, per // 4, per) if k <= per]
    ks = sorted(set(ks))
    rows, worst = [], 0.0
    memory = {}
    for k in ks:
        s = step(None if k == per else k)
        lowered = s.lower(model, x, y)  # type: ignore[attr-defined]
        memory[k] = int(lowered.lowered.compile().memory_analysis().temp_size_in_bytes)
        value, grads = s(model, x, y)
        diffs = [
            float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
            for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads))
        ]
        worst = max(worst, max(diffs), abs(float(value) - float(ref_value)))
        rows.append([str(k) + (" (whole batch)" if k == per else ""), mib(memory[k])])
    quarter = per // 4
    programs = {"unaccumulated": step(None), f"microbatch={quarter}": step(quarter)}
    samples = _timed(programs, (model, x, y), quick)
    # examples/s ratio = time(unaccumulated) / time(microbatched)
    speed = ratio_goal(
        f"microbatch={quarter} vs unaccumulated: examples/s",
        samples["unaccumulated"],
        samples[f"microbatch={quarter}"],
        at_most=10.0,
    )
    speed.target = ">= 0.90x"
    speed.met = speed.value >= 0.90
    slope = memory[ks[-2]] / max(memory[ks[0]], 1)
    goals = [
        Goal(
            f"step temporaries: microbatch {ks[0]} vs {ks[-2]} (ratio of k: "
            f"{ks[-2] / ks[0]:g})",
            "grows with k (> 1x), whole batch largest",
            slope,
            slope > 1.0 and memory[ks[-1]] > memory[ks[-2]],
            unit="x",
        ),
        speed,
        Goal(
            "microbatched gradients vs one-device full batch: max |diff|",
            "<= 1e-6",
            worst,
            worst <= 1e-6,
            unit="",
        ),
    ]
    body = (
        f"MLP 64 -> 512 -> 512 -> 1, {per} examples per device on {devices} devices "
        "(`filter_shard_map`, `filter_value_and_grad_mean(microbatch=k)`).\n\n"
        + table(["microbatch k", "step temporaries MiB"], rows)
        + "\n\n"
        + table(
            ["step", "median ms", "min-max ms"],
            [
                [
                    k,
                    f"{statistics.median(v) * 1e3:.2f}",
                    f"{min(v) * 1e3:.2f}-{max(v) * 1e3:.2f}",
                ]
                for k, v in samples.items()
            ],
        )
    )
    return body, goals


def compile_count() -> Goal:
    traces = []
    for n in (64, 65, 79, 127):
        count = [0]

        def f(x: Any, count: list = count) -> Any:
            count[0] += 1
            return jnp.sin(x).sum()

        run = eqpar.filter_jit(lambda x, f=f: eqpar.filter_vmap(f, chunk_size=16)(x))
        run(jnp.ones((n, 8)))
        traces.append(count[0])
    return Goal(
        "chunked map under filter_jit, sizes 64/65/79/127 at chunk 16: traces of "
        "the element function per signature",
        "1 each",
        max(traces),
        all(t == 1 for t in traces),
        unit="count",
    )


def run(quick: bool = False) -> Result:
    fractions = (0.01, 0.1, 1.0) if quick else (0.01, 0.03, 0.1, 0.3, 1.0)
    goals: list[Goal] = []
    sections = []
    for name, workload in WORKLOADS.items():
        make, args, reference, size = workload(quick)
        rows, ok, unchunked, met = budgets(make, args, reference, size, fractions)
        goals.append(
            Goal(
                f"{name}: budgets {fractions[0]:.0%}-{fractions[-1]:.0%} of the "
                "unchunked temporaries where one example fits: temporaries <= "
                "budget and outputs = unchunked (count of budgets)",
                "all",
                met,
                ok,
                unit="count",
            )
        )
        t_rows, t_goal = throughput(make, args, size, unchunked, quick)
        goals.append(t_goal)
        sections.append(
            f"#### {name}\n\nUnchunked temporaries {mib(unchunked)} MiB.\n\n"
            + table(
                [
                    "budget",
                    "MiB",
                    "auto chunk",
                    "temporaries MiB",
                    "fits",
                    "= unchunked",
                ],
                rows,
            )
            + "\n\n"
            + table(["at 10% budget", "median ms", "min-max ms"], t_rows)
        )
    train_body, train_goals = training(quick)
    goals += train_goals
    goals.append(compile_count())
    body = (
        "Compiled temporaries from XLA's `memory_analysis()` of each program "
        "compiled on its own; times are medians of interleaved rounds.\n\n"
        + "\n\n".join(sections)
        + "\n\n#### Microbatched training\n\n"
        + train_body
    )
    return Result(
        "chunking",
        "chunk_size='auto' under a memory budget; microbatched gradients",
        body,
        goals,
    )
