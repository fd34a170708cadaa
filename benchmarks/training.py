"""Data-parallel training throughput: `eqpar.Parallel` against hand-written
`jax.jit(jax.shard_map(...))`.

An MLP 32 -> 256 -> 256 -> 10 (softmax cross-entropy), batch 512, SGD with
momentum, on all devices; each step's outputs (parameters, optimiser state) feed
the next step, as in a training loop. Contenders:

- `eqpar.Parallel(step, reduce="first", in_axes=(None, None, 0, 0),
  check_vma=True)`, the step taking gradients with `eqx.filter_grad` and averaging
  them with `eqpar.grad_mean`: with replication typing the updated parameters are
  known to be the same on every device and come back as they are;
- `Parallel`'s default (`check_vma=False`, `jax.pmap`'s semantics) with the step
  of `docs/migration.md` (`eqpar.filter_value_and_grad_mean`), and with Objax's
  idiom (`jax.lax.pmean` of `eqx.filter_grad`'s gradients): `Parallel` reads from
  the traced program which outputs are the same on every device (the updated
  parameters, after the `pmean`), and returns those as they are;
- the raw baseline: `jax.jit(jax.shard_map(step))` on the parameter arrays,
  `jax.grad` and `jax.lax.pmean` of the gradients (`check_vma=False`, as `pmap`
  code is written);
- `eqpar.filter_shard_map` of the eqpar step with `grad_mean`;
- a second compiled copy of the raw step (A/A control: the timing noise);
- one device, `jax.jit` of the full-batch step (reference).

The report lists the collectives each compiled step contains. All contenders are
checked against the one-device step first. Goal: `Parallel` within 5% of the raw
baseline's examples per second.
"""

import statistics
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from jaxtyping import Array, Float, Int

import eqpar

from ._common import (
    collectives,
    compiled_text,
    Goal,
    interleaved,
    ratio_goal,
    ratios,
    Result,
    same_program,
    table,
)


BATCH = 512
TOLERANCE = 0.05


def loss_fn(model: eqx.nn.MLP, x: Float[Array, "b 32"], y: Int[Array, " b"]) -> Array:
    logits = jax.vmap(model)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def run(quick: bool = False) -> Result:
    # Many short rounds: on a shared 2-core machine a round varies by +-30%, and
    # the median of per-round ratios needs ~40 rounds to resolve 5%.
    steps, rounds = (5, 4) if quick else (30, 40)
    devices = jax.device_count()
    kx, ky, km = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (BATCH, 32))
    y = jax.random.randint(ky, (BATCH,), 0, 10)
    model = eqx.nn.MLP(32, 10, 256, 2, key=km)
    params, static = eqx.partition(model, eqx.is_array)
    optimiser = optax.sgd(0.01, momentum=0.9)
    state = optimiser.init(params)

    # eqpar: the per-device step, with grad_mean
    mesh = jax.make_mesh((devices,), ("data",), axis_types=(AxisType.Auto,))

    def step(model: Any, state: Any, x: Any, y: Any) -> Any:
        grads = eqx.filter_grad(loss_fn)(eqpar.mark_varying(model, "data"), x, y)
        grads = eqpar.grad_mean(grads, "data")
        updates, state = optimiser.update(grads, state, model)
        return eqx.apply_updates(model, updates), state

    parallel = eqpar.Parallel(
        step,
        reduce="first",
        axis_name="data",
        in_axes=(None, None, 0, 0),
        mesh=mesh,
        check_vma=True,
    )

    # Parallel's default (check_vma=False): the migration page's step, and Objax's
    def migration_step(model: Any, state: Any, x: Any, y: Any) -> Any:
        _, grads = eqpar.filter_value_and_grad_mean(loss_fn, "data")(model, x, y)
        updates, state = optimiser.update(grads, state, model)
        return eqx.apply_updates(model, updates), state

    def objax_step(model: Any, state: Any, x: Any, y: Any) -> Any:
        grads = jax.lax.pmean(eqx.filter_grad(loss_fn)(model, x, y), "data")
        updates, state = optimiser.update(grads, state, model)
        return eqx.apply_updates(model, updates), state

    default_migration, default_objax = (
        eqpar.Parallel(
            f, reduce="first", axis_name="data", in_axes=(None, None, 0, 0), mesh=mesh
        )
        for f in (migration_step, objax_step)
    )

    # raw: jit(shard_map) on the parameter arrays, pmean of the gradients

    def raw_step(params: Any, state: Any, x: Any, y: Any) -> Any:
        grads = jax.grad(lambda p: loss_fn(eqx.combine(p, static), x, y))(params)
        grads = jax.lax.pmean(grads, "data")
        updates, state = optimiser.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    specs = (P(), P(), P("data"), P("data"))

    def make_raw() -> Callable:
        return jax.jit(
            jax.shard_map(
                raw_step, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=False
            )
        )

    raw = make_raw()
    sharded = eqpar.filter_shard_map(step, mesh=mesh, in_specs=specs, out_specs=P())

    def single_step(params: Any, state: Any, x: Any, y: Any) -> Any:
        grads = jax.grad(lambda p: loss_fn(eqx.combine(p, static), x, y))(params)
        updates, state = optimiser.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    single = jax.jit(single_step)

    def on(mesh: Any, tree: Any, spec: P) -> Any:
        arrays, rest = eqx.partition(tree, eqx.is_array)
        return eqx.combine(jax.device_put(arrays, NamedSharding(mesh, spec)), rest)

    d0 = jax.devices()[0]
    contenders: dict[str, tuple[Callable, Any, tuple]] = {
        "jax.jit(jax.shard_map) + pmean": (
            raw,
            on(mesh, (params, state), P()),
            (on(mesh, x, P("data")), on(mesh, y, P("data"))),
        ),
        "eqpar.Parallel(check_vma=True) + grad_mean": (
            parallel,
            on(mesh, (model, state), P()),
            (on(mesh, x, P("data")), on(mesh, y, P("data"))),
        ),
        "eqpar.filter_shard_map + grad_mean": (
            sharded,
            on(mesh, (model, state), P()),
            (on(mesh, x, P("data")), on(mesh, y, P("data"))),
        ),
        # A/A control: a second compiled copy of the raw step, timed alongside.
        "raw copy (A/A control)": (
            make_raw(),
            on(mesh, (params, state), P()),
            (on(mesh, x, P("data")), on(mesh, y, P("data"))),
        ),
        "jax.jit, 1 device": (
            single,
            jax.device_put((params, state), d0),
            jax.device_put((x, y), d0),
        ),
        "eqpar.Parallel (default) + filter_value_and_grad_mean": (
            default_migration,
            on(mesh, (model, state), P()),
            (on(mesh, x, P("data")), on(mesh, y, P("data"))),
        ),
        "eqpar.Parallel (default) + jax.lax.pmean(grads) (Objax)": (
            default_objax,
            on(mesh, (model, state), P()),
            (on(mesh, x, P("data")), on(mesh, y, P("data"))),
        ),
    }

    # Same parameters after 3 steps, every contender against one device.
    def train(fn: Callable, carry: Any, data: tuple, n: int) -> Any:
        for _ in range(n):
            carry = fn(*carry, *data)
        return jax.block_until_ready(carry)

    ref = eqx.filter(train(*contenders["jax.jit, 1 device"], n=3)[0], eqx.is_array)
    for name, (fn, carry, data) in contenders.items():
        got = eqx.filter(train(fn, carry, data, n=3)[0], eqx.is_array)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
            np.testing.assert_allclose(
                np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5
            )

    # What each compiled step communicates (all-reduce instructions and bytes).
    comms, texts = {}, {}
    for name, (fn, carry, data) in contenders.items():
        texts[name] = compiled_text(fn, *carry, *data)
        found = collectives(texts[name])
        comms[name] = ", ".join(
            f"{n} {kind} ({size / 1024:.0f} KiB)" for kind, (n, size) in found.items()
        )
    raw_text = texts["jax.jit(jax.shard_map) + pmean"]

    carries = {name: c[1] for name, c in contenders.items()}

    def loop(name: str) -> Callable[[], Any]:
        fn, _, data = contenders[name]

        def go() -> Any:
            carry = carries[name]
            for _ in range(steps):
                carry = fn(*carry, *data)
            carries[name] = jax.block_until_ready(carry)

        return go

    samples = interleaved(
        {name: loop(name) for name in contenders},
        calls=1,
        rounds=rounds,
        block=lambda x: x,
        warmup=2,
        alternate=True,
        settle=1,
    )
    per_step = {k: [t / steps for t in v] for k, v in samples.items()}
    raw_name, par_name, sm_name, _, one_name, mig_name, objax_name = list(contenders)
    rows = []
    for name, t in per_step.items():
        med = statistics.median(t)
        vs_raw = same = ""
        if name != raw_name:
            # throughput ratio = inverse time ratio, per round
            r, lo, hi = ratios(per_step[raw_name], t)
            vs_raw = f"{r:.2f}x ({lo:.2f}-{hi:.2f})"
        if name not in (raw_name, one_name):
            same = "yes" if same_program(texts[name], raw_text) else "no"
        rows.append(
            [
                name,
                str(1 if name == one_name else devices),
                f"{med * 1e3:.2f} ({min(t) * 1e3:.2f}-{max(t) * 1e3:.2f})",
                f"{BATCH / med:,.0f}",
                vs_raw,
                comms[name] or "none",
                same,
            ]
        )
    goals: list[Goal] = [
        ratio_goal(
            f"{name}: examples/s relative to {raw_name}",
            per_step[raw_name],
            per_step[name],
            within=TOLERANCE,
        )
        for name in (par_name, sm_name, mig_name, objax_name)
    ]

    def plot(fig: Any) -> None:
        ax = fig.subplots(1, 1)
        names = list(per_step)
        thr = [BATCH / statistics.median(per_step[k]) for k in names]
        lo = [BATCH / max(per_step[k]) for k in names]
        hi = [BATCH / min(per_step[k]) for k in names]
        ax.barh(names, thr, xerr=[np.subtract(thr, lo), np.subtract(hi, thr)])
        ax.set_xlabel(f"examples / second (batch {BATCH}, {devices} simulated devices)")
        ax.tick_params(axis="y", labelsize=8)

    body = (
        f"{steps} steps x {rounds} interleaved rounds per contender, outputs fed "
        "back; median ms per step (min-max over rounds). Throughput ratio against "
        "the raw baseline: median of per-round ratios (> 1 is faster). All "
        f"{devices} simulated devices share this machine's cores. The parameters "
        "and momentum are 2 x 76,810 floats (600 KiB); the gradients alone are "
        "300 KiB.\n\n"
        + table(
            [
                "contender",
                "devices",
                "ms/step (min-max)",
                "examples/s",
                "vs raw",
                "collectives in the compiled step",
                "same compiled program as raw",
            ],
            rows,
        )
    )
    return Result("training", "data-parallel MLP training", body, goals, plot)
