"""Model parallelism: shard a model by its own jaxtyping dimension names.

    python examples/model_parallel.py --devices 8 [--steps 5]

A two-layer block whose fields say what their dimensions are
(`w1: Float[Array, "embed hidden"]`, ...) and an `eqx.nn.Linear` head (no names:
sharded by a rule on its path) train on a 2 x (devices / 2) `("data", "model")`
mesh, four ways:

(a) Automatic (GSPMD): the unchanged `eqx.filter_grad` + optax Adam step under
    `eqpar.filter_jit`, the model and optimiser state placed by
    `eqpar.partition_specs` + `eqpar.filter_device_put`, the batch split over
    "data". Tensor parallelism (Megatron: the first layer split by columns, the
    second by rows, `dims={"hidden": "model"}`) and FSDP (every parameter and its
    Adam moments split over "data", `dims={"embed": "data"}`).
(b) Explicit (`eqpar.filter_shard_map`, `in_specs` read from where the arguments
    are placed): the same two with the collectives written out: a `psum` over
    "model" after the row-parallel layer; an `all_gather` of each FSDP parameter in
    the forward pass (its transpose is a reduce-scatter), and
    `eqpar.filter_value_and_grad_mean` for the exact mean gradient of parameters
    sharded over "data" and replicated ones alike.

Every run's parameters after the steps equal the same steps on one device, the
outputs stay sharded as placed, and the bytes each device holds are printed.
"""

import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from _common import (
    arrays,
    as_placed,
    finish,
    parser,
    per_device_bytes,
    rel_diff,
    setup_devices,
)
from jax.sharding import AxisType, PartitionSpec as P
from jaxtyping import Array, Float, PRNGKeyArray

import eqpar


EMBED, HIDDEN, OUT = 16, 64, 4


class Block(eqx.Module):
    """A Megatron MLP block: its fields name their dimensions."""

    w1: Float[Array, "embed hidden"]
    b1: Float[Array, " hidden"]
    w2: Float[Array, "hidden embed"]
    b2: Float[Array, " embed"]

    def __call__(self, x: Float[Array, " embed"]) -> Float[Array, " embed"]:
        return jax.nn.gelu(x @ self.w1 + self.b1) @ self.w2 + self.b2


class Model(eqx.Module):
    block: Block
    head: eqx.nn.Linear  # no dimension names: sharded by a path rule

    def __call__(self, x: Float[Array, " embed"]) -> Float[Array, " out"]:
        return self.head(x + self.block(x))


def make_model(key: PRNGKeyArray) -> Model:
    k1, k2, k3 = jax.random.split(key, 3)
    block = Block(
        jax.random.normal(k1, (EMBED, HIDDEN)) / EMBED**0.5,
        jnp.full(HIDDEN, 0.01),
        jax.random.normal(k2, (HIDDEN, EMBED)) / HIDDEN**0.5,
        jnp.zeros(EMBED),
    )
    return Model(block, eqx.nn.Linear(EMBED, OUT, key=k3))


def make_data(key: PRNGKeyArray, n: int) -> tuple[Array, Array]:
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (n, EMBED))
    return x, jnp.tanh(x @ jax.random.normal(kw, (EMBED, OUT)))


def loss_fn(model: Model, x: Array, y: Array) -> Array:
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)


OPTIMISER = optax.adam(1e-2)
# What each way shards: a dimension name, or a path rule where there is none.
TENSOR = dict(dims={"hidden": "model"})
FSDP = dict(dims={"embed": "data"}, paths=[(r"head\.weight", P(None, "data"))])


# ---------------------------------------------------------------- one device


def reference(model: Model, x: Array, y: Array, steps: int) -> tuple[Model, Any]:
    """The same steps on one device: the answer every sharded run must give."""

    @eqx.filter_jit
    def step(model: Model, state: Any) -> tuple[Model, Any]:
        grads = eqx.filter_grad(loss_fn)(model, x, y)
        updates, state = OPTIMISER.update(grads, state, model)
        return eqx.apply_updates(model, updates), state

    state = OPTIMISER.init(eqx.filter(model, eqx.is_array))
    for _ in range(steps):
        model, state = step(model, state)
    return model, state


# ---------------------------------------------------------------- (a) automatic


def automatic(model: Model, x: Array, y: Array, mesh: Any, rules: dict, steps: int):
    """GSPMD: the one-device step, unchanged, on placed inputs; the outputs are
    constrained to stay sharded as placed."""
    state = OPTIMISER.init(eqx.filter(model, eqx.is_array))
    specs = eqpar.partition_specs((model, state), **rules)
    model, state = eqpar.filter_device_put((model, state), specs, mesh=mesh)
    x, y = eqpar.filter_device_put((x, y), P("data"), mesh=mesh)

    @eqpar.filter_jit
    def step(model: Model, state: Any) -> tuple[Model, Any]:
        grads = eqx.filter_grad(loss_fn)(model, x, y)
        updates, state = OPTIMISER.update(grads, state, model)
        new = eqx.apply_updates(model, updates), state
        return eqpar.filter_device_put(new, specs, mesh=mesh)

    for _ in range(steps):
        model, state = step(model, state)
    return model, state, specs


# ---------------------------------------------------------------- (b) explicit


def tensor_parallel_loss(model: Model, x: Array, y: Array) -> Array:
    """One device's loss: its columns of the first layer, its rows of the second,
    then a `psum` over "model" of the partial outputs."""
    b = model.block
    hidden = jax.nn.gelu(x @ b.w1 + b.b1[None])
    out = eqpar.psum(hidden @ b.w2, "model") + b.b2[None]
    return jnp.mean((jax.vmap(model.head)(x + out) - y) ** 2)


def fsdp_loss(specs: Model) -> Callable[[Model, Array, Array], Array]:
    """One device's loss: each parameter gathered whole (`all_gather` over "data"
    along its sharded dimension) just before use."""

    def gather(x: Array, spec: P) -> Array:
        dims = [d for d, axes in enumerate(spec) if axes == "data"]
        return jax.lax.all_gather(x, "data", axis=dims[0], tiled=True) if dims else x

    def loss(model: Model, x: Array, y: Array) -> Array:
        whole = jax.tree.map(gather, model, specs, is_leaf=eqx.is_array)
        return loss_fn(whole, x, y)

    return loss


def explicit(
    model: Model,
    x: Array,
    y: Array,
    mesh: Any,
    rules: dict,
    loss: Callable[..., Array],
    steps: int,
):
    """`filter_shard_map`: the collectives written out, gradients averaged over
    "data" by `filter_value_and_grad_mean`, Adam applied to each device's shard."""
    state = OPTIMISER.init(eqx.filter(model, eqx.is_array))
    specs = eqpar.partition_specs((model, state), **rules)
    model, state = eqpar.filter_device_put((model, state), specs, mesh=mesh)
    x, y = eqpar.filter_device_put((x, y), P("data"), mesh=mesh)

    @eqpar.filter_shard_map(mesh=mesh, out_specs=specs)  # in_specs: as placed
    def step(model: Model, state: Any, x: Array, y: Array) -> tuple[Model, Any]:
        grads = eqpar.filter_grad_mean(loss, "data")(model, x, y)
        updates, state = OPTIMISER.update(grads, state, model)
        return eqx.apply_updates(model, updates), state

    for _ in range(steps):
        model, state = step(model, state, x, y)
    return model, state, specs


# ---------------------------------------------------------------- the run


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5, help="Adam steps")
    p.add_argument("--batch", type=int, default=64, help="examples per step")
    args = p.parse_args(argv)
    devices = setup_devices(args.devices)
    n = len(devices)
    if n < 2 or n % 2:
        raise SystemExit("model_parallel needs an even number of devices (>= 2)")
    mesh = jax.make_mesh(
        (2, n // 2),
        ("data", "model"),
        axis_types=(AxisType.Explicit, AxisType.Explicit),
        devices=devices,
    )
    auto = jax.make_mesh(
        (2, n // 2),
        ("data", "model"),
        axis_types=(AxisType.Auto, AxisType.Auto),
        devices=devices,
    )
    print(
        f"model parallelism on a 2 x {n // 2} (data, model) mesh, jax {jax.__version__}"
    )
    t0 = time.perf_counter()
    model = make_model(jax.random.key(0))
    x, y = make_data(jax.random.key(1), args.batch)
    with jax.numpy_dtype_promotion("standard"):
        ref_model, ref_state = reference(model, x, y, args.steps)
    replicated = per_device_bytes((ref_model, ref_state))

    runs = {
        "automatic, tensor parallel": lambda: automatic(
            model, x, y, auto, TENSOR, args.steps
        ),
        "automatic, FSDP": lambda: automatic(model, x, y, auto, FSDP, args.steps),
        "explicit, tensor parallel": lambda: explicit(
            model, x, y, mesh, TENSOR, tensor_parallel_loss, args.steps
        ),
    }
    fsdp_specs = eqpar.partition_specs(model, **FSDP)
    runs["explicit, FSDP"] = lambda: explicit(
        model, x, y, mesh, FSDP, fsdp_loss(fsdp_specs), args.steps
    )
    print(
        f"\n{'run':28s} {'params vs one device':>22s} {'bytes per device':>17s} "
        f"{'of replicated':>14s}"
    )
    results: dict[str, Any] = {"devices": n, "replicated bytes": replicated}
    checks: dict[str, bool] = {}
    for name, run in runs.items():
        # optax mixes Python floats with int32 step counts; eqpar's tests run JAX
        # with strict dtype promotion, which does not allow that.
        with jax.numpy_dtype_promotion("standard"):
            trained, state, specs = run()
        diff = max(rel_diff(a, b) for a, b in zip(arrays(trained), arrays(ref_model)))
        held = per_device_bytes((trained, state))
        print(f"{name:28s} {diff:22.1e} {held:17,d} {held / replicated:14.2f}")
        results[name] = {"max rel diff": diff, "bytes per device": held}
        checks[f"{name}: equals one device"] = diff < 1e-5
        checks[f"{name}: stays sharded as placed"] = as_placed((trained, state), specs)
        checks[f"{name}: holds less than a replica"] = held < replicated
    return finish(results, checks, t0)


if __name__ == "__main__":
    raise SystemExit(0 if all(main()["checks"].values()) else 1)
