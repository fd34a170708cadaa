"""Data-parallel training over several processes with the same eqpar code.

    python -m eqpar.launch -n 2 --local-devices 4 examples/multiprocess_training.py
    python examples/multiprocess_training.py --devices 8      # one process, 8 devices

An MLP regression trained with `filter_shard_map` +
`filter_value_and_grad_mean(count=...)` on a batch that does not divide over the
devices. Each process holds only its rows of the batch (`eqpar.global_batch` joins
them into one global array); parameters are replicated on every device of every
process. The final parameters are checked against training on
a single device (which every process can do on its own: the data comes from a seed).
"""

import pathlib
from typing import Any

from _common import parser, rel_diff, report, setup_devices


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="training steps")
    p.add_argument("--batch", type=int, default=61, help="global batch (any size)")
    args = p.parse_args(argv)

    import eqpar

    multi = eqpar.initialize()  # reads the launcher's environment; False if none
    if not multi:
        setup_devices(args.devices)

    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import PartitionSpec as P
    from jaxtyping import Array, Bool, Float

    me, processes = jax.process_index(), jax.process_count()
    devices = jax.devices() if multi else jax.devices()[: args.devices]
    n = len(devices)
    log = print if me == 0 else (lambda *a, **k: None)
    log(f"{processes} process(es), {n} devices in all, {jax.local_device_count()} here")

    # The same data and initial model on every process (from seeds).
    kx, km = jax.random.split(jax.random.key(0))
    x_all = np.asarray(jax.random.normal(kx, (args.batch, 4)))
    y_all = np.stack(
        [np.sin(x_all[:, 0]) + x_all[:, 1] * x_all[:, 2], np.cos(x_all[:, 3])], axis=1
    )
    model0 = eqx.nn.MLP(4, 2, 32, 2, key=km)
    optimiser = optax.sgd(0.05, momentum=0.9)

    def loss_fn(
        model: eqx.nn.MLP,
        x: Float[Array, "b 4"],
        y: Float[Array, "b 2"],
        mask: Bool[Array, " b"],
    ) -> Float[Array, ""]:
        err = jnp.sum((jax.vmap(model)(x) - y) ** 2, axis=-1)
        count = jnp.maximum(jnp.sum(mask, dtype=jnp.float32), 1.0)
        return jnp.sum(jnp.where(mask, err, 0.0)) / count

    def per_device(model, state, x, y, mask):
        # The loss and gradient of the mean loss over the real examples, exactly.
        loss, grads = eqpar.filter_value_and_grad_mean(loss_fn, "data")(
            model, x, y, mask, count=jnp.sum(mask)
        )
        updates, state = optimiser.update(grads, state, model)
        return eqx.apply_updates(model, updates), state, loss

    mesh = eqpar.data_mesh("data", devices)
    step = eqpar.filter_shard_map(
        per_device,
        mesh=mesh,
        in_specs=(P(), P(), P("data"), P("data"), P("data")),
        out_specs=P(),
    )

    # This process's rows of the padded batch -> one global batch.
    (xp, yp), n_real = eqpar.pad_batch((x_all, y_all), n)
    mask = np.arange(xp.shape[0]) < n_real
    rows = xp.shape[0] // processes
    mine = slice(me * rows, (me + 1) * rows)
    xg, yg, mg = eqpar.global_batch(
        (np.asarray(xp)[mine], np.asarray(yp)[mine], mask[mine]), mesh=mesh
    )

    model = eqpar.replicate(model0, mesh=mesh)
    state = eqpar.replicate(optimiser.init(eqx.filter(model0, eqx.is_array)), mesh=mesh)
    losses = []
    for _ in range(args.steps):
        model, state, loss = step(model, state, xg, yg, mg)
        losses.append(float(loss))
    log(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {args.steps} steps")

    # The single-device reference, computed by this process alone.
    @eqpar.filter_jit
    def single_step(model, state):
        full = jnp.ones(args.batch, bool)
        grads = eqx.filter_grad(loss_fn)(
            model, jnp.asarray(x_all), jnp.asarray(y_all), full
        )
        updates, state = optimiser.update(grads, state, model)
        return eqx.apply_updates(model, updates), state

    ref, ref_state = model0, optimiser.init(eqx.filter(model0, eqx.is_array))
    for _ in range(args.steps):
        ref, ref_state = single_step(ref, ref_state)

    params = [
        np.asarray(a)
        for a in eqpar.gather(jax.tree.leaves(eqx.filter(model, eqx.is_array)))
    ]
    ref_params = [np.asarray(a) for a in jax.tree.leaves(eqx.filter(ref, eqx.is_array))]
    err = max(rel_diff(a, b) for a, b in zip(params, ref_params))
    log(f"max rel. diff of the parameters vs one device: {err:.1e}")
    checks = {
        f"{n}-device training over {processes} process(es) equals one device": err
        < 1e-5,
        "the loss went down": losses[-1] < losses[0],
    }
    if me == 0:
        report(checks)
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        np.savez(out / f"params_{processes}x{n // processes}.npz", *params)
    return {"checks": checks, "losses": losses, "rel_diff": err, "processes": processes}


if __name__ == "__main__":
    raise SystemExit(0 if all(main()["checks"].values()) else 1)
