"""Per-call dispatch of eqpar's compiling transforms on the paths users take, side by
side with raw JAX and Equinox in one run.

A small MLP (32 -> 64 -> 64 -> 32), batch 64, all devices; inputs pre-placed where
raw JAX has them unless a group says otherwise. Groups:

1. *Built once*: `filter_jit(filter_vmap)`, `filter_pmap`, `filter_shard_map` and
   `Parallel` (Auto mesh, `in_axes=(None, 0)`) against `jax.jit` on the params,
   `jax.pmap`, `jax.jit(jax.shard_map)` and Equinox's transforms.
2. *Leaves*: a Module of N arrays of shape (4,) and three static fields, N = 10,
   100, 1000, under `filter_jit`, against `jax.jit` on the flat leaf list.
3. *Two alternating shapes* (a training and an evaluation batch): per-call time of
   calls alternating the two against the mean of the single-shape figures.
4. *Threads*: several threads calling with mixed batch sizes, with a fresh function
   (cold: the first calls compile) and a warm one, against one thread making the
   same calls; every result compared with serial calls'.
5. *Paths*: inline wrappers, a fresh Module's method, an unplaced model, a model
   updated every step; traces counted on the inline paths.

    python -m benchmarks dispatch [--quick]
"""

import statistics
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from jaxtyping import Array

import eqpar

from ._common import Goal, interleaved, ratio_goal, Result, table, time_rows


BATCH = 64
SHAPES = (32, 64)  # alternating: a training batch and an evaluation batch
THREAD_BATCHES = (16, 32, 64)
LEAVES = {10: 1.3, 100: 1.1, 1000: 1.1}  # leaf count: goal for eqpar / jax.jit
HEADER = ["contender", "median µs/call", "min-max over rounds"]


def ours_fn(m: Any, x: Array) -> Array:
    return eqpar.filter_vmap(m)(x)


def eqx_fn(m: Any, x: Array) -> Array:
    return eqx.filter_vmap(m)(x)


class Setup(NamedTuple):
    """A compiling transform of `(model, x)` built once, its raw-JAX counterpart of
    `(params, x)` (and Equinox's, where it has one), with their inputs placed where
    raw JAX has them."""

    name: str
    make: Callable[[Callable], Callable]  # fn -> eqpar's transform of fn
    raw_name: str
    make_raw: Callable[[Callable], Callable]
    eqx: Callable | None
    batch: Callable[[Array], Array]  # a (rows, 32) batch, placed
    goal: float  # built once: eqpar / raw at most
    model: Any = None
    params: Any = None
    raw_fn: Any = None
    ours: Any = None
    raw: Any = None


def setups(model: Any, raw_fn: Callable) -> dict[str, Setup]:
    n = jax.device_count()
    mesh_p = jax.make_mesh((n,), ("i",), axis_types=(AxisType.Auto,))
    mesh = jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,))
    specs: Any = dict(mesh=mesh, in_specs=(P(), P("data")), out_specs=P("data"))

    def put(mesh: Any, spec: P) -> Callable[[Any], Any]:
        def place(tree: Any) -> Any:  # the arrays of a pytree
            arrays, rest = eqx.partition(tree, eqx.is_array)
            return eqx.combine(jax.device_put(arrays, NamedSharding(mesh, spec)), rest)

        return place

    rows_p = lambda x: put(mesh_p, P("i"))(x.reshape(n, -1, x.shape[-1]))  # noqa: E731
    shard_map = lambda f: jax.jit(jax.shard_map(f, **specs))  # noqa: E731
    both = [
        (put(mesh_p, P()), Setup("filter_pmap",
            lambda f: eqpar.filter_pmap(f, in_axes=(None, 0)), "jax.pmap",
            lambda f: jax.pmap(f, in_axes=(None, 0)),
            eqx.filter_pmap(eqx_fn, in_axes=(None, 0)), rows_p, 1.0)),
        (put(mesh, P()), Setup("filter_shard_map",
            lambda f: eqpar.filter_shard_map(f, **specs), "jax.jit(shard_map)",
            shard_map, None, put(mesh, P("data")), 1.05)),
        (put(mesh, P()), Setup("Parallel",
            lambda f: eqpar.Parallel(f, mesh=mesh, in_axes=(None, 0)),
            "jax.jit(shard_map)", shard_map, None, put(mesh, P("data")), 1.05)),
    ]  # fmt: skip
    same = lambda tree: tree  # noqa: E731
    jit = Setup("filter_jit", eqpar.filter_jit, "jax.jit", jax.jit,
                eqx.filter_jit(eqx_fn), same, 1.3)  # fmt: skip
    out = {}
    for place, s in [(same, jit), *both]:
        params = place(eqx.filter(model, eqx.is_array))
        out[s.name] = s._replace(
            model=place(model),
            params=params,
            raw_fn=raw_fn,
            ours=s.make(ours_fn),
            raw=s.make_raw(raw_fn),
        )
    return out


def check(fns: dict[str, Callable[[], Any]], ref: Any) -> None:
    for name, fn in fns.items():
        out = np.asarray(fn()).reshape(ref.shape)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5, err_msg=name)


# ---------------------------------------------------------------- 2. leaves


class Leaves(eqx.Module):
    arrays: tuple[Array, ...]
    name: str = eqx.field(static=True)
    scale: float = eqx.field(static=True)
    activation: Callable = eqx.field(static=True)


def leaves_fn(m: Leaves, x: Array) -> Array:
    """Trivial work that uses every leaf: the time is getting N arrays in."""
    return m.activation(x * jnp.sum(jnp.stack(m.arrays), axis=0)) * m.scale


def leaves_group(n: int) -> dict[str, Callable]:
    values = np.linspace(0.0, 1.0, 4 * n, dtype=np.float32).reshape(n, 4)
    model = Leaves(tuple(jax.device_put(list(values))), f"leaves{n}", 0.5, jnp.tanh)
    flat, treedef = jtu.tree_flatten(model)
    x = jnp.linspace(-1.0, 1.0, 64, dtype=jnp.float32).reshape(16, 4)
    raw = jax.jit(lambda flat, x: leaves_fn(jtu.tree_unflatten(treedef, flat), x))
    ours, theirs = eqpar.filter_jit(leaves_fn), eqx.filter_jit(leaves_fn)
    fns = {
        "jax.jit(leaf list)": lambda: raw(flat, x),
        "eqpar.filter_jit": lambda: ours(model, x),
        "eqx.filter_jit": lambda: theirs(model, x),
    }
    check(fns, np.asarray(leaves_fn(model, x)))
    return fns


# ---------------------------------------------------------------- 4. threads


def hammer(
    fn: Callable, pool: list, want: list, threads: int, calls: int, serial: bool
) -> tuple[float, int]:
    """`threads` threads (or, `serial`, the main thread alone) each making `calls`
    calls, thread t's i-th on `pool[(t + i) % len(pool)]`: the wall time, and the
    errors plus the results that differ from `want` (serial calls'). Each call
    waits for its result: many launches of multi-device programs in flight from
    several threads at once hang the CPU backend (raw `jax.pmap` too)."""
    jobs = [[(t + i) % len(pool) for i in range(calls)] for t in range(threads)]
    outs: list[list[Any]] = [[None] * calls for _ in range(threads)]
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i, j in enumerate(jobs[t]):
                outs[t][i] = jax.block_until_ready(fn(*pool[j]))
        except Exception as e:  # counted and reported, not raised
            errors.append(e)

    t0 = time.perf_counter()
    if serial:
        for t in range(threads):
            work(t)
    else:
        running = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for th in running:
            th.start()
        for th in running:
            th.join()
    wall = time.perf_counter() - t0
    wrong = sum(
        out is not None and not np.array_equal(np.asarray(out), want[j])
        for job, row in zip(jobs, outs)
        for j, out in zip(job, row)
    )
    for e in errors[:1]:
        print(f"  thread error: {e!r}")
    return wall, len(errors) + wrong


def threads_group(
    s: Setup, x: Array, threads: int, calls: int, rounds: dict[str, int], raw: bool
) -> dict[str, dict[str, Any]]:
    """{contender: {"serial"/"threads": [wall s], "bad": count}}: eqpar (and raw
    JAX), cold (a fresh function each run) and warm (the wrapper built once)."""
    out: dict[str, dict[str, Any]] = {}
    sides = [(f"eqpar.{s.name}", s.ours, s.model, s.make, ours_fn)]
    if raw:
        sides.append((s.raw_name, s.raw, s.params, s.make_raw, s.raw_fn))
    for name, warm, tree, make, fn in sides:
        pool = [(tree, s.batch(x[:b] * k)) for b in THREAD_BATCHES for k in (1, 2)]
        want = [np.asarray(warm(*args)) for args in pool]
        for state in ("cold", "warm"):
            walls: dict[str, Any] = {"serial": [], "threads": [], "bad": 0}
            for r in range(rounds[state]):
                for serial in (True, False) if r % 2 else (False, True):
                    f = warm if state == "warm" else make(lambda m, x: fn(m, x))
                    wall, bad = hammer(f, pool, want, threads, calls, serial)
                    walls["serial" if serial else "threads"].append(wall)
                    walls["bad"] += bad
            out[f"{name}, {state}"] = walls
    return out


# ---------------------------------------------------------------- 5. paths


TRACES = {"filter_jit inline": 0, "filter_pmap(m.__call__) of a fresh Module": 0}


def counted_fn(m: Any, x: Array) -> Array:
    TRACES["filter_jit inline"] += 1
    return ours_fn(m, x)


class Net(eqx.Module):
    mlp: eqx.nn.MLP
    counted: bool = eqx.field(static=True)

    def __call__(self, x: Array) -> Array:
        if self.counted:
            TRACES["filter_pmap(m.__call__) of a fresh Module"] += 1
        return jax.vmap(self.mlp)(x)


def paths(setups: dict[str, Setup], x: Array) -> dict[str, dict[str, Callable]]:
    jit, pmap = setups["filter_jit"], setups["filter_pmap"]
    model, xp, eqx_once = jit.model, pmap.batch(x), eqx.filter_jit(eqx_fn)
    groups: dict[str, dict[str, Callable]] = {}
    groups["inline: filter_jit(step)(model, x)"] = {
        "eqpar, inline": lambda: eqpar.filter_jit(counted_fn)(model, x),
        "eqpar, built once": lambda: jit.ours(model, x),
        "eqx, inline": lambda: eqx.filter_jit(eqx_fn)(model, x),
        "eqx, built once": lambda: eqx_once(model, x),
    }
    # Equinox's filter_pmap(m.__call__) of a fresh Module compiles on every call
    # (~0.2 s here): not timed.
    once = eqpar.filter_pmap(lambda m, x: m(x), in_axes=(None, 0))
    fresh = lambda counted: Net(jax.tree.map(lambda a: a, pmap.model), counted)  # noqa: E731
    groups["filter_pmap(m.__call__)(x), a fresh Module every call"] = {
        "eqpar, inline": lambda: eqpar.filter_pmap(fresh(True).__call__)(xp),
        "eqpar, built once": lambda: once(fresh(False), xp),
    }
    unplaced = eqx.nn.MLP(32, 32, 64, 2, key=jax.random.key(0))  # on one device
    groups["unplaced model, fresh from its constructor (same object)"] = {
        f"eqpar.{s.name}, {kind}": lambda s=s, m=m, xb=s.batch(x): s.ours(m, xb)
        for s in list(setups.values())[1:]
        for kind, m in (("unplaced", unplaced), ("pre-placed", s.model))
    }
    params, static = eqx.partition(model, eqx.is_array)

    def step(m: Any, x: Array) -> Any:
        p, s = eqx.partition(m, eqx.is_array)
        scale = 1.0 - 1e-3 * jnp.tanh(jnp.mean(jax.vmap(m)(x)))
        return eqx.combine(jax.tree.map(lambda a: a * scale, p), s)

    def raw_step(p: Any, x: Array) -> Any:
        return eqx.filter(step(eqx.combine(p, static), x), eqx.is_array)

    state: dict[str, Any] = {}
    group = groups["model updated every step (output fed back)"] = {}
    for name, f, start in (
        ("jax.jit(step) on params", jax.jit(raw_step), params),
        ("eqpar.filter_jit(step)", eqpar.filter_jit(step), model),
        ("eqx.filter_jit(step)", eqx.filter_jit(step), model),
    ):
        state[name] = start

        def call(name: str = name, f: Callable = f) -> Any:
            state[name] = f(state[name], x)
            return state[name]

        group[name] = call
    return groups


PATH_GOALS = [  # (group prefix, plot label, num, den, at most)
    ("inline", "inline jit / once", "eqpar, inline", "eqpar, built once", 1.2),
    ("inline", "inline jit / eqx", "eqpar, inline", "eqx, inline", 1.0),
    ("filter_pmap", "fresh pmap / once", "eqpar, inline", "eqpar, built once", 1.2),
    *(("unplaced", f"unplaced {n} / placed", f"eqpar.{n}, unplaced",
       f"eqpar.{n}, pre-placed", goal)
      for n, goal in (("filter_pmap", 1.2), ("filter_shard_map", 1.05),
                      ("Parallel", 1.05))),
    ("model updated", "updated jit / raw", "eqpar.filter_jit(step)",
     "jax.jit(step) on params", 1.2),
    ("model updated", "updated jit / eqx", "eqpar.filter_jit(step)",
     "eqx.filter_jit(step)", 1.0),
]  # fmt: skip


# ---------------------------------------------------------------- the run


class Report:
    """The timings, goals and markdown sections of one run."""

    def __init__(self, quick: bool):
        self.quick = quick
        self.calls, self.rounds, self.warmup = (10, 2, 2) if quick else (400, 9, 20)
        self.timed: dict[str, dict[str, list[float]]] = {}
        self.goals: list[Goal] = []
        self.bars: list[tuple[str, float, float, bool]] = []  # for the plot
        self.parts: list[str] = []

    def measure(self, title: str, fns: dict, calls: int | None = None) -> dict:
        print(f"  {title}", flush=True)
        calls = calls or self.calls
        self.timed[title] = interleaved(
            fns,
            calls=calls,
            rounds=self.rounds,
            block=jax.block_until_ready,
            warmup=self.warmup,
            alternate=True,
            settle=max(calls // 10, 1),
        )
        return self.timed[title]

    def ratio(
        self, label: str, what: str, num: list, den: list, at_most: float
    ) -> None:
        g = ratio_goal(what, num, den, at_most=at_most)
        self.goals.append(g)
        self.bars.append((label, g.value, at_most, g.met))

    def goal(
        self, label: str, title: str, s: dict, num: str, den: str, at_most: float
    ) -> None:
        self.ratio(label, f"{title}: {num} / {den}", s[num], s[den], at_most)

    def section(self, title: str, header: list, rows: list, note: str = "") -> None:
        self.parts.append(f"#### {title}\n\n{note}{table(header, rows)}")

    def timed_section(self, title: str, fns: dict, goals: list[tuple]) -> None:
        samples = self.measure(title, fns)
        self.section(title, HEADER, time_rows(samples, list(samples)))
        for label, num, den, at_most in goals:
            self.goal(label, title, samples, num, den, at_most)


def run_leaves(rep: Report) -> None:
    calls, sizes = max(rep.calls // 2, 5), list(LEAVES)[: 2 if rep.quick else 3]
    by_size = {k: rep.measure(f"2. leaves: {k}", leaves_group(k), calls) for k in sizes}

    def cell(s: list[float]) -> str:
        lo, hi = min(s) * 1e6, max(s) * 1e6
        return f"{statistics.median(s) * 1e6:.1f} ({lo:.0f}-{hi:.0f})"

    rows = [[name] + [cell(by_size[k][name]) for k in sizes] for name in by_size[10]]
    header = ["contender"] + [f"N = {k}: µs/call (min-max)" for k in sizes]
    title = f"2. leaves: N arrays of shape (4,) under filter_jit ({calls} calls)"
    rep.section(title, header, rows)
    for k in sizes:
        s, title = by_size[k], f"2. leaves, N = {k}"
        ours, raw, theirs = "eqpar.filter_jit", "jax.jit(leaf list)", "eqx.filter_jit"
        rep.goal(f"{k} leaves / raw", title, s, ours, raw, LEAVES[k])
        rep.goal(f"{k} leaves / eqx", title, s, ours, theirs, 1.0)


def run_alternating(rep: Report, setups: dict[str, Setup], x: Array) -> None:
    rows = []
    for s in setups.values():
        a, b = (s.batch(x[:rows]) for rows in SHAPES)
        fns = {}  # each side with one shape, the other, both in turn (2 calls)
        for side, f, m in (("eqpar", s.ours, s.model), ("raw", s.raw, s.params)):
            fns[f"{side} {SHAPES[0]}"] = lambda f=f, m=m: f(m, a)
            fns[f"{side} {SHAPES[1]}"] = lambda f=f, m=m: f(m, b)
            fns[f"{side} alternating"] = lambda f=f, m=m: (f(m, a), f(m, b))
        samples = rep.measure(f"3. alternating: {s.name}", fns)
        for side, label in (("eqpar", f"eqpar.{s.name}"), ("raw", s.raw_name)):
            alt = [t / 2 for t in samples[f"{side} alternating"]]
            one, two = samples[f"{side} {SHAPES[0]}"], samples[f"{side} {SHAPES[1]}"]
            mean = [(p + q) / 2 for p, q in zip(one, two)]
            what = f"3. alternating {SHAPES[0]} and {SHAPES[1]} rows: {label}, per "
            what += "call / mean of the two"
            if side == "eqpar":
                rep.ratio(f"alternating {s.name}", what, alt, mean, 1.1)
            g = ratio_goal(what, alt, mean, at_most=1.1)
            times = [f"{statistics.median(v) * 1e6:.1f}" for v in (one, two, alt)]
            rows.append([label, *times, f"{g.measured()} ({g.spread()})"])
    header = ["contender", *(f"{k} rows µs/call" for k in SHAPES)]
    header += ["alternating µs/call", "alternating / mean"]
    rep.section("3. two alternating shapes", header, rows)


def run_threads(rep: Report, setups: dict[str, Setup], x: Array) -> None:
    threads, calls = (2, 6) if rep.quick else (4, 200)
    rounds = {"cold": 1, "warm": 1} if rep.quick else {"cold": 3, "warm": 5}
    rows, total = [], threads * calls
    for s in setups.values():
        print(f"  4. threads: {s.name}", flush=True)
        group = threads_group(s, x, threads, calls, rounds, raw=not rep.quick)
        for name, w in group.items():
            rate = {k: total / statistics.median(w[k]) for k in ("serial", "threads")}
            speedup = f"{rate['threads'] / rate['serial']:.2f}x"
            rows.append([name, f"{rate['serial']:.0f}", f"{rate['threads']:.0f}",
                         speedup, str(w["bad"])])  # fmt: skip
            if not name.startswith("eqpar"):
                continue
            what = f"4. threads: {name}: wall time of {threads} threads x {calls} calls"
            what += " / one thread's making the same calls (throughput >= its)"
            rep.ratio(f"threads {name[6:]}", what, w["threads"], w["serial"], 1.0)
            n = (len(w["serial"]) + len(w["threads"])) * total
            what = f"4. threads: {name}: errors + results unlike serial calls'"
            rep.goals.append(Goal(f"{what} ({n} calls)", "exactly 0", w["bad"],
                                  w["bad"] == 0, unit="count"))  # fmt: skip
    note = (
        f"Batches of {', '.join(map(str, THREAD_BATCHES))} rows mixed. Cold: a "
        "fresh function each run (its first calls compile); warm: the wrapper "
        f"built once. Each call waits for its result (unwaited launches of "
        "multi-device programs from several threads hang the CPU backend, raw "
        "`jax.pmap` too). Calls/s over the wall time, median of "
        f"{rounds['cold']} cold and {rounds['warm']} warm runs; every result "
        "compared with serial calls' (exactly).\n\n"
    )
    header = ["contender", "1 thread calls/s", f"{threads} threads calls/s"]
    header += ["speed-up", "errors + wrong results"]
    rep.section(f"4. threads: {threads} x {calls} calls", header, rows, note)


def run(quick: bool = False) -> Result:
    rep = Report(quick)
    model = eqx.nn.MLP(32, 32, 64, 2, key=jax.random.key(0))
    static = eqx.filter(model, eqx.is_array, inverse=True)
    x = jax.random.normal(jax.random.key(1), (BATCH, 32))
    ref = np.asarray(jax.vmap(model)(x))

    def raw_fn(p: Any, x: Array) -> Array:  # what a raw-JAX user writes
        return jax.vmap(eqx.combine(p, static))(x)

    built = setups(model, raw_fn)
    for s in built.values():  # 1. built once
        xb, ours = s.batch(x), f"eqpar.{s.name}"
        fns = {
            s.raw_name: lambda s=s, xb=xb: s.raw(s.params, xb),
            ours: lambda s=s, xb=xb: s.ours(s.model, xb),
        }
        goals = [(f"{s.name} / raw", ours, s.raw_name, s.goal)]
        if s.eqx is not None:
            fns[f"eqx.{s.name}"] = lambda s=s, xb=xb: s.eqx(s.model, xb)
            goals.append((f"{s.name} / eqx", ours, f"eqx.{s.name}", 1.0))
        check(fns, ref)
        rep.timed_section(f"1. built once: {s.name}", fns, goals)
    run_leaves(rep)
    run_alternating(rep, built, x)
    run_threads(rep, built, x)
    TRACES.update(dict.fromkeys(TRACES, 0))
    for title, fns in paths(built, x).items():
        goals = [g[1:] for g in PATH_GOALS if title.startswith(g[0])]
        rep.timed_section(f"5. {title}", fns, goals)
    counts = ", ".join(f"{k}: {v}" for k, v in TRACES.items())
    worst, ok = max(TRACES.values()), set(TRACES.values()) == {1}
    what = f"5. traces per signature over every call ({counts})"
    rep.goals.append(Goal(what, "exactly 1", worst, ok, unit="count"))

    def plot(fig: Any) -> None:
        labels, values, limits, met = zip(*rep.bars)
        xs = range(len(labels))
        ax = fig.subplots(1, 1)
        ax.bar(xs, values, color=["tab:blue" if m else "tab:red" for m in met])
        ax.scatter(xs, limits, marker="_", color="k", s=60, label="goal: at most")
        ax.axhline(1.0, color="grey", linewidth=0.5)
        ax.set_yscale("log")
        ax.set_xticks(list(xs), labels, rotation=70, ha="right", fontsize=5)
        ax.set_ylabel("eqpar / baseline", fontsize=7)
        ax.set_title("dispatch: ratios of the goals (blue met, red not)", fontsize=8)
        ax.legend(fontsize=6)

    body = (
        f"Small MLP (32 -> 64 -> 64 -> 32), batch {BATCH}, {jax.device_count()} "
        f"devices; {rep.calls} calls x {rep.rounds} interleaved rounds per group; "
        "median µs per call (min-max over rounds). Goals are medians of per-round "
        "ratios.\n\n" + "\n\n".join(rep.parts)
    )
    title = "per-call dispatch on the paths users take"
    return Result("dispatch", title, body, rep.goals, plot)
