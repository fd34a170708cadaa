"""Pipeline parallelism: the bubble of `eqpar.pipeline`'s GPipe schedule, and its
training step against the sequential fold on the same devices.

A stack of `L` residual MLP blocks on a 1-D mesh of `S = 4` stages. Contenders,
each a compiled training step (loss, gradients, Adam update, parameters fed back):

- fold: `jax.lax.scan` over all `L` layers, the stack replicated and the batch split
  over the same `S` devices (data parallelism: every device holds every layer);
- pipeline, `M` microbatches: `eqpar.pipeline`, the stack split over the stages.

The microbatch has a fixed number of rows, so the batch is `M` microbatches. Bubble:
in theory `(S - 1) / (M + S - 1)` of the schedule's steps; measured from the step
times: the pipelined step takes `T(M) = c + (M + S - 1) * tau` (one schedule step,
`tau`, and a fixed part, `c`: the update, the output's `psum`), so the bubble costs
`(S - 1) * tau / T(M)`, with `tau` and `c` fitted over the microbatch counts. Every
step of the schedule computes (idle stages run on zeros), so simulated devices, which
share the machine's cores, show the bubble as they would on real ones.

The pipeline reruns each stage forward in the backward pass (rematerialisation, as
GPipe does), so its work is `(M + S - 1) / M * 4 / 3` of the fold's: the goal for its
step time is that, with 25% to spare. Exact figures from the compiled step: no
all-gather of a stack's shape, and each device's arguments are its stage's share.
"""

import statistics
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, PartitionSpec as P
from jaxtyping import Array, Float

import eqpar

from ._common import Goal, interleaved, ratios, Result, table


STAGES = 4


class Block(eqx.Module):
    w1: Float[Array, "embed hidden"]
    b1: Float[Array, " hidden"]
    w2: Float[Array, "hidden embed"]

    def __init__(self, key: Any, embed: int, hidden: int):
        k1, k2 = jax.random.split(key)
        self.w1 = jax.random.normal(k1, (embed, hidden)) / embed**0.5
        self.b1 = jnp.zeros(hidden)
        self.w2 = jax.random.normal(k2, (hidden, embed)) / hidden**0.5

    def __call__(self, h: Float[Array, "batch embed"]) -> Float[Array, "batch embed"]:
        return h + jnp.tanh(h @ self.w1 + self.b1[None]) @ self.w2


def _fold(stack: Any, h: Any) -> Any:
    layers, shared = eqx.partition(stack, eqx.is_array)

    def body(h: Any, layer: Any) -> tuple[Any, None]:
        return eqx.combine(layer, shared)(h), None

    return jax.lax.scan(body, h, layers)[0]


def _step(forward: Callable[[Any, Any], Any], place: Callable[[Any], Any]) -> Any:
    optimiser = optax.adam(1e-3)

    def step(stack: Any, state: Any, x: Any) -> Any:
        loss = lambda s: jnp.mean((forward(s, x) - x) ** 2)  # noqa: E731
        value, grads = eqx.filter_value_and_grad(loss)(stack)
        updates, state = optimiser.update(grads, state, stack)
        return place(eqx.apply_updates(stack, updates)), state, value

    return jax.jit(step), optimiser


def _fit(n_steps: Any, times: Any) -> tuple[float, float]:
    """`(tau, c)` of `T = c + n_steps * tau`, least squares (`c = 0` for one point)."""
    if len(n_steps) < 2:
        return float(times[0] / n_steps[0]), 0.0
    tau, c = np.polyfit(n_steps, np.asarray(times), 1)
    return float(tau), float(c)


def run(quick: bool = False) -> Result:
    if quick:
        layers, embed, hidden, rows = 4, 16, 32, 4
        counts, steps, rounds = (1, 4), 2, 2
    else:
        layers, embed, hidden, rows = 16, 256, 1024, 32
        counts, steps, rounds = (1, 2, 4, 8, 16), 5, 15
    mesh = jax.make_mesh(
        (STAGES,),
        ("stage",),
        axis_types=(AxisType.Auto,),
        devices=jax.devices()[:STAGES],
    )
    keys = jax.random.split(jax.random.key(0), layers)
    stack = eqx.filter_vmap(lambda k: Block(k, embed, hidden))(keys)
    split = eqpar.filter_device_put(stack, P("stage"), mesh=mesh)
    whole = eqpar.filter_device_put(stack, P(), mesh=mesh)
    stack_bytes = sum(
        a.nbytes for a in jax.tree.leaves(eqx.filter(stack, eqx.is_array))
    )

    contenders: dict[str, list[Any]] = {}
    exact: dict[int, tuple[int, int, int]] = {}
    for m in counts:
        x = jax.random.normal(jax.random.key(m), (m * rows, embed))
        forward = lambda s, x, m=m: eqpar.pipeline(s, x, microbatches=m, mesh=mesh)  # noqa: E731
        step, opt = _step(
            forward, lambda s: eqpar.filter_device_put(s, P("stage"), mesh=mesh)
        )
        state = opt.init(eqx.filter(split, eqx.is_array))
        xp = eqpar.filter_device_put(x, P(), mesh=mesh)
        compiled = step.lower(split, state, xp).compile()
        text = compiled.as_text()
        shapes = {
            f"[{','.join(map(str, a.shape))}]"
            for a in jax.tree.leaves(eqx.filter(stack, eqx.is_array))
        }
        gathers = sum(
            " all-gather(" in ln
            and any(f"{s}{{" in ln.split("=", 1)[1] for s in shapes)
            for ln in text.splitlines()
            if "=" in ln
        )
        args = compiled.memory_analysis().argument_size_in_bytes
        exact[m] = (gathers, args, x.nbytes)
        contenders[f"pipeline M={m}"] = [step, [split, state], (xp,)]
        fold_step, fold_opt = _step(_fold, lambda s: s)
        fold_state = fold_opt.init(eqx.filter(whole, eqx.is_array))
        xd = eqpar.filter_device_put(x, P("stage"), mesh=mesh)  # data parallel
        contenders[f"fold M={m}"] = [fold_step, [whole, fold_state], (xd,)]

    def loop(name: str) -> Callable[[], Any]:
        def go() -> Any:
            fn, carry, data = contenders[name]
            for _ in range(steps):
                *carry, _ = fn(*carry, *data)
            contenders[name][1] = jax.block_until_ready(carry)

        return go

    samples = interleaved(
        {name: loop(name) for name in contenders},
        calls=1,
        rounds=rounds,
        block=lambda x: x,
        warmup=1,
        alternate=True,
        settle=1,
    )
    per_step = {k: [t / steps for t in v] for k, v in samples.items()}
    median = {k: statistics.median(v) for k, v in per_step.items()}

    # T(M) = c + (M + S - 1) * tau, fitted over the microbatch counts.
    n_steps = np.array([m + STAGES - 1 for m in counts], dtype=float)
    times = np.array([median[f"pipeline M={m}"] for m in counts])
    tau, c = _fit(n_steps, times)

    rows_out = []
    goals: list[Goal] = []
    measured_bubble = {}
    for m in counts:
        theory = (STAGES - 1) / (m + STAGES - 1)
        measured = (STAGES - 1) * tau / median[f"pipeline M={m}"]
        measured_bubble[m] = (theory, measured)
        r, lo, hi = ratios(per_step[f"pipeline M={m}"], per_step[f"fold M={m}"])
        work = (m + STAGES - 1) / m * 4 / 3
        gathers, args, x_bytes = exact[m]
        rows_out.append(
            [
                str(m),
                str(m * rows),
                f"{theory:.2f}",
                f"{measured:.2f}",
                f"{median[f'pipeline M={m}'] * 1e3:.2f}",
                f"{median[f'fold M={m}'] * 1e3:.2f}",
                f"{r:.2f} ({lo:.2f}-{hi:.2f})",
                f"{work:.2f}",
                str(gathers),
                f"{args / 1024:.0f}",
            ]
        )
        goals.append(
            Goal(
                f"M={m}: pipelined step / fold's (work {work:.2f}x of the fold's)",
                f"<= {1.25 * work:.2f}x",
                r,
                r <= 1.25 * work,
                lo,
                hi,
            )
        )
    top = counts[-1]
    theory, measured = measured_bubble[top]
    per_round = [  # the same fit on each round's times: the spread
        (STAGES - 1)
        * _fit(n_steps, [per_step[f"pipeline M={m}"][i] for m in counts])[0]
        / per_step[f"pipeline M={top}"][i]
        - theory
        for i in range(rounds)
    ]
    goals.append(
        Goal(
            f"M={top}: measured bubble - theory's {theory:.2f}",
            "within +-0.10",
            measured - theory,
            abs(measured - theory) <= 0.10,
            min(per_round),
            max(per_round),
            unit="",
        )
    )
    gathers_total = sum(g for g, _, _ in exact.values())
    goals.append(
        Goal(
            "all-gathers of a stack's shape in the compiled steps",
            "0",
            gathers_total,
            gathers_total == 0,
            unit="count",
        )
    )
    # Parameters and Adam's two moments, a stage's share each, and the batch.
    bound = 3 * stack_bytes / STAGES + max(b for _, _, b in exact.values()) + 1024
    worst = max(a for _, a, _ in exact.values())
    goals.append(
        Goal(
            "bytes of a device's step arguments / (its stage's share of parameters "
            "and Adam state, plus the batch)",
            "<= 1",
            worst / bound,
            worst <= bound,
            unit="",
        )
    )

    def plot(fig: Any) -> None:
        left, right = fig.subplots(1, 2)
        ms = list(counts)
        left.plot(ms, [measured_bubble[m][0] for m in ms], "o-", label="theory")
        left.plot(ms, [measured_bubble[m][1] for m in ms], "s--", label="measured")
        left.set_xscale("log", base=2)
        left.set_xlabel("microbatches M")
        left.set_ylabel("bubble fraction")
        left.legend()
        right.plot(
            ms, [median[f"pipeline M={m}"] * 1e3 for m in ms], "o-", label="pipeline"
        )
        right.plot(ms, [median[f"fold M={m}"] * 1e3 for m in ms], "s--", label="fold")
        right.set_xscale("log", base=2)
        right.set_xlabel(f"microbatches M ({rows} rows each)")
        right.set_ylabel("ms per training step")
        right.legend()

    body = (
        f"{layers} residual MLP blocks (embed {embed}, hidden {hidden}; "
        f"{stack_bytes / 2**20:.2f} MiB), {STAGES} stages of {layers // STAGES} "
        f"layers on {STAGES} simulated CPU devices (sharing this machine's cores), "
        f"{rows} rows per microbatch; Adam. {steps} steps x {rounds} interleaved "
        f"rounds per contender; median ms per step. Fitted schedule step "
        f"tau = {tau * 1e3:.3f} ms, fixed part c = {c * 1e3:.3f} ms.\n\n"
        + table(
            [
                "M",
                "batch",
                "bubble (theory)",
                "bubble (measured)",
                "pipeline ms/step",
                "fold ms/step",
                "pipeline / fold (min-max)",
                "work / fold's",
                "all-gathers of the stack",
                "argument KiB per device",
            ],
            rows_out,
        )
    )
    return Result(
        "pipeline", "GPipe bubble and step time against the fold", body, goals, plot
    )
