"""Memory of a sharded model: what each device holds, and what a training step needs.

A Megatron MLP block (`w1: "embed hidden"`, `w2: "hidden embed"` and biases) with its
Adam state, on a 2 x (devices / 2) `("data", "model")` mesh, placed by
`eqpar.partition_specs` four ways:

- replicated (`P()` everywhere): every device holds everything;
- tensor parallel (`dims={"hidden": "model"}`): the hidden dimension split over
  "model";
- FSDP (`dims={"embed": "data"}`): every parameter and moment split over "data";
- both (`dims={"hidden": "model", "embed": "data"}`).

Measured: the bytes of parameters and optimiser state on one device (read from the
placed arrays), and the compiled training step's temporaries and arguments per
device (XLA's `memory_analysis()`; nothing runs). Goals: each sharding holds at most
its share of a replica (1 / axis size for what it splits, plus what it leaves
replicated), and the step's arguments shrink alike.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.sharding import AxisType, PartitionSpec as P
from jaxtyping import Array, Float

import eqpar

from ._common import Goal, Result, table


class Block(eqx.Module):
    w1: Float[Array, "embed hidden"]
    b1: Float[Array, " hidden"]
    w2: Float[Array, "hidden embed"]
    b2: Float[Array, " embed"]

    def __call__(self, x: Float[Array, " embed"]) -> Float[Array, " embed"]:
        return jax.nn.gelu(x @ self.w1 + self.b1) @ self.w2 + self.b2


RULES: dict[str, dict[str, Any]] = {
    "replicated": {},
    "tensor parallel": {"hidden": "model"},
    "FSDP": {"embed": "data"},
    "tensor parallel + FSDP": {"hidden": "model", "embed": "data"},
}


def _block(embed: int, hidden: int) -> Block:
    k1, k2 = jax.random.split(jax.random.key(0))
    return Block(
        jax.random.normal(k1, (embed, hidden)) / embed**0.5,
        jnp.zeros(hidden),
        jax.random.normal(k2, (hidden, embed)) / hidden**0.5,
        jnp.zeros(embed),
    )


def _bytes_on_one_device(tree: Any) -> int:
    leaves = [a for a in jax.tree.leaves(tree) if eqx.is_array(a)]
    return sum(a.addressable_shards[0].data.nbytes for a in leaves)


def measure(embed: int, hidden: int, batch: int) -> dict[str, dict[str, float]]:
    n = jax.device_count()
    mesh = jax.make_mesh(
        (2, n // 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2
    )
    optimiser = optax.adam(1e-3)
    block = _block(embed, hidden)
    state = optimiser.init(eqx.filter(block, eqx.is_array))
    x = eqpar.filter_device_put(jnp.ones((batch, embed)), P("data"), mesh=mesh)
    out: dict[str, dict[str, float]] = {}
    for name, dims in RULES.items():
        specs = eqpar.partition_specs((block, state), dims=dims)
        model, st = eqpar.filter_device_put((block, state), specs, mesh=mesh)

        def step(model: Block, st: Any, x: Array) -> Any:
            grads = eqx.filter_grad(lambda m: jnp.mean(jax.vmap(m)(x) ** 2))(model)
            updates, st = optimiser.update(grads, st, model)
            new = (eqx.apply_updates(model, updates), st)
            return eqpar.filter_device_put(new, specs, mesh=mesh)

        with jax.numpy_dtype_promotion("standard"):  # optax's int32 step count
            compiled = eqpar.filter_jit(step).lower(model, st, x).compile()
        stats = compiled.memory_analysis()
        out[name] = {
            "held": _bytes_on_one_device((model, st)),
            "arguments": stats.argument_size_in_bytes,
            "temporaries": stats.temp_size_in_bytes,
        }
    return out


def run(quick: bool = False) -> Result:
    embed, hidden, batch = (64, 256, 32) if quick else (512, 2048, 256)
    n = jax.device_count()
    figures = measure(embed, hidden, batch)
    base = figures["replicated"]
    rows = [
        [
            name,
            f"{f['held'] / 2**20:.2f}",
            f"{f['held'] / base['held']:.3f}",
            f"{f['arguments'] / 2**20:.2f}",
            f"{f['temporaries'] / 2**20:.2f}",
        ]
        for name, f in figures.items()
    ]
    body = (
        f"Block embed {embed}, hidden {hidden}, Adam; batch {batch} on a 2 x {n // 2} "
        "(data, model) mesh of simulated CPU devices.\n\n"
        + table(
            [
                "placement",
                "MiB held per device",
                "of a replica",
                "step arguments MiB",
                "step temporaries MiB",
            ],
            rows,
        )
    )
    model_size, data_size = n // 2, 2
    # What each sharding splits: the weights (and their moments) dominate; biases
    # over the split dimension are split too, the others stay whole.
    bounds = {
        "tensor parallel": 1 / model_size + 0.05,
        "FSDP": 1 / data_size + 0.05,
        "tensor parallel + FSDP": 1 / (model_size * data_size) + 0.05,
    }
    measures = {"held": "bytes held per device", "arguments": "step arguments"}
    goals = [
        Goal(
            f"{name}: {what} / replicated's",
            f"<= {bound:.3f}",
            figures[name][key] / base[key],
            figures[name][key] / base[key] <= bound,
        )
        for key, what in measures.items()
        for name, bound in bounds.items()
    ]
    return Result("sharding", "memory of a sharded model", body, goals)
