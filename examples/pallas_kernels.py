"""Pallas kernels under replication typing: a small MLP whose layers are Pallas kernels.

    python examples/pallas_kernels.py --devices 8 [--steps 20 --batch 64 --width 32]

Each dense layer is a Pallas matmul-plus-bias kernel (`interpret=True`, so it runs on
CPU) with a Pallas backward pass (`jax.custom_vjp`), made usable inside
`eqpar.filter_shard_map` with replication checking on (`check_vma=True`) by
`eqpar.kernel`: no `manual_axis_type` on its `out_shape`, no `jax.lax.pcast` where
the replicated weights meet the sharded batch.

(a) Training: the batch is split over the devices, the parameters replicated, and
    `eqpar.filter_value_and_grad_mean` gives the mean gradient; a few SGD steps equal
    one device's training with the same kernels on the whole batch.
(b) The compiled step all-reduces each parameter's gradient once, and the loss: the
    HLO is read and its all-reduced arrays counted.
"""

import re
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from _common import finish, parser, rel_diff, setup_devices
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float

import eqpar


# ---------------------------------------------------------------- the kernels


def _dense_body(x_ref, w_ref, b_ref, o_ref):
    o_ref[...] = jnp.dot(x_ref[...], w_ref[...]) + b_ref[...]


def pallas_dense(
    x: Float[Array, "m k"], w: Float[Array, "k n"], b: Float[Array, "1 n"]
) -> Float[Array, "m n"]:
    """`x @ w + b` in Pallas, one row of `x` per grid step."""
    (m, k), n = x.shape, w.shape[1]
    return pl.pallas_call(
        _dense_body,
        out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
        grid=(m,),
        in_specs=[
            pl.BlockSpec((1, k), lambda i: (i, 0)),
            pl.BlockSpec((k, n), lambda i: (0, 0)),
            pl.BlockSpec((1, n), lambda i: (0, 0)),
        ],
        out_specs=pl.BlockSpec((1, n), lambda i: (i, 0)),
        interpret=True,
    )(x, w, b)


@jax.custom_vjp
def dense(x, w, b):
    return pallas_dense(x, w, b)


def _dense_fwd(x, w, b):
    return pallas_dense(x, w, b), (x, w)


def _dense_bwd(saved, g):
    x, w = saved
    zeros = lambda n: jnp.zeros((1, n), g.dtype)  # noqa: E731
    dx = pallas_dense(g, w.T, zeros(w.shape[0]))
    dw = pallas_dense(x.T, g, zeros(g.shape[1]))
    return dx, dw, jnp.sum(g, axis=0, keepdims=True)


dense.defvjp(_dense_fwd, _dense_bwd)


class Dense(eqx.Module):
    """A layer whose forward and backward passes are Pallas kernels."""

    weight: Float[Array, "inp out"]
    bias: Float[Array, "1 out"]

    def __init__(self, inp: int, out: int, *, key: Array):
        self.weight = jax.random.normal(key, (inp, out)) / jnp.sqrt(inp)
        self.bias = jnp.zeros((1, out))

    @eqpar.kernel
    def __call__(self, x: Float[Array, "m inp"]) -> Float[Array, "m out"]:
        return dense(x, self.weight, self.bias)


class MLP(eqx.Module):
    layers: tuple[Dense, ...]

    def __init__(self, sizes: list[int], *, key: Array):
        keys = jax.random.split(key, len(sizes) - 1)
        self.layers = tuple(
            Dense(a, b, key=k) for a, b, k in zip(sizes[:-1], sizes[1:], keys)
        )

    def __call__(self, x: Float[Array, "m inp"]) -> Float[Array, "m out"]:
        for layer in self.layers[:-1]:
            x = jnp.tanh(layer(x))
        return self.layers[-1](x)


def loss(model: MLP, x: Array, y: Array) -> Array:
    return jnp.mean((model(x) - y) ** 2)


def sgd(model: Any, grads: Any, lr: float) -> Any:
    return jax.tree.map(lambda p, g: p - lr * g, model, grads)


def all_reduced_arrays(hlo: str) -> int:
    """Arrays all-reduced by a compiled program (XLA combines several into one
    instruction with a tuple result)."""
    results = re.findall(r"= (\(.*?\)|\S+) all-reduce(?:-start)?\(", hlo)
    return sum(len(re.findall(r"\w+\[[^\]]*\]", r)) for r in results)


# ---------------------------------------------------------------- the program


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="SGD steps")
    p.add_argument("--batch", type=int, default=64, help="global batch size")
    p.add_argument("--width", type=int, default=32, help="hidden layer width")
    p.add_argument("--lr", type=float, default=0.05, help="learning rate")
    args = p.parse_args(argv)
    devices = setup_devices(args.devices)
    t0 = time.perf_counter()
    n = len(devices)
    if args.batch % n:
        raise SystemExit(f"--batch {args.batch} is not a multiple of {n} devices")

    mesh = jax.make_mesh((n,), ("data",), devices=devices)
    kx, km = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (args.batch, 4))
    y = jnp.sin(x[:, :1]) * jnp.cos(x[:, 1:2]) + 0.1 * x[:, 2:3]
    model = MLP([4, args.width, args.width, 1], key=km)

    # (a) the batch split over the devices, the parameters replicated, typed
    def step(model: MLP, x: Array, y: Array) -> tuple[MLP, Array]:
        value, grads = eqpar.filter_value_and_grad_mean(loss, "data")(model, x, y)
        return sgd(model, grads, args.lr), value

    sharded = eqpar.filter_shard_map(
        step,
        mesh=mesh,
        in_specs=(P(), P("data"), P("data")),
        out_specs=(P(), P()),
    )
    one_device = eqx.filter_jit(
        lambda model, x, y: (
            sgd(model, eqx.filter_grad(loss)(model, x, y), args.lr),
            loss(model, x, y),
        )
    )

    print(f"{args.steps} SGD steps of an MLP of Pallas layers, batch {args.batch}:")
    many, single = model, model
    losses, single_losses = [], []
    for i in range(args.steps):
        many, value = sharded(many, x, y)
        single, single_value = one_device(single, x, y)
        losses.append(float(value))
        single_losses.append(float(single_value))
        if i % max(args.steps // 5, 1) == 0 or i == args.steps - 1:
            print(
                f"  step {i:3d}  loss {losses[-1]:.5f}  "
                f"(one device {single_losses[-1]:.5f})"
            )
    param_diff = max(
        rel_diff(a, b) for a, b in zip(jax.tree.leaves(many), jax.tree.leaves(single))
    )
    print(
        f"  parameters after {args.steps} steps vs one device: "
        f"rel. diff {param_diff:.1e}"
    )

    # (b) what the compiled step communicates
    hlo = sharded.lower(model, x, y).compile().as_text()
    reduced = all_reduced_arrays(hlo)
    n_params = len(jax.tree.leaves(model))
    print(
        f"  compiled step: {reduced} arrays all-reduced for {n_params} parameter "
        f"arrays and the loss; all-gathers: {hlo.count('all-gather')}"
    )

    checks = {
        f"training on {n} devices equals one device": param_diff < 1e-5,
        "losses equal one device's": max(
            abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses, single_losses)
        )
        < 1e-5,
        "the loss decreases": losses[-1] < losses[0],
        "one all-reduce per parameter, and the loss": reduced == n_params + 1,
        "nothing all-gathered": "all-gather" not in hlo,
    }
    results = {
        "losses": losses,
        "param_rel_diff": param_diff,
        "all_reduced_arrays": reduced,
        "parameter_arrays": n_params,
    }
    return finish(results, checks, t0)


if __name__ == "__main__":
    main()
