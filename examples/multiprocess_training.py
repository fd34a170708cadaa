"""Data-parallel training over several processes with the same eqpar code.

    python -m eqpar.launch -n 2 --local-devices 4 examples/multiprocess_training.py
    python examples/multiprocess_training.py --devices 8      # one process, 8 devices

An MLP regression trained with `filter_shard_map` +
`filter_value_and_grad_mean(count=...)` on a batch that does not divide over the
devices, its inputs jittered with noise drawn from a random key that is part of the
training state. Each process holds only its rows of the batch (`eqpar.global_batch`
joins them into one global array); parameters are replicated on every device of every
process. The final parameters are checked against training on a single device (which
every process can do on its own: the data comes from a seed).

With `--checkpoint-dir`, the model, the optimiser state and the key are saved every
`--checkpoint-every` steps by every process (`eqpar.CheckpointManager`, on
orbax-checkpoint), and `--resume` continues from the latest finished checkpoint; a
run killed mid-way (try `--kill-at-step`) and resumed ends with the same parameters,
bit for bit, as one that was never interrupted:

    python -m eqpar.launch -n 2 --local-devices 4 examples/multiprocess_training.py \\
        --checkpoint-dir /tmp/ckpt --kill-at-step 15     # dies saving step 15
    python -m eqpar.launch -n 2 --local-devices 4 examples/multiprocess_training.py \\
        --checkpoint-dir /tmp/ckpt --resume              # resumes from step 10
"""

import os
import pathlib
import signal
from typing import Any

from _common import parser, rel_diff, report, setup_devices


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="training steps")
    p.add_argument("--batch", type=int, default=61, help="global batch (any size)")
    p.add_argument(
        "--checkpoint-dir", default=None, help="folder of checkpoints (none if None)"
    )
    p.add_argument(
        "--checkpoint-every", type=int, default=5, help="steps between checkpoints"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint in --checkpoint-dir, if any",
    )
    p.add_argument(
        "--kill-at-step",
        type=int,
        default=None,
        help="the last process kills itself (SIGKILL) right after this step and the "
        "start of its checkpoint: a crash, to try --resume on",
    )
    args = p.parse_args(argv)
    if args.resume and args.checkpoint_dir is None:
        p.error("--resume needs --checkpoint-dir")

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
    from jaxtyping import Array, Bool, Float, Int, Key

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

    def jitter(key: Key[Array, ""], index: Int[Array, " b"]) -> Float[Array, "b 4"]:
        # Noise for the examples `index` of the global batch: the same whatever the
        # number of devices or processes (a key per example, from its index).
        def one(i: Int[Array, ""]) -> Float[Array, " 4"]:
            return jax.random.normal(jax.random.fold_in(key, i), (4,))

        return 0.01 * jax.vmap(one)(index)

    def loss_fn(
        model: eqx.nn.MLP,
        x: Float[Array, "b 4"],
        y: Float[Array, "b 2"],
        mask: Bool[Array, " b"],
    ) -> Float[Array, ""]:
        err = jnp.sum((jax.vmap(model)(x) - y) ** 2, axis=-1)
        count = jnp.maximum(jnp.sum(mask, dtype=jnp.float32), 1.0)
        return jnp.sum(jnp.where(mask, err, 0.0)) / count

    def per_device(model, state, key, x, y, mask):
        key, noise = jax.random.split(key)
        first = jax.lax.axis_index("data") * x.shape[0]  # this device's first row
        x = x + jitter(noise, first + jnp.arange(x.shape[0]))
        # The loss and gradient of the mean loss over the real examples, exactly.
        loss, grads = eqpar.filter_value_and_grad_mean(loss_fn, "data")(
            model, x, y, mask, count=jnp.sum(mask)
        )
        updates, state = optimiser.update(grads, state, model)
        return eqx.apply_updates(model, updates), state, key, loss

    mesh = eqpar.data_mesh("data", devices)
    step = eqpar.filter_shard_map(
        per_device,
        mesh=mesh,
        in_specs=(P(), P(), P(), P("data"), P("data"), P("data")),
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
    # A typed key on every device: JAX places a key across processes only through
    # its data (`device_put` of a key needs addressable devices).
    key0 = jax.random.key(1)
    key = jax.random.wrap_key_data(
        eqpar.replicate(jax.random.key_data(key0), mesh=mesh)
    )

    # Checkpoints: every process saves and restores (each its own shards).
    ckpt = None
    start = 0
    if args.checkpoint_dir is not None:
        ckpt = eqpar.CheckpointManager(args.checkpoint_dir, max_to_keep=2)
        latest = ckpt.latest_step()
        if latest is not None and not args.resume:
            ckpt.close()
            raise SystemExit(
                f"{args.checkpoint_dir} already has checkpoints (the latest is step "
                f"{latest}): pass --resume to continue from it, or use another "
                "--checkpoint-dir."
            )
        if latest is not None:
            # `like` gives the structure, the statics and the shardings to restore to.
            train = ckpt.restore({"model": model, "opt_state": state, "key": key})
            model, state, key = train["model"], train["opt_state"], train["key"]
            start = latest
            log(f"resumed from step {latest} ({args.checkpoint_dir})")
        elif args.resume:
            log(f"no checkpoint in {args.checkpoint_dir} yet: starting from step 0")

    losses = []
    try:
        for i in range(start + 1, args.steps + 1):
            model, state, key, loss = step(model, state, key, xg, yg, mg)
            losses.append(float(loss))
            if ckpt is not None and (i % args.checkpoint_every == 0 or i == args.steps):
                ckpt.save(i, {"model": model, "opt_state": state, "key": key})
            if i == args.kill_at_step and me == processes - 1:
                print(f"killing this process (SIGKILL) after step {i}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
    finally:
        if ckpt is not None:
            ckpt.close()  # waits for the last save
    if start == 0:
        log(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {args.steps} steps")
    elif losses:
        log(
            f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over steps "
            f"{start + 1}..{args.steps}"
        )

    # The single-device reference, computed by this process alone.
    full = jnp.ones(args.batch, bool)

    @eqpar.filter_jit
    def single_step(model, state, key):
        key, noise = jax.random.split(key)
        x = jnp.asarray(x_all) + jitter(noise, jnp.arange(args.batch))
        grads = eqx.filter_grad(loss_fn)(model, x, jnp.asarray(y_all), full)
        updates, state = optimiser.update(grads, state, model)
        return eqx.apply_updates(model, updates), state, key

    ref, ref_state = model0, optimiser.init(eqx.filter(model0, eqx.is_array))
    ref_key = key0
    for _ in range(args.steps):
        ref, ref_state, ref_key = single_step(ref, ref_state, ref_key)

    params = [
        np.asarray(a)
        for a in eqpar.gather(jax.tree.leaves(eqx.filter(model, eqx.is_array)))
    ]
    ref_params = [np.asarray(a) for a in jax.tree.leaves(eqx.filter(ref, eqx.is_array))]
    err = max(rel_diff(a, b) for a, b in zip(params, ref_params))
    log(f"max rel. diff of the parameters vs one device: {err:.1e}")
    # The loss of the trained parameters against the initial model's, on clean data.
    trained = eqx.combine(
        eqpar.gather(eqx.filter(model, eqx.is_array)),
        eqx.filter(model, eqx.is_array, inverse=True),
    )
    clean_loss = eqpar.filter_jit(loss_fn)
    before = float(clean_loss(model0, jnp.asarray(x_all), jnp.asarray(y_all), full))
    after = float(clean_loss(trained, jnp.asarray(x_all), jnp.asarray(y_all), full))
    checks = {
        f"{n}-device training over {processes} process(es) equals one device": err
        < 1e-5,
        "the loss went down": after < before,
    }
    if me == 0:
        report(checks)
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        np.savez(out / f"params_{processes}x{n // processes}.npz", *params)
    return {"checks": checks, "losses": losses, "rel_diff": err, "processes": processes}


if __name__ == "__main__":
    raise SystemExit(0 if all(main()["checks"].values()) else 1)
