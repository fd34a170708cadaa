"""Deep models: a stack of identical blocks as one `eqpar.Stacked` (one scan) against
the same blocks unrolled (a Python list, one copy of the block's program per layer).

The training step of `L` MLP blocks (`w1: "embed hidden"`, `w2: "hidden embed"`),
under `eqpar.filter_jit` on a 2 x (devices / 2) `("data", "model")` mesh of
simulated CPU devices: tensor parallel over "model" (`dims={"hidden": "model"}`) and
FSDP over "data" (`dims={"embed": "data"}`, each layer gathered inside the scan body
with `gather=`), rematerialised (`remat=True`). Measured:

- compile time of the step (lowering and XLA compilation, a fresh program each
  time) at L = 8, 32, 64, stacked and unrolled; goal: stacked at L=64 within 1.5x of
  L=8 (the block is traced and compiled once, whatever L);
- per-device memory of the compiled stacked gradient and training step under FSDP
  (XLA's `memory_analysis()`, nothing runs); goals: the gradient's temporaries at
  most two layers' gathered parameters plus the activations (each layer's input,
  kept for the backward pass, and one layer's intermediates); the step's, that plus
  the gradient itself (sharded as the parameters, held until the update); no
  all-gather of a full-stack shape `(L, ...)` in the HLO;
- step time, stacked against unrolled, at L=8 (interleaved rounds); goal <= 1.1x.
"""

import re
import statistics
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec as P
from jaxtyping import Array, Float

import eqpar

from ._common import Goal, interleaved, ratio_goal, Result, table


class Block(eqx.Module):
    w1: Float[Array, "embed hidden"]
    w2: Float[Array, "hidden embed"]

    def __call__(self, x: Float[Array, "batch embed"]) -> Float[Array, "batch embed"]:
        return x + jnp.tanh(jax.nn.gelu(x @ self.w1) @ self.w2)


RULES = {"hidden": "model", "embed": "data"}
FSDP = {"embed": "data"}


def _make(embed: int, hidden: int) -> Any:
    def make(key: Any) -> Block:
        k1, k2 = jax.random.split(key)
        return Block(
            jax.random.normal(k1, (embed, hidden)) / embed**0.5,
            jax.random.normal(k2, (hidden, embed)) / hidden**0.5,
        )

    return make


def _mesh() -> Any:
    n = jax.device_count()
    return jax.make_mesh(
        (2, n // 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2
    )


def _setup(depth: int, embed: int, hidden: int, batch: int, mesh: Any) -> dict:
    """The stacked model, the same layers unrolled (a list, each layer placed with
    the block's specs), the batch, and each one's training step (fresh functions:
    a fresh program to compile)."""
    keys = jax.random.split(jax.random.key(0), depth)
    stack = eqpar.Stacked.build(
        _make(embed, hidden), keys, remat=True, dims=RULES, mesh=mesh
    )
    gather = eqpar.partition_specs(stack, dims=FSDP)
    layers = list(stack.unstacked())
    layer_specs = eqpar.partition_specs(layers[0], dims=RULES)
    layers = [eqpar.filter_device_put(b, layer_specs, mesh=mesh) for b in layers]
    x = jax.random.normal(jax.random.key(1), (batch, embed))
    x = eqpar.filter_device_put(x, P("data"), mesh=mesh)

    def stacked_loss(stack: eqpar.Stacked, x: Array) -> Array:
        return jnp.mean(stack.fold(x, gather=gather) ** 2)

    def unrolled_loss(layers: list, x: Array) -> Array:
        for layer in layers:
            whole = eqpar.filter_device_put(
                layer, eqpar.partition_specs(layer, dims={"hidden": "model"}), mesh=mesh
            )  # FSDP: each layer gathered over "data" where it is used
            x = jax.checkpoint(lambda b, v: b(v))(whole, x)
        return jnp.mean(x**2)

    def sgd(loss: Any) -> Any:
        def step(model: Any, x: Array) -> Any:
            grads = eqx.filter_grad(loss)(model, x)
            return jax.tree.map(lambda p, g: p - 1e-2 * g, model, grads)

        return step

    return {
        "stacked": (sgd(stacked_loss), stack),
        "unrolled": (sgd(unrolled_loss), layers),
        "gradient": (lambda m, x: eqx.filter_grad(stacked_loss)(m, x), stack),
        "x": x,
    }


def _compile(step: Any, model: Any, x: Array, mesh: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = jax.jit(step).lower(model, x).compile()
    return time.perf_counter() - t0, compiled


def _gathers_of_stack(hlo: str, depth: int) -> int:
    shapes = re.findall(r"= \w+\[([\d,]*)\][^ ]* all-gather", hlo)
    return sum(1 for s in shapes if s.count(",") >= 2 and s.startswith(f"{depth},"))


def run(quick: bool = False) -> Result:
    embed, hidden, batch = (32, 64, 16) if quick else (256, 1024, 64)
    depths = (2, 4, 8) if quick else (8, 32, 64)
    rounds, calls = (3, 3) if quick else (20, 10)
    mesh = _mesh()
    n = jax.device_count()

    compile_s: dict[str, dict[int, float]] = {"stacked": {}, "unrolled": {}}
    memory: dict[str, float] = {}
    warm = _setup(depths[0], embed, hidden, batch, mesh)  # JAX's first-use costs
    for name in ("stacked", "unrolled"):
        _compile(*warm[name], warm["x"], mesh)
    for depth in depths:
        setup = _setup(depth, embed, hidden, batch, mesh)
        for name in ("stacked", "unrolled"):
            step, model = setup[name]
            seconds, compiled = _compile(step, model, setup["x"], mesh)
            compile_s[name][depth] = seconds
            if name == "stacked" and depth == depths[-1]:
                memory["step"] = compiled.memory_analysis().temp_size_in_bytes
                memory["stack gathers"] = _gathers_of_stack(compiled.as_text(), depth)
        if depth == depths[-1]:
            _, compiled = _compile(*setup["gradient"], setup["x"], mesh)
            memory["gradient"] = compiled.memory_analysis().temp_size_in_bytes

    # Memory bound: two gathered layers, the carries kept for the backward pass
    # (one per layer), and one layer's intermediates, per device. The training
    # step also holds the gradient (sharded as the parameters) until the update.
    rows_per_device = batch // 2
    layer_gathered = 4 * 2 * embed * hidden // (n // 2)  # still split over "model"
    carries = 4 * rows_per_device * embed * depths[-1]
    one_layer = 4 * rows_per_device * (2 * hidden + 2 * embed)
    bound = 2 * layer_gathered + carries + one_layer
    gradient = 4 * 2 * embed * hidden * depths[-1] // n

    timed_depth = depths[0]
    setup = _setup(timed_depth, embed, hidden, batch, mesh)
    fns = {}
    for name in ("stacked", "unrolled"):
        step, model = setup[name]
        with jax.set_mesh(mesh):
            jitted = jax.jit(step)
        fns[name] = lambda j=jitted, m=model: j(m, setup["x"])

    def under_mesh(fn: Any) -> Any:
        def call() -> Any:
            with jax.set_mesh(mesh):
                return fn()

        return call

    samples = interleaved(
        {k: under_mesh(f) for k, f in fns.items()},
        calls=calls,
        rounds=rounds,
        block=jax.block_until_ready,
        warmup=2,
        alternate=True,
        settle=2,
    )

    rows = [
        [
            f"L = {d}",
            f"{compile_s['stacked'][d]:.2f}",
            f"{compile_s['unrolled'][d]:.2f}",
        ]
        for d in depths
    ]
    step_ms = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
    body = (
        f"MLP blocks embed {embed}, hidden {hidden}; batch {batch}; a 2 x {n // 2} "
        "(data, model) mesh of simulated CPU devices; tensor parallel over model, "
        "FSDP over data, remat.\n\n#### Compile time of the training step (s)\n\n"
        + table(["depth", "stacked", "unrolled"], rows)
        + f"\n\n#### Memory of the stacked step at L = {depths[-1]} (per device)\n\n"
        + table(
            ["measure", "bytes"],
            [
                ["temporaries of the gradient", f"{memory['gradient']:,.0f}"],
                ["bound: 2 gathered layers + activations", f"{bound:,.0f}"],
                ["temporaries of the training step", f"{memory['step']:,.0f}"],
                ["the gradient, sharded as the parameters", f"{gradient:,.0f}"],
                ["one gathered layer", f"{layer_gathered:,.0f}"],
                ["all-gathers of a (L, ...) shape", f"{memory['stack gathers']:.0f}"],
            ],
        )
        + f"\n\n#### Step time at L = {timed_depth} (ms, median)\n\n"
        + table(["model", "ms"], [[k, f"{v:.2f}"] for k, v in step_ms.items()])
    )
    first, last = depths[0], depths[-1]
    flat = compile_s["stacked"][last] / compile_s["stacked"][first]
    goals = [
        Goal(
            f"compile time, stacked, L={last} / L={first}",
            "<= 1.5x",
            flat,
            flat <= 1.5,
        ),
        Goal(
            f"temporaries of the stacked FSDP gradient at L={last} / (2 gathered "
            "layers + activations)",
            "<= 1x",
            memory["gradient"] / bound,
            memory["gradient"] <= bound,
        ),
        Goal(
            f"temporaries of the stacked FSDP training step at L={last} / (2 "
            "gathered layers + activations + the sharded gradient)",
            "<= 1x",
            memory["step"] / (bound + gradient),
            memory["step"] <= bound + gradient,
        ),
        Goal(
            "all-gathers of a full-stack shape in the HLO",
            "0",
            memory["stack gathers"],
            memory["stack gathers"] == 0,
            unit="count",
        ),
        ratio_goal(
            f"step time, stacked / unrolled, L={timed_depth}",
            samples["stacked"],
            samples["unrolled"],
            at_most=1.1,
        ),
    ]

    def plot(fig: Any) -> None:
        left, right = fig.subplots(1, 2)
        for name, marker in (("stacked", "o"), ("unrolled", "s")):
            left.plot(
                list(depths),
                [compile_s[name][d] for d in depths],
                marker=marker,
                label=name,
            )
        left.set_xlabel("layers L")
        left.set_ylabel("compile time (s)")
        left.set_title("training step compile time")
        left.legend()
        right.bar(list(step_ms), list(step_ms.values()), color=["C0", "C1"])
        right.set_ylabel("ms per step")
        right.set_title(f"step time at L = {timed_depth}")

    return Result(
        "deep", "stacked layers: compile time, memory, step time", body, goals, plot
    )
