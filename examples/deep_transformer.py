"""Deep models: a transformer of stacked blocks, trained tensor-parallel and FSDP.

    python examples/deep_transformer.py --devices 8 [--layers 8 --steps 4]

A small transformer whose `--layers` identical blocks (causal attention + MLP, their
fields named with jaxtyping: `wq: Float[Array, "embed heads head_dim"]`, ...) are
one `eqpar.Stacked`: built sharded (never whole on one device), applied by one scan
(the block traced once, whatever the depth), rematerialised in the backward pass.
It trains with Adam on a 2 x (devices / 2) `("data", "model")` mesh, with the heads
and the MLP's hidden units split over "model" (tensor parallelism) and every
parameter's `embed` dimension split over "data" (FSDP, each layer gathered in turn
inside the scan), two ways:

(a) automatic (GSPMD): the one-device step under `eqpar.filter_jit`;
(b) explicit (`eqpar.filter_shard_map`): a `psum` over "model" after the attention
    and the MLP, each layer's shards all-gathered over "data" in the scan body,
    `eqpar.filter_value_and_grad_mean` for the mean gradient.

Run (b) is checkpointed half-way with `eqpar.CheckpointManager` (into
`--out`/checkpoints), restored into a freshly built model, and finished. Every run's
parameters equal the same steps on one device with the blocks as a Python list
(unstacked).
"""

import pathlib
import shutil
import time
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
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

import eqpar


EMBED, HEADS, HEAD_DIM, HIDDEN, SEQ = 32, 4, 8, 64, 8


def rms_norm(x: Float[Array, "*b embed"], scale: Float[Array, " embed"]) -> Array:
    scale = jnp.broadcast_to(scale, x.shape)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale


class Block(eqx.Module):
    """Pre-norm causal self-attention and an MLP; the fields name their dimensions,
    so that `eqpar.partition_specs` shards them by name."""

    norm1: Float[Array, " embed"]
    wq: Float[Array, "embed heads head_dim"]
    wk: Float[Array, "embed heads head_dim"]
    wv: Float[Array, "embed heads head_dim"]
    wo: Float[Array, "heads head_dim embed"]
    norm2: Float[Array, " embed"]
    w1: Float[Array, "embed hidden"]
    w2: Float[Array, "hidden embed"]
    tp: str | None = eqx.field(static=True, default=None)  # explicit: the TP axis

    def reduce(self, x: Array) -> Array:
        """Sums the partial outputs of this device's heads / hidden units (explicit
        tensor parallelism); nothing to do on one device or under GSPMD."""
        return eqpar.psum(x, self.tp) if self.tp is not None else x

    def __call__(
        self, x: Float[Array, "batch seq embed"]
    ) -> Float[Array, "batch seq embed"]:
        h = rms_norm(x, self.norm1)
        q = jnp.einsum("bse,ehd->bhsd", h, self.wq)
        k = jnp.einsum("bse,ehd->bhsd", h, self.wk)
        v = jnp.einsum("bse,ehd->bhsd", h, self.wv)
        logits = jnp.einsum("bhsd,bhtd->bhst", q, k) / HEAD_DIM**0.5
        causal = jnp.tril(jnp.ones((SEQ, SEQ), dtype=bool))
        attn = jax.nn.softmax(jnp.where(causal, logits, -1e9), axis=-1)
        out = jnp.einsum("bhst,bhtd->bhsd", attn, v)
        x = x + self.reduce(jnp.einsum("bhsd,hde->bse", out, self.wo))
        h = jax.nn.gelu(rms_norm(x, self.norm2) @ self.w1)
        return x + self.reduce(h @ self.w2)


def make_block(key: PRNGKeyArray, tp: str | None = None) -> Block:
    kq, kk, kv, ko, k1, k2 = jax.random.split(key, 6)
    init = jax.nn.initializers.normal(0.1)
    return Block(
        jnp.ones(EMBED),
        init(kq, (EMBED, HEADS, HEAD_DIM)),
        init(kk, (EMBED, HEADS, HEAD_DIM)),
        init(kv, (EMBED, HEADS, HEAD_DIM)),
        init(ko, (HEADS, HEAD_DIM, EMBED)),
        jnp.ones(EMBED),
        init(k1, (EMBED, HIDDEN)),
        init(k2, (HIDDEN, EMBED)),
        tp,
    )


# What each parallelism shards, by dimension name (the layer axis stays whole).
TENSOR = {"heads": "model", "hidden": "model"}
FSDP = {"embed": "data"}
RULES = dict(dims=TENSOR | FSDP)
# Adam divides by sqrt(v) + eps: an `eps` far below the gradients' float32 rounding
# (about 1e-7 of the largest here) would turn rounding-level gradient entries,
# which differ between one device and a sharded sum, into full-size steps.
OPTIMISER = optax.adam(3e-3, eps=1e-3)


def loss_fn(blocks: Any, x: Array, y: Array, gather: PyTree = None) -> Float[Array, ""]:
    """Mean squared error of the stack's output (a Python list of blocks on one
    device; an `eqpar.Stacked` otherwise, each layer gathered as `gather` says)."""
    if isinstance(blocks, eqpar.Stacked):
        out = blocks.fold(x, gather=gather)
    else:
        out = x
        for block in blocks:
            out = block(out)
    return jnp.mean((out - y) ** 2)


def make_data(key: PRNGKeyArray, n: int) -> tuple[Array, Array]:
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (n, SEQ, EMBED))
    return x, jnp.tanh(jnp.cumsum(x, axis=1) @ jax.random.normal(kw, (EMBED, EMBED)))


# ---------------------------------------------------------------- one device


def reference(layers: list[Block], x: Array, y: Array, steps: int) -> list[Block]:
    """The same steps on one device, the blocks unstacked: the answer to give."""

    @eqx.filter_jit
    def step(layers: list[Block], state: Any) -> tuple[list[Block], Any]:
        grads = eqx.filter_grad(loss_fn)(layers, x, y)
        updates, state = OPTIMISER.update(grads, state, layers)
        return eqx.apply_updates(layers, updates), state

    state = OPTIMISER.init(eqx.filter(layers, eqx.is_array))
    for _ in range(steps):
        layers, state = step(layers, state)
    return layers


# ---------------------------------------------------------------- (a) automatic


def build(keys: Array, mesh: Any, tp: str | None = None) -> eqpar.Stacked:
    """The stack, born sharded on `mesh` (no device ever holds it whole)."""
    return eqpar.Stacked.build(
        lambda k: make_block(k, tp), keys, remat=True, **RULES, mesh=mesh
    )


def automatic(keys: Array, x: Array, y: Array, mesh: Any, steps: int) -> Any:
    stack = build(keys, mesh)
    state = OPTIMISER.init(eqx.filter(stack, eqx.is_array))
    specs = eqpar.partition_specs((stack, state), **RULES)
    gather = eqpar.partition_specs(stack, dims=FSDP)
    state = eqpar.filter_device_put(state, specs[1], mesh=mesh)
    x, y = eqpar.filter_device_put((x, y), P("data"), mesh=mesh)

    @eqpar.filter_jit
    def step(stack: eqpar.Stacked, state: Any) -> tuple[eqpar.Stacked, Any]:
        grads = eqx.filter_grad(loss_fn)(stack, x, y, gather)
        updates, state = OPTIMISER.update(grads, state, stack)
        new = eqx.apply_updates(stack, updates), state
        return eqpar.filter_device_put(new, specs, mesh=mesh)

    with jax.set_mesh(mesh):
        for _ in range(steps):
            stack, state = step(stack, state)
    return stack, state, specs


# ---------------------------------------------------------------- (b) explicit


def explicit_step(mesh: Any, specs: Any, gather: Any) -> Any:
    """One Adam step inside `filter_shard_map`: each device its batch rows, its
    heads and hidden units, its shard of every layer's `embed` dimension."""

    def step(
        stack: eqpar.Stacked, state: Any, x: Array, y: Array
    ) -> tuple[eqpar.Stacked, Any]:
        grads = eqpar.filter_grad_mean(loss_fn, "data")(stack, x, y, gather)
        updates, state = OPTIMISER.update(grads, state, stack)
        return eqx.apply_updates(stack, updates), state

    return eqpar.filter_shard_map(
        step,
        mesh=mesh,
        in_specs=(specs[0], specs[1], P("data"), P("data")),
        out_specs=specs,
    )


def explicit(
    keys: Array, x: Array, y: Array, mesh: Any, steps: int, directory: str
) -> Any:
    """Trains half the steps, checkpoints, restores into a fresh model, finishes."""
    stack = build(keys, mesh, tp="model")
    state = OPTIMISER.init(eqx.filter(stack, eqx.is_array))
    specs = eqpar.partition_specs((stack, state), **RULES)
    gather = eqpar.partition_specs(stack, dims=FSDP)
    state = eqpar.filter_device_put(state, specs[1], mesh=mesh)
    x, y = eqpar.filter_device_put((x, y), P("data"), mesh=mesh)
    step = eqpar.filter_jit(explicit_step(mesh, specs, gather))
    half = steps // 2
    with eqpar.CheckpointManager(directory) as ckpt:
        for i in range(half):
            stack, state = step(stack, state, x, y)
        ckpt.save(half, (stack, state))
        ckpt.wait()
        # A fresh start, as after a crash: build, then restore onto its shardings.
        fresh = build(jax.random.split(jax.random.key(99), len(keys)), mesh, "model")
        fresh_state = eqpar.filter_device_put(
            OPTIMISER.init(eqx.filter(fresh, eqx.is_array)), specs[1], mesh=mesh
        )
        stack, state = ckpt.restore((fresh, fresh_state))
        resumed_at = ckpt.latest_step()
    for i in range(resumed_at or 0, steps):
        stack, state = step(stack, state, x, y)
    return stack, state, specs


# ---------------------------------------------------------------- the run


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8, help="stacked blocks")
    p.add_argument("--steps", type=int, default=4, help="Adam steps")
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    args = p.parse_args(argv)
    devices = setup_devices(args.devices)
    n = len(devices)
    if n < 2 or n % 2 or HEADS % (n // 2):
        raise SystemExit("deep_transformer needs 2, 4 or 8 devices")
    mesh = jax.make_mesh(
        (2, n // 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2, devices=devices
    )
    print(
        f"a transformer of {args.layers} stacked blocks on a 2 x {n // 2} "
        f"(data, model) mesh, jax {jax.__version__}"
    )
    t0 = time.perf_counter()
    keys = jax.random.split(jax.random.key(0), args.layers)
    x, y = make_data(jax.random.key(1), args.batch)
    # optax mixes Python floats with int32 step counts; eqpar's tests run JAX with
    # strict dtype promotion, which does not allow that.
    with jax.numpy_dtype_promotion("standard"):
        ref = reference([make_block(k) for k in keys], x, y, args.steps)
        ref_loss = float(loss_fn(ref, x, y))
        replicated = per_device_bytes(ref) * 3  # parameters and two Adam moments
        directory = pathlib.Path(args.out).resolve() / "checkpoints"
        if directory.exists():  # a fresh run: no earlier checkpoint to resume
            shutil.rmtree(directory)
        runs = {
            "automatic (GSPMD)": automatic(keys, x, y, mesh, args.steps),
            "explicit, checkpointed": explicit(
                keys, x, y, mesh, args.steps, str(directory)
            ),
        }
    print(f"one device, unstacked: loss after {args.steps} steps {ref_loss:.5f}")
    print(f"\n{'run':24s} {'params vs one device':>21s} {'bytes per device':>17s}")
    results: dict[str, Any] = {"devices": n, "layers": args.layers, "loss": ref_loss}
    checks: dict[str, bool] = {}
    for name, (stack, state, specs) in runs.items():
        layers = [Block(*[getattr(b, f) for f in _ARRAYS]) for b in stack.unstacked()]
        diff = max(rel_diff(a, b) for a, b in zip(arrays(layers), arrays(ref)))
        held = per_device_bytes((stack, state))
        print(f"{name:24s} {diff:21.1e} {held:17,d}  (replicated: {replicated:,d})")
        results[name] = {"max rel diff": diff, "bytes per device": held}
        checks[f"{name}: equals one device"] = diff < 1e-5
        checks[f"{name}: stays sharded as placed"] = as_placed((stack, state), specs)
        checks[f"{name}: holds at most 2/{n} of a replica"] = (
            held <= replicated * 2 // n
        )
    return finish(results, checks, t0)


_ARRAYS = ["norm1", "wq", "wk", "wv", "wo", "norm2", "w1", "w2"]


if __name__ == "__main__":
    raise SystemExit(0 if all(main()["checks"].values()) else 1)
