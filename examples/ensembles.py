"""Ensembles, MC dropout and vmap's axes (BrainState's vmap tutorial, done right).

    python examples/ensembles.py --devices 8 [--steps 200]

(a) An ensemble of 5 `eqx.nn.MLP`s (1 -> 1, width 32, depth 2) built by
    `eqpar.filter_vmap` over 5 keys: one Module whose array leaves carry a leading
    member axis, its activation functions static. Evaluated on 100 inputs in
    [-3, 3] with `filter_vmap(in_axes=(0, None))` (members mapped, inputs shared);
    each member's predictions equal that member called alone. Trained with SGD,
    vmapped over members, on noisy sin data with a gap in [-1, 1]; the members
    disagree where there is no data (ensemble.png: mean +- 2 std).
(b) Monte-Carlo dropout: an MLP with `eqx.nn.Dropout(p=0.1)` left in training mode,
    50 sample keys x 20 inputs (one key per sample and input) -> (50, 20, 1); the
    samples differ across keys and the same key gives the same sample.
(c) Nested vmap: all pairwise dot products of the rows of a and b.
(d) `in_axes=1` maps over columns: equal to `in_axes=0` on the transpose (and only
    because it is the transpose: on the same matrix the two differ).
(e) `eqpar.pmean` under a named axis: x - mean(x) for [1, 2, 3, 4], under
    `filter_vmap(axis_name="i")` and under `filter_pmap` on 4 devices.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import out_dir, parser, report, save_figure, setup_devices
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

import eqpar


MEMBERS, WIDTH, DEPTH, N_EVAL = 5, 32, 2, 100


# ---------------------------------------------------------------------------------
# (a) An ensemble of MLPs.


def make_mlp(key: PRNGKeyArray) -> eqx.nn.MLP:
    return eqx.nn.MLP(1, 1, WIDTH, DEPTH, key=key)


def apply_scalar(model: eqx.nn.MLP, x: Float[Array, ""]) -> Float[Array, ""]:
    return model(x[None])[0]


# One model on a batch of scalar inputs (model broadcast). Built once, at module
# level: each eqpar transform object keeps its own compile cache, so a
# `filter_vmap(lambda ...)` rebuilt on every eager call would recompile every time.
predict = eqpar.filter_vmap(apply_scalar, in_axes=(None, 0))


# Members mapped (axis 0 of every array leaf), inputs broadcast: (members, n).
predict_ensemble = eqpar.filter_vmap(predict, in_axes=(0, None))


def member(ensemble: eqx.nn.MLP, i: int) -> eqx.nn.MLP:
    """The i-th member alone: index the array leaves, keep the static rest."""
    params, static = eqx.partition(ensemble, eqx.is_array)
    return eqx.combine(jax.tree.map(lambda a: a[i], params), static)


def mse(
    model: eqx.nn.MLP, x: Float[Array, " n"], y: Float[Array, " n"]
) -> Float[Array, ""]:
    return jnp.mean((predict(model, x) - y) ** 2)


def make_train_step(opt: optax.GradientTransformation) -> Any:
    def member_step(
        model: eqx.nn.MLP,
        state: PyTree,
        x: Float[Array, " n"],
        y: Float[Array, " n"],
    ) -> tuple[eqx.nn.MLP, PyTree, Float[Array, ""]]:
        loss, grads = eqx.filter_value_and_grad(mse)(model, x, y)
        updates, state = opt.update(grads, state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), state, loss

    # Every member takes its own step on the same data, in one compiled program.
    return eqpar.filter_jit(eqpar.filter_vmap(member_step, in_axes=(0, 0, None, None)))


@eqpar.filter_jit
def gap_data(
    key: PRNGKeyArray, n: int = 40
) -> tuple[Float[Array, " n"], Float[Array, " n"]]:
    """Noisy sin(x) on [-3, -1] and [1, 3]: nothing in the gap."""
    kx, ks, kn = jax.random.split(key, 3)
    mag = jax.random.uniform(kx, (n,), minval=1.0, maxval=3.0)
    sign = jnp.where(jax.random.bernoulli(ks, 0.5, (n,)), 1.0, -1.0)
    x = (sign * mag).astype(jnp.float32)
    y = jnp.sin(x) + 0.1 * jax.random.normal(kn, (n,), dtype=jnp.float32)
    return x, y


@eqpar.filter_jit
def spread(
    preds: Float[Array, "members n"], xs: Float[Array, " n"]
) -> tuple[Float[Array, " n"], Float[Array, " n"], Float[Array, ""], Float[Array, ""]]:
    """Mean and std over members; the std averaged in the gap and on the data."""
    mean, std = jnp.mean(preds, axis=0), jnp.std(preds, axis=0)
    in_gap = jnp.abs(xs) < 1.0
    return mean, std, jnp.mean(std, where=in_gap), jnp.mean(std, where=~in_gap)


# ---------------------------------------------------------------------------------
# (b) Monte-Carlo dropout.


class DropoutMLP(eqx.Module):
    """1 -> 32 -> 32 -> 1 with dropout after each hidden layer (always on)."""

    layers: tuple[eqx.nn.Linear, ...]
    dropout: eqx.nn.Dropout

    def __init__(self, key: PRNGKeyArray, p: float = 0.1):
        k1, k2, k3 = jax.random.split(key, 3)
        self.layers = (
            eqx.nn.Linear(1, WIDTH, key=k1),
            eqx.nn.Linear(WIDTH, WIDTH, key=k2),
            eqx.nn.Linear(WIDTH, 1, key=k3),
        )
        self.dropout = eqx.nn.Dropout(p=p, inference=False)

    def __call__(self, x: Float[Array, "1"], key: PRNGKeyArray) -> Float[Array, "1"]:
        keys = jax.random.split(key, len(self.layers) - 1)
        for layer, k in zip(self.layers[:-1], keys):
            x = self.dropout(jax.nn.relu(layer(x)), key=k)
        return self.layers[-1](x)


def call_with_key(
    model: DropoutMLP, x: Float[Array, "1"], key: PRNGKeyArray
) -> Float[Array, "1"]:
    return model(x, key)


# Over inputs, each with its own key (model broadcast).
_over_inputs = eqpar.filter_vmap(call_with_key, in_axes=(None, 0, 0))


def one_sample(
    model: DropoutMLP, xs: Float[Array, "n 1"], key: PRNGKeyArray
) -> Float[Array, "n 1"]:
    """One MC sample over all inputs: the sample key split into one key per input."""
    return _over_inputs(model, xs, jax.random.split(key, xs.shape[0]))


# One forward pass per (sample key, input): the two maps nested, model and inputs
# broadcast over the samples -> (samples, n, 1).
mc_samples = eqpar.filter_vmap(one_sample, in_axes=(None, None, 0))


# ---------------------------------------------------------------------------------
# (c)-(e) vmap's axes and a named axis.


def pairwise_dots(
    a: Float[Array, "m d"], b: Float[Array, "k d"]
) -> Float[Array, "m k"]:
    dot = eqpar.filter_vmap(jnp.dot, in_axes=(None, 0))  # one row of a, every row of b
    return eqpar.filter_vmap(dot, in_axes=(0, None))(a, b)


def cumsum(v: Float[Array, " k"]) -> Float[Array, " k"]:
    return jnp.cumsum(v)


def centre(v: Float[Array, ""]) -> Float[Array, ""]:
    """v minus the mean of v over the bound axis "i"."""
    return v - eqpar.pmean(v, "i")


def centre_on_devices(x: Float[Array, " n"], devices: list[Any]) -> Float[Array, " n"]:
    """`centre` under `filter_pmap`, one element per device. With fewer devices than
    elements, each device takes a row of a (devices, n/devices) reshape and maps it
    with `filter_vmap(axis_name="j")`; the mean is over both names."""
    d = len(devices)
    n = x.shape[0]
    if d >= n:
        return eqpar.filter_pmap(centre, axis_name="i", devices=devices[:n])(x)
    d = max(k for k in range(1, d + 1) if n % k == 0)

    def per_device(row: Float[Array, " m"]) -> Float[Array, " m"]:
        return eqpar.filter_vmap(
            lambda v: v - eqpar.pmean(v, ("i", "j")), axis_name="j"
        )(row)

    out = eqpar.filter_pmap(per_device, axis_name="i", devices=devices[:d])(
        x.reshape(d, n // d)
    )
    return out.reshape(n)


# ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200, help="SGD steps for (a)")
    p.add_argument("--lr", type=float, default=0.01, help="SGD learning rate")
    args = p.parse_args(argv)
    devices = setup_devices(args.devices)
    checks: dict[str, bool] = {}
    np.set_printoptions(precision=3, suppress=True)

    # (a) --------------------------------------------------------------------------
    key_models, key_data, key_drop, key_mc = jax.random.split(jax.random.key(0), 4)
    ensemble = eqpar.filter_vmap(make_mlp)(jax.random.split(key_models, MEMBERS))
    xs = jnp.linspace(-3.0, 3.0, N_EVAL, dtype=jnp.float32)
    preds = predict_ensemble(ensemble, xs)
    alone = np.stack([predict(member(ensemble, i), xs) for i in range(MEMBERS)])
    leading = {a.shape[0] for a in jax.tree.leaves(eqx.filter(ensemble, eqx.is_array))}
    print(
        f"(a) ensemble of {MEMBERS} MLPs (1 -> 1, width {WIDTH}, depth {DEPTH}) "
        f"built by filter_vmap over {MEMBERS} keys: array leaves lead with "
        f"{sorted(leading)}, activation {ensemble.activation.__name__} static"
    )
    print(f"    predictions on {N_EVAL} inputs: {tuple(preds.shape)}")
    checks["(a) ensemble predictions have shape (5, 100)"] = preds.shape == (
        MEMBERS,
        N_EVAL,
    )
    checks["(a) every array leaf has a leading member axis of 5"] = leading == {MEMBERS}
    checks["(a) each member's predictions == that member called alone"] = bool(
        np.allclose(preds, alone, rtol=1e-5, atol=1e-6)
    )

    x_train, y_train = gap_data(key_data)
    opt = optax.sgd(args.lr, momentum=0.9)
    state = eqpar.filter_vmap(lambda m: opt.init(eqx.filter(m, eqx.is_array)))(ensemble)
    step = make_train_step(opt)
    losses = []
    for _ in range(args.steps):
        ensemble, state, loss = step(ensemble, state, x_train, y_train)
        losses.append(np.asarray(loss))
    loss_first = losses[0] if losses else np.full(MEMBERS, np.nan)
    loss_last = losses[-1] if losses else loss_first
    preds = predict_ensemble(ensemble, xs)
    mean, std, gap, data = spread(preds, xs)
    std_gap, std_data = float(gap), float(data)
    print(
        f"    trained {args.steps} SGD steps (lr {args.lr}, momentum 0.9), vmapped "
        f"over members, on {x_train.shape[0]} noisy sin points with a gap in [-1, 1]"
    )
    print(f"    loss per member: {loss_first} -> {loss_last}")
    print(
        f"    mean std over members: {std_gap:.3f} in the gap vs {std_data:.3f} "
        "where there is data"
    )
    checks["(a) training lowered every member's loss"] = bool(
        np.all(loss_last < loss_first)
    )
    checks["(a) members disagree more in the gap than on the data"] = std_gap > std_data
    png = _plot(out_dir(args.out), xs, mean, std, x_train, y_train)

    # (b) --------------------------------------------------------------------------
    model = eqpar.filter_jit(DropoutMLP)(key_drop)  # one compile, not one per op
    inputs = jnp.linspace(-3.0, 3.0, 20, dtype=jnp.float32)[:, None]
    keys = jax.random.split(key_mc, 50)
    samples = mc_samples(model, inputs, keys)
    again = mc_samples(model, inputs, keys)
    first_alone = eqpar.filter_jit(call_with_key)(
        model, inputs[3], jax.random.split(keys[7], 20)[3]
    )
    sample_std = np.std(np.asarray(samples), axis=0)[:, 0]
    print(
        f"\n(b) MC dropout (p=0.1, inference=False): 50 sample keys x 20 inputs -> "
        f"{tuple(samples.shape)}; std over samples per input, min/max "
        f"{float(sample_std.min()):.3f}/{float(sample_std.max()):.3f}"
    )
    checks["(b) MC dropout samples have shape (50, 20, 1)"] = samples.shape == (
        50,
        20,
        1,
    )
    checks["(b) samples differ across keys"] = bool(
        np.all(sample_std > 0) and not np.allclose(samples[0], samples[1])
    )
    checks["(b) the same keys give the same samples"] = bool(
        np.array_equal(samples, again)
    )
    checks["(b) a mapped sample == the model called alone with its key"] = bool(
        np.allclose(np.asarray(samples)[7, 3], first_alone, rtol=1e-5, atol=1e-6)
    )

    # (c) --------------------------------------------------------------------------
    a = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b = jnp.array([[1.0, 1.0], [1.0, -1.0]])
    dots = pairwise_dots(a, b)
    print(f"\n(c) pairwise dots of a = {a.tolist()} and b = {b.tolist()}:")
    print(f"    {dots.tolist()}  (== a @ b.T)")
    checks["(c) pairwise dots == [[1,1],[1,-1],[2,0]]"] = dots.tolist() == [
        [1.0, 1.0],
        [1.0, -1.0],
        [2.0, 0.0],
    ]
    checks["(c) pairwise dots == a @ b.T"] = bool(
        np.array_equal(dots, np.asarray(a) @ np.asarray(b).T)
    )

    # (d) --------------------------------------------------------------------------
    m = jnp.arange(12.0, dtype=jnp.float32).reshape(3, 4)
    cols = eqpar.filter_vmap(cumsum, in_axes=1)(m)
    rows_of_t = eqpar.filter_vmap(cumsum, in_axes=0)(m.T)
    sq = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    sq_rows = eqpar.filter_vmap(jnp.sum, in_axes=0)(sq)
    sq_cols = eqpar.filter_vmap(jnp.sum, in_axes=1)(sq)
    print(
        f"\n(d) cumsum mapped over the columns of a (3, 4) matrix (in_axes=1): "
        f"{tuple(cols.shape)}, == in_axes=0 on its transpose: "
        f"{bool(np.array_equal(cols, rows_of_t))}"
    )
    print(
        "    That is because x.T's rows are x's columns, not because in_axes=0 and "
        "in_axes=1 'match':\n    on the same matrix they map different slices. "
        f"sum over s = {sq.tolist()}: in_axes=0 -> {sq_rows.tolist()} (rows), "
        f"in_axes=1 -> {sq_cols.tolist()} (columns)"
    )
    checks["(d) in_axes=1 on x == in_axes=0 on x.T"] = bool(
        np.array_equal(cols, rows_of_t)
    )
    checks["(d) in_axes=0 and in_axes=1 differ on the same matrix"] = (
        sq_rows.tolist() == [3.0, 7.0] and sq_cols.tolist() == [4.0, 6.0]
    )

    # (e) --------------------------------------------------------------------------
    v = jnp.array([1.0, 2.0, 3.0, 4.0])
    centred_vmap = eqpar.filter_vmap(centre, axis_name="i")(v)
    centred_pmap = centre_on_devices(v, devices)
    n_v = v.shape[0]
    used = max(k for k in range(1, min(len(devices), n_v) + 1) if n_v % k == 0)
    how = "" if used == n_v else f" ({n_v // used} per device, filter_vmap within)"
    print(
        f"\n(e) v - pmean(v, 'i') for v = {v.tolist()}: filter_vmap "
        f"{centred_vmap.tolist()}, filter_pmap on {used} device{'s' * (used > 1)}{how} "
        f"{np.asarray(centred_pmap).tolist()}"
    )
    expected = [-1.5, -0.5, 0.5, 1.5]
    checks["(e) filter_vmap + pmean == [-1.5,-0.5,0.5,1.5]"] = (
        centred_vmap.tolist() == expected
    )
    checks["(e) filter_pmap + pmean == [-1.5,-0.5,0.5,1.5]"] = (
        np.asarray(centred_pmap).tolist() == expected
    )

    if png:
        print(f"\nwrote {png}")
    report(checks)
    return {
        "ensemble_shape": tuple(preds.shape),
        "ensemble_std": {"gap": std_gap, "data": std_data},
        "losses": {"first": loss_first.tolist(), "last": loss_last.tolist()},
        "dropout_shape": tuple(samples.shape),
        "pairwise_dots": dots.tolist(),
        "in_axes": {
            "columns_shape": tuple(cols.shape),
            "same_matrix_in_axes_0": sq_rows.tolist(),
            "same_matrix_in_axes_1": sq_cols.tolist(),
        },
        "pmean_vmap": centred_vmap.tolist(),
        "pmean_pmap": np.asarray(centred_pmap).tolist(),
        "pmap_devices": used,
        "png": png,
        "checks": checks,
    }


def _plot(
    out: Any,
    xs: Float[Array, " n"],
    mean: Float[Array, " n"],
    std: Float[Array, " n"],
    x_train: Float[Array, " m"],
    y_train: Float[Array, " m"],
) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no PNG)")
        return ""
    x, mu, sd = np.asarray(xs), np.asarray(mean), np.asarray(std)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.fill_between(x, mu - 2 * sd, mu + 2 * sd, alpha=0.3, label="mean +- 2 std")
    ax.plot(x, mu, label=f"ensemble mean ({MEMBERS} MLPs)")
    ax.plot(x, np.sin(x), "k--", lw=1, label="sin(x)")
    ax.scatter(np.asarray(x_train), np.asarray(y_train), s=12, c="k", label="data")
    ax.axvspan(-1, 1, color="grey", alpha=0.1)
    ax.set(xlabel="x", ylabel="y", title="ensemble uncertainty (no data in [-1, 1])")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = out / "ensemble.png"
    saved = save_figure(fig, path, dpi=100)
    return str(saved)


if __name__ == "__main__":
    raise SystemExit(0 if all(main()["checks"].values()) else 1)
