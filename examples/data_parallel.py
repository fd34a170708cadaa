"""Data parallelism with eqpar (after Objax's parallelism guide, on today's JAX).

    python examples/data_parallel.py --devices 8 [--steps 100 --batch 256]

(a) A 3-class spiral classifier (`eqx.nn.MLP`) trained data-parallel through
    `eqpar.Parallel(step, reduce="first")`: each device differentiates its share of
    the batch, and `eqpar.filter_value_and_grad_mean(..., count=...)` averages the
    loss and the gradients across devices, weighted by the real examples. The last
    batch of each epoch is short and does not divide over the devices: it is padded
    with `eqpar.pad_batch` and masked. The final parameters equal single-device
    training.
(b) Objax's output reductions of `Parallel` on `eqx.nn.Linear(3, 4)` over 96
    examples: None, "first", "mean" and "concat".
(c) `eqpar.replicate` / `eqpar.unreplicate` with "first", "sum", "stack", "mean"
    and a callable.
(d) Per-example gradients: `eqpar.filter_vmap(eqx.filter_grad(loss))`.
(e) A per-argument batch axis (Objax's `Vectorize`): `filter_vmap(f, in_axes=(0,
    None))` maps a matrix's rows against one broadcast vector.
"""

import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import finish, parser, rel_diff, setup_devices
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree

import eqpar


AXIS = "devices"
CLASSES = 3


# ---------------------------------------------------------------- (a) training


def make_spirals(
    key: PRNGKeyArray, n: int, noise: float = 0.08
) -> tuple[Float[Array, "n 2"], Int[Array, " n"]]:
    """`n` points on three interleaved noisy spiral arms; the label is the arm."""
    kt, kn = jax.random.split(key)
    labels = jnp.arange(n, dtype=jnp.int32) % CLASSES
    t = jax.random.uniform(kt, (n,), minval=0.1, maxval=1.0)
    angle = 3.0 * t + labels.astype(jnp.float32) * (2.0 * jnp.pi / CLASSES)
    x = t[:, None] * jnp.stack([jnp.cos(angle), jnp.sin(angle)], axis=1)
    return x + noise * jax.random.normal(kn, (n, 2)), labels


def loss_fn(
    model: eqx.nn.MLP,
    x: Float[Array, "b 2"],
    y: Int[Array, " b"],
    mask: Bool[Array, " b"],
) -> Float[Array, ""]:
    """Mean cross-entropy over the real (unmasked) examples."""
    logp = jax.nn.log_softmax(jax.vmap(model)(x), axis=-1)
    nll = -jnp.take_along_axis(logp, y[:, None], axis=1)[:, 0]
    count = jnp.sum(mask, dtype=jnp.float32)
    return jnp.sum(jnp.where(mask, nll, 0.0)) / jnp.maximum(count, 1.0)


def predict(model: eqx.nn.MLP, x: Float[Array, "b 2"]) -> Int[Array, " b"]:
    return jnp.argmax(jax.vmap(model)(x), axis=-1).astype(jnp.int32)


def make_steps(
    optimiser: optax.GradientTransformation,
) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """(per-device step for `Parallel`, single-device reference step)."""

    def per_device(
        model: eqx.nn.MLP,
        opt_state: PyTree,
        x: Float[Array, "b 2"],
        y: Int[Array, " b"],
        mask: Bool[Array, " b"],
    ) -> tuple[eqx.nn.MLP, PyTree, Float[Array, ""]]:
        # This device's loss over its real examples; the loss and gradient of their
        # mean across devices, weighted by each device's number of real examples.
        loss, grads = eqpar.filter_value_and_grad_mean(loss_fn, AXIS)(
            model, x, y, mask, count=jnp.sum(mask)
        )
        updates, opt_state = optimiser.update(grads, opt_state, model)
        return eqx.apply_updates(model, updates), opt_state, loss

    @eqpar.filter_jit
    def single(
        model: eqx.nn.MLP,
        opt_state: PyTree,
        x: Float[Array, "b 2"],
        y: Int[Array, " b"],
    ) -> tuple[eqx.nn.MLP, PyTree, Float[Array, ""]]:
        mask = jnp.ones(x.shape[0], dtype=bool)
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model, x, y, mask)
        updates, opt_state = optimiser.update(grads, opt_state, model)
        return eqx.apply_updates(model, updates), opt_state, loss

    return per_device, single


def batches(n_train: int, batch: int, steps: int) -> list[np.ndarray]:
    """Example indices for each step: shuffled epochs, the last batch short."""
    out: list[np.ndarray] = []
    epoch = 0
    while len(out) < steps:
        perm = np.random.default_rng(epoch).permutation(n_train)
        out.extend(perm[i : i + batch] for i in range(0, n_train, batch))
        epoch += 1
    return out[:steps]


def tree_rel_diff(a: PyTree, b: PyTree) -> float:
    return max(
        rel_diff(x, y)
        for x, y in zip(
            jax.tree.leaves(eqx.filter(a, eqx.is_array)),
            jax.tree.leaves(eqx.filter(b, eqx.is_array)),
        )
    )


def train(args: Any, mesh: jax.sharding.Mesh, n: int) -> dict[str, Any]:
    batch = args.batch
    on = f"{n} device" + "s" * (n != 1)
    # 2.5 batches an epoch: two full ones, then a short one of batch // 2 - 1 examples
    # (127 for --batch 256), which does not divide over most device counts.
    n_train = 2 * batch + max(batch // 2 - 1, 1)
    n_test = 1001
    optimiser = optax.sgd(0.1, momentum=0.9)

    @eqpar.filter_jit  # one compiled setup instead of many small eager ops
    def setup(key: PRNGKeyArray) -> tuple[Any, ...]:
        kd, kt, km = jax.random.split(key, 3)
        model = eqx.nn.MLP(2, CLASSES, 64, 2, key=km)
        state = optimiser.init(eqx.filter(model, eqx.is_inexact_array))
        return make_spirals(kd, n_train), make_spirals(kt, n_test), model, state

    (x_train, y_train), (x_test, y_test), model0, state0 = setup(jax.random.key(0))
    x_train, y_train = np.asarray(x_train), np.asarray(y_train)  # cut on the host
    per_device, single_step = make_steps(optimiser)
    parallel_step = eqpar.Parallel(
        per_device, reduce="first", in_axes=(None, None, 0, 0, 0), mesh=mesh
    )
    short = n_train - 2 * batch
    # Every batch is padded to one shape, the batch size rounded up to a multiple of
    # the device count, so the parallel step compiles once. The short batch leaves
    # some devices with few or no real examples: `count` weights them.
    padded = -(-batch // n) * n
    print(
        f"(a) training: {n_train} spiral points, {CLASSES} classes, batches of "
        f"{batch} ({short} in the last batch of each epoch), each padded to "
        f"{padded} = {n} devices x {padded // n} and masked; {args.steps} steps, "
        "sgd(0.1, momentum=0.9)"
    )

    parallel, p_state = model0, state0
    single, s_state = model0, state0
    p_losses: list[float] = []
    s_losses: list[float] = []
    t_parallel = t_single = 0.0
    for step, idx in enumerate(batches(n_train, batch, args.steps)):
        xb, yb = x_train[idx], y_train[idx]
        (xp, yp), n_real = eqpar.pad_batch((xb, yb), padded)
        mask = np.arange(padded) < n_real
        t0 = time.perf_counter()
        parallel, p_state, p_loss = parallel_step(parallel, p_state, xp, yp, mask)
        p_losses.append(float(p_loss))
        t1 = time.perf_counter()
        single, s_state, s_loss = single_step(single, s_state, xb, yb)
        s_losses.append(float(s_loss))
        t2 = time.perf_counter()
        if step > 2:  # leave the compilations out of the times (1 device: 2 shapes)
            t_parallel += t1 - t0
            t_single += t2 - t1
        if step % max(args.steps // 5, 1) == 0 or step == args.steps - 1:
            print(
                f"  step {step:4d}  batch {n_real:4d} (padded {xp.shape[0]:4d})  "
                f"loss {p_losses[-1]:.4f} ({on})  {s_losses[-1]:.4f} (1 device)"
            )

    evaluate = eqpar.Parallel(predict, in_axes=(None, 0), mesh=mesh)  # "concat"
    pred = np.asarray(evaluate(parallel, x_test))  # 1001: padded and trimmed
    predict_single = eqpar.filter_jit(predict)
    labels = np.asarray(y_test)
    accuracy = float(np.mean(pred == labels))
    accuracy_single = float(
        np.mean(np.asarray(predict_single(single, x_test)) == labels)
    )
    param_diff = tree_rel_diff(parallel, single)
    loss_diff = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(p_losses, s_losses))
    print(
        f"  test accuracy {accuracy:.1%} ({on}), {accuracy_single:.1%} "
        f"(1 device), chance {1 / CLASSES:.1%}"
    )
    print(
        f"  parameters vs 1-device training: max rel. diff {param_diff:.2e}; "
        f"losses: {loss_diff:.2e}"
    )
    if args.steps > 3:
        steps_timed = args.steps - 3
        print(
            f"  time per step: {t_parallel / steps_timed * 1e3:.1f} ms ({on}), "
            f"{t_single / steps_timed * 1e3:.1f} ms (1 device)\n  (simulated devices "
            "share this machine's CPU cores: this shows overhead, not scaling)"
        )
    return {
        "n_train": n_train,
        "short_batch": short,
        "losses": p_losses,
        "final_loss": p_losses[-1],
        "accuracy": accuracy,
        "accuracy_single": accuracy_single,
        "param_rel_diff": param_diff,
        "loss_rel_diff": loss_diff,
        "checks": {
            "a: parameters equal 1-device training (rel 1e-5)": param_diff < 1e-5,
            "a: losses equal 1-device training (rel 1e-5)": loss_diff < 1e-5,
            "a: Parallel 'concat' predictions equal 1 device's": bool(
                np.all(pred == np.asarray(predict_single(parallel, x_test)))
            ),
        },
    }


# ---------------------------------------------------------------- (b) reductions


def output_reductions(mesh: jax.sharding.Mesh, n: int) -> dict[str, Any]:
    kl, kx = jax.random.split(jax.random.key(1))
    linear = eqx.nn.Linear(3, 4, key=kl)
    x = jax.random.normal(kx, (96, 3))
    forward = eqpar.filter_vmap(linear)  # a Module: linear's arrays are broadcast
    ref = eqpar.filter_jit(forward)(x)
    # None/"first"/"mean" need a batch that divides: pad it (a no-op for 1, 2, 3, 4,
    # 6, 8, ... devices); "concat" pads and trims by itself.
    xp, _ = eqpar.pad_batch(x, n)
    refp, _ = eqpar.pad_batch(ref, n)
    per = xp.shape[0] // n
    stacked = refp.reshape(n, per, 4)
    out = {
        "None": eqpar.Parallel(forward, reduce=None, mesh=mesh)(xp),
        "first": eqpar.Parallel(forward, reduce="first", mesh=mesh)(xp),
        "mean": eqpar.Parallel(forward, reduce="mean", mesh=mesh)(xp),
        "concat": eqpar.Parallel(forward, reduce="concat", mesh=mesh)(x),
    }
    meaning = {
        "None": "per device, stacked",
        "first": "device 0's outputs",
        "mean": "mean over the devices",
        "concat": "all 96 in order (= 1 device)",
    }
    expected_shapes = {
        "None": (n, per, 4),
        "first": (per, 4),
        "mean": (per, 4),
        "concat": (96, 4),
    }
    values = {
        "None": rel_diff(out["None"], stacked),
        "first": rel_diff(out["first"], stacked[0]),
        "mean": rel_diff(out["mean"], jnp.mean(stacked, axis=0)),
        "concat": rel_diff(out["concat"], ref),
    }
    print(f"\n(b) Parallel(filter_vmap(Linear(3, 4))) on 96 examples, {n} devices")
    if xp.shape[0] != 96:
        print(f"    (96 does not divide over {n}: padded to {xp.shape[0]})")
    print(f"    {'reduce':<9} {'shape':<14} {'rel. diff':<10} what it is")
    for name, y in out.items():
        label = name if name == "None" else repr(name)
        print(
            f"    {label:<9} {str(tuple(y.shape)):<14} {values[name]:<10.1e} "
            f"{meaning[name]}"
        )
    shapes = {k: tuple(v.shape) for k, v in out.items()}
    return {
        "reduction_shapes": shapes,
        "checks": {
            "b: output shapes": shapes == expected_shapes,
            "b: outputs equal the 1-device reference": max(values.values()) < 1e-5,
        },
    }


# ---------------------------------------------------------------- (c) unreplicate


def replication(mesh: jax.sharding.Mesh, n: int) -> dict[str, Any]:
    replicated = eqpar.replicate(jnp.arange(5), mesh=mesh)  # int32, on every device
    if n == 1:  # eqpar cannot tell a 1-device replica from a device stack: give it
        replicated = replicated[None]  # the (devices, ...) stack explicitly
    spread = lambda s: jnp.max(s, axis=0) - jnp.min(s, axis=0)  # noqa: E731
    out = {
        "first": eqpar.unreplicate(replicated, "first"),
        "sum": eqpar.unreplicate(replicated, "sum"),
        "mean": eqpar.unreplicate(replicated, "mean"),
        "stack": eqpar.unreplicate(replicated, "stack"),
        "max - min (callable)": eqpar.unreplicate(replicated, spread),
    }
    print(f"\n(c) replicate(arange(5)) on {n} devices, then unreplicate(reduce=...)")
    for name, y in out.items():
        shown = np.asarray(y).tolist() if y.ndim == 1 else f"shape {tuple(y.shape)}"
        print(f"    {name:<21} {str(y.dtype):<8} {shown}")
    ar = np.arange(5)
    return {
        "unreplicate": {k: np.asarray(v).tolist() for k, v in out.items()},
        "checks": {
            "c: first": np.array_equal(out["first"], ar),
            "c: sum = devices * arange(5)": np.array_equal(out["sum"], n * ar),
            "c: stack is (devices, 5)": np.array_equal(
                out["stack"], np.broadcast_to(ar, (n, 5))
            ),
            "c: callable": np.array_equal(out["max - min (callable)"], 0 * ar),
            "c: mean of an int leaf is float": bool(
                jnp.issubdtype(out["mean"].dtype, jnp.floating)
                and np.allclose(out["mean"], ar)
            ),
        },
    }


# ---------------------------------------------------------------- (d) per-example


def example_loss(
    model: eqx.nn.Linear, x: Float[Array, " 3"], y: Float[Array, " 4"]
) -> Float[Array, ""]:
    return jnp.sum((model(x) - y) ** 2)


def batch_loss(
    model: eqx.nn.Linear, x: Float[Array, "b 3"], y: Float[Array, "b 4"]
) -> Float[Array, ""]:
    return jnp.mean(jax.vmap(example_loss, in_axes=(None, 0, 0))(model, x, y))


def per_example_gradients() -> dict[str, Any]:
    kl, kx, ky = jax.random.split(jax.random.key(2), 3)
    linear = eqx.nn.Linear(3, 4, key=kl)
    x = jax.random.normal(kx, (10, 3))
    y = jax.random.normal(ky, (10, 4))
    per_example = eqpar.filter_vmap(eqx.filter_grad(example_loss), in_axes=(None, 0, 0))
    grads = per_example(linear, x, y)
    grad = eqpar.filter_jit(eqx.filter_grad(example_loss))  # one example at a time
    x_np, y_np = np.asarray(x), np.asarray(y)
    loop = [grad(linear, x_np[i], y_np[i]) for i in range(10)]
    looped = jax.tree.map(lambda *g: np.stack(g), *loop)
    full = eqpar.filter_jit(eqx.filter_grad(batch_loss))(linear, x, y)
    mean = jax.tree.map(lambda g: np.mean(np.asarray(g), axis=0), grads)
    loop_diff = tree_rel_diff(grads, looped)
    mean_diff = tree_rel_diff(mean, full)
    shapes = {
        "weight": tuple(grads.weight.shape),
        "bias": tuple(grads.bias.shape),
    }
    norms = jnp.sqrt(jnp.sum(grads.weight**2, axis=(1, 2)) + jnp.sum(grads.bias**2, 1))
    print("\n(d) per-example gradients of Linear(3, 4) on 10 examples")
    print(f"    leaf shapes: weight {shapes['weight']}, bias {shapes['bias']}")
    print(f"    norms: {np.array2string(np.asarray(norms), precision=2)}")
    print(
        f"    vs a Python loop: rel. diff {loop_diff:.1e}; their mean vs the "
        f"batch gradient: {mean_diff:.1e}"
    )
    print(
        "    (an Objax/BrainState-style 'vector_grad' is not per-example: the mean of\n"
        "    per-example grads is the batch gradient, and per-example grads are what\n"
        "    filter_vmap of grad gives.)"
    )
    return {
        "per_example_shapes": shapes,
        "checks": {
            "d: per-example leaf shapes": shapes
            == {"weight": (10, 4, 3), "bias": (10, 4)},
            "d: equal a loop of 1-example gradients": loop_diff < 1e-6,
            "d: their mean is the batch gradient": mean_diff < 1e-5,
        },
    }


# ---------------------------------------------------------------- (e) Vectorize


def cosine(u: Float[Array, " d"], v: Float[Array, " d"]) -> Float[Array, ""]:
    return jnp.dot(u, v) / (jnp.linalg.norm(u) * jnp.linalg.norm(v))


def vectorize() -> dict[str, Any]:
    km, kv, kw = jax.random.split(jax.random.key(3), 3)
    m = jax.random.normal(km, (6, 4))
    v = jax.random.normal(kv, (4,))
    w = jax.random.normal(kw, (6,))
    rows = eqpar.filter_vmap(cosine, in_axes=(0, None))(m, v)  # rows of m vs v
    cols = eqpar.filter_vmap(cosine, in_axes=(1, None))(m, w)  # columns of m vs w
    x_np, one = np.asarray(m), eqpar.filter_jit(cosine)
    rows_loop = np.stack([one(x_np[i], v) for i in range(6)])
    cols_loop = np.stack([one(x_np[:, j], w) for j in range(4)])
    print("\n(e) per-argument batch axes: filter_vmap(cosine, in_axes=(0, None))")
    show = lambda a: np.array2string(np.asarray(a), precision=3)  # noqa: E731
    print(f"    rows of a (6, 4) matrix vs one vector: {show(rows)}")
    print(f"    columns (in_axes=(1, None)) vs another: {show(cols)}")
    return {
        "rows": np.asarray(rows).tolist(),
        "checks": {
            "e: rows vs a loop": rel_diff(rows, rows_loop) < 1e-6,
            "e: columns vs a loop": rel_diff(cols, cols_loop) < 1e-6,
        },
    }


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100, help="training steps")
    p.add_argument("--batch", type=int, default=256, help="examples per step")
    args = p.parse_args(argv)
    devices = setup_devices(args.devices)
    n = len(devices)
    mesh = eqpar.data_mesh(AXIS, devices)
    print(
        f"data parallelism on {n} {devices[0].platform.upper()} devices "
        f"(jax {jax.__version__})\n"
    )
    results: dict[str, Any] = {"devices": n}
    checks: dict[str, bool] = {}
    t0 = time.perf_counter()
    for part in (
        lambda: train(args, mesh, n),
        lambda: output_reductions(mesh, n),
        lambda: replication(mesh, n),
        per_example_gradients,
        vectorize,
    ):
        out = part()
        checks.update(out.pop("checks"))
        results.update(out)
    return finish(results, checks, t0)


if __name__ == "__main__":
    raise SystemExit(0 if all(main()["checks"].values()) else 1)
