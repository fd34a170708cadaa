"""Traces and compilations: exact counts, not timings.

A Python counter inside the traced function counts traces; a `jax.monitoring`
listener on JAX's backend-compile event counts XLA compilations. For each of
`eqpar.filter_jit`, `filter_pmap` and `filter_shard_map`:

- many calls that vary only array values (a new Module with new weights and a new
  input every call, same shapes; inputs pre-placed): goal exactly 1 trace and 1
  compilation;
- calls cycling through K distinct values of a Module's static field: goal exactly
  K traces (K after the first cycle and still K at the end: a repeated static value
  costs no new trace).

Also the time of a first call (trace + compile + run) of a fresh function,
`eqpar.filter_jit` against `eqx.filter_jit` (and `jax.jit` on the leaves), in
alternating repetitions.
"""

import statistics
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from jaxtyping import Array

import eqpar

from ._common import Goal, Result, table


class Model(eqx.Module):
    w: Array
    b: Array
    mode: int = eqx.field(static=True)
    activation: Callable = eqx.field(static=True)


_COMPILES = {"count": 0, "seconds": 0.0}
_LISTENING = []


def _listen() -> None:
    if _LISTENING:
        return

    def listener(event: str, duration: float, **kwargs: Any) -> None:
        del kwargs
        if event == "/jax/core/compile/backend_compile_duration":
            _COMPILES["count"] += 1
            _COMPILES["seconds"] += duration

    jax.monitoring.register_event_duration_secs_listener(listener)
    _LISTENING.append(listener)


class Counter:
    def __init__(self) -> None:
        self.traces = 0

    def wrap(self, fn: Callable) -> Callable:
        def counted(*args: Any) -> Any:
            self.traces += 1
            return fn(*args)

        return counted


def per_example(m: Model, x: Array) -> Array:
    return m.activation(m.w * x + m.b) * m.mode


def per_device(m: Model, x: Array) -> Array:
    return jax.vmap(per_example, in_axes=(None, 0))(m, x)


def transforms(devices: int) -> dict[str, tuple[Callable, Callable, Any]]:
    """{name: (make(counted_fn) -> transformed, place_model, x_sharding)}."""
    mesh_p = jax.make_mesh((devices,), ("i",), axis_types=(AxisType.Auto,))
    mesh = jax.make_mesh((devices,), ("data",))
    return {
        "eqpar.filter_jit": (
            lambda f: eqpar.filter_jit(f),
            lambda m: m,
            None,
        ),
        "eqpar.filter_pmap": (
            lambda f: eqpar.filter_pmap(f, in_axes=(None, 0), axis_name="i"),
            lambda m: jax.device_put(m, NamedSharding(mesh_p, P())),
            NamedSharding(mesh_p, P("i")),
        ),
        "eqpar.filter_shard_map": (
            lambda f: eqpar.filter_shard_map(
                f, mesh=mesh, in_specs=(P(), P("data")), out_specs=P("data")
            ),
            lambda m: jax.device_put(m, NamedSharding(mesh, P())),
            NamedSharding(mesh, P("data")),
        ),
    }


def inputs(
    calls: int, devices: int, place: Callable, sharding: Any, pmap: bool
) -> list[tuple[Model, Array]]:
    """`calls` (model, x) pairs with distinct values, placed up front."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(calls, 4)).astype(np.float32)
    b = rng.normal(size=(calls, 4)).astype(np.float32)
    shape = (devices, 2, 4) if pmap else (devices * 2, 4)
    x = rng.normal(size=(calls, *shape)).astype(np.float32)
    ws, bs = jax.device_put(list(w)), jax.device_put(list(b))
    xs = jax.device_put(list(x), sharding)
    models = [place(Model(wi, bi, 1, jnp.tanh)) for wi, bi in zip(ws, bs)]
    jax.block_until_ready((models, xs))
    return list(zip(models, xs))


def run(quick: bool = False) -> Result:
    _listen()
    calls = 100 if quick else 1000
    K = 5
    repeats = 2 if quick else 5
    devices = jax.device_count()
    goals: list[Goal] = []
    rows = []
    for name, (make, place, sharding) in transforms(devices).items():
        # 1. values only
        counter = Counter()
        fn = make(counter.wrap(per_device))
        data = inputs(calls, devices, place, sharding, pmap=name.endswith("pmap"))
        c0 = _COMPILES["count"]
        out = None
        for m, x in data:
            out = fn(m, x)
        jax.block_until_ready(out)
        compiles = _COMPILES["count"] - c0
        np.testing.assert_allclose(
            np.asarray(out),
            np.asarray(per_device(*jax.device_get(data[-1]))),
            rtol=1e-5,
            atol=1e-6,
        )
        rows.append(
            [
                name,
                f"{calls} calls, new array values",
                str(counter.traces),
                str(compiles),
            ]
        )
        goals.append(
            Goal(
                f"{name}: traces over {calls} calls varying only array values",
                "exactly 1",
                counter.traces,
                counter.traces == 1,
                unit="count",
            )
        )
        goals.append(
            Goal(
                f"{name}: compilations over the same calls",
                "exactly 1",
                compiles,
                compiles == 1,
                unit="count",
            )
        )
        # 2. cycling static values
        counter = Counter()
        fn = make(counter.wrap(per_device))
        m0, x0 = data[0]
        variants = [Model(m0.w, m0.b, k + 1, jnp.tanh) for k in range(K)]
        c0 = _COMPILES["count"]
        after_cycle = None
        for i in range(calls):
            out = fn(variants[i % K], x0)
            if i == K - 1:
                after_cycle = counter.traces
        jax.block_until_ready(out)
        compiles = _COMPILES["count"] - c0
        rows.append(
            [
                name,
                f"{calls} calls cycling {K} static values",
                f"{after_cycle} after the first cycle, {counter.traces} at the end",
                str(compiles),
            ]
        )
        goals.append(
            Goal(
                f"{name}: traces over {calls} calls cycling {K} static values "
                f"({after_cycle} after the first cycle)",
                f"exactly {K}, none after the first cycle",
                counter.traces,
                counter.traces == K and after_cycle == K,
                unit="count",
            )
        )
        goals.append(
            Goal(
                f"{name}: compilations over the same calls",
                f"exactly {K}",
                compiles,
                compiles == K,
                unit="count",
            )
        )

    # 3. a training-style loop feeding outputs back, started from unplaced inputs
    # (information, no goal: the first call's outputs live on the mesh, a new input
    # placement that jit traces and compiles for once more).
    mesh = jax.make_mesh((devices,), ("data",))
    counter = Counter()

    def step(m: Model, x: Array) -> Model:
        shift = eqpar.pmean(jnp.mean(x), "data")
        return Model(m.w + shift, m.b, m.mode, m.activation)

    loop = eqpar.filter_shard_map(
        counter.wrap(step), mesh=mesh, in_specs=(P(), P("data")), out_specs=P()
    )
    m = Model(jnp.ones(4), jnp.zeros(4), 1, jnp.tanh)
    x = jnp.ones((2 * devices, 4))
    c0 = _COMPILES["count"]
    for _ in range(calls):
        # Waited for each step: many launches of a program with collectives in
        # flight at once can deadlock the CPU backend's simulated devices on a
        # small machine (unplaced inputs used to throttle this loop by a transfer
        # per call; they are now placed once).
        m = jax.block_until_ready(loop(m, x))
    rows.append(
        [
            "eqpar.filter_shard_map",
            f"{calls} calls feeding outputs back, first inputs unplaced (no goal)",
            str(counter.traces),
            str(_COMPILES["count"] - c0),
        ]
    )

    # 4. first-call time, fresh functions, alternating
    first: dict[str, list[float]] = {
        "eqpar.filter_jit": [],
        "eqx.filter_jit": [],
        "jax.jit(leaves)": [],
    }
    compile_s: dict[str, list[float]] = {k: [] for k in first}
    model = Model(jnp.ones(4), jnp.zeros(4), 1, jnp.tanh)
    leaves, treedef = jtu.tree_flatten(model)
    x = jnp.ones((devices, 4))
    for r in range(repeats):
        fresh = {
            "eqpar.filter_jit": lambda: eqpar.filter_jit(
                lambda m, x: per_device(m, x) + r
            )(model, x),
            "eqx.filter_jit": lambda: eqx.filter_jit(lambda m, x: per_device(m, x) + r)(
                model, x
            ),
            "jax.jit(leaves)": lambda: jax.jit(
                lambda lv, x: per_device(jtu.tree_unflatten(treedef, lv), x) + r
            )(leaves, x),
        }
        order = list(fresh) if r % 2 == 0 else list(fresh)[::-1]
        for k in order:
            s0 = _COMPILES["seconds"]
            t0 = time.perf_counter()
            jax.block_until_ready(fresh[k]())
            first[k].append(time.perf_counter() - t0)
            compile_s[k].append(_COMPILES["seconds"] - s0)
    rows_t = [
        [
            k,
            f"{statistics.median(v) * 1e3:.1f} ({min(v) * 1e3:.1f}-{max(v) * 1e3:.1f})",
            f"{statistics.median(compile_s[k]) * 1e3:.1f}",
        ]
        for k, v in first.items()
    ]
    r = sorted(
        a / b for a, b in zip(first["eqpar.filter_jit"], first["eqx.filter_jit"])
    )
    rows_t.append(
        [
            "**eqpar / eqx**",
            f"**{statistics.median(r):.2f}x** ({r[0]:.2f}-{r[-1]:.2f})",
            "",
        ]
    )

    def plot(fig: Any) -> None:
        ax = fig.subplots(1, 1)
        names = list(first)
        meds = [statistics.median(first[k]) * 1e3 for k in names]
        comp = [statistics.median(compile_s[k]) * 1e3 for k in names]
        ax.barh(names, meds, label="first call (trace + compile + run)")
        ax.barh(names, comp, label="of which XLA compile")
        ax.set_xlabel("ms")
        ax.legend(fontsize=7)

    body = (
        f"{devices} devices. Traces counted by a counter in the traced function; "
        "compilations by a `jax.monitoring` listener on "
        "`/jax/core/compile/backend_compile_duration`.\n\n"
        + table(["transform", "calls", "traces", "compilations"], rows, "llrr")
        + f"\n\n#### First call of a fresh function ({repeats} alternating "
        "repetitions)\n\n"
        + table(
            ["contender", "first call ms (min-max)", "of which XLA compile ms"], rows_t
        )
    )
    return Result("retracing", "traces and compilations", body, goals, plot)
