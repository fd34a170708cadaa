"""Run by tests/test_distributed.py under `python -m eqpar.launch` (or alone):
eqpar's collectives, Parallel and placement across processes, checked against
numpy. Exits 0 only if every check passes; `--fail` makes process 1 raise."""

import sys

import eqpar


def main() -> int:
    multi = eqpar.initialize()
    import jax

    if not multi:
        jax.config.update("jax_num_cpu_devices", 8)
    import equinox as eqx
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import PartitionSpec as P

    me, procs = jax.process_index(), jax.process_count()
    if "--fail" in sys.argv and me == procs - 1:
        raise RuntimeError(f"process {me} fails on purpose")
    n = jax.device_count()
    mesh = eqpar.data_mesh()
    checks = {}

    # psum over all devices of all processes.
    rows = np.arange(2 * n, dtype=np.float32).reshape(n, 2)
    per_proc = n // procs
    x = eqpar.global_batch(rows[me * per_proc : (me + 1) * per_proc], mesh=mesh)
    total = eqpar.filter_shard_map(
        lambda v: eqpar.psum(v.sum(0), "data"),
        mesh=mesh,
        in_specs=P("data"),
        out_specs=P(),
    )(x)
    checks["psum"] = np.allclose(eqpar.gather(total), rows.sum(0))

    # grad_mean with count over a padded batch split across processes.
    data = np.linspace(-1.0, 1.0, 3 * n - 3, dtype=np.float32).reshape(-1, 3)
    (padded,), n_real = eqpar.pad_batch((data,), n)
    mask = np.arange(padded.shape[0]) < n_real
    w = jnp.array([0.5, -1.0, 2.0])

    def loss(w, x, m):
        err = jnp.tanh(x @ w) ** 2
        return jnp.sum(jnp.where(m, err, 0.0)) / jnp.maximum(
            jnp.sum(m, dtype=jnp.float32), 1.0
        )

    def grad_step(w, x, m):
        g = jax.grad(loss)(eqpar.mark_varying(w, "data"), x, m)
        return eqpar.grad_mean(g, "data", count=jnp.sum(m, dtype=jnp.float32))

    k = padded.shape[0] // procs
    xg, mg = eqpar.global_batch(
        (padded[me * k : (me + 1) * k], mask[me * k : (me + 1) * k]), mesh=mesh
    )
    g = eqpar.filter_shard_map(
        grad_step, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=P()
    )(eqpar.replicate(w, mesh=mesh), xg, mg)
    ref = jax.grad(loss)(w, jnp.asarray(data), jnp.ones(len(data), bool))
    checks["grad_mean"] = np.allclose(eqpar.gather(g), ref, rtol=1e-5, atol=1e-7)

    # sensor_sum of planes split across processes: the same image everywhere.
    planes = np.random.default_rng(0).random((32, 8, 8)).astype(np.float32)
    p_per = 32 // procs
    pg = eqpar.global_batch(planes[me * p_per : (me + 1) * p_per], mesh=mesh)
    images = eqpar.filter_shard_map(
        lambda p: eqpar.sensor_sum(p, axis_name="data")[None],
        mesh=mesh,
        in_specs=P("data"),
        out_specs=P("data"),
    )(pg)
    gathered = eqpar.gather(images)
    checks["sensor_sum"] = gathered.shape == (n, 8, 8) and all(
        np.allclose(img, planes.sum(0), rtol=1e-5) for img in gathered
    )

    # Parallel on the multi-process mesh: concat, padded and trimmed.
    lin = eqx.nn.Linear(3, 2, key=jax.random.key(0))
    batch = np.linspace(0.0, 1.0, 3 * (2 * n)).astype(np.float32).reshape(-1, 3)
    per = batch.shape[0] // procs
    bg = eqpar.global_batch(batch[me * per : (me + 1) * per], mesh=mesh)
    out = eqpar.Parallel(eqpar.filter_vmap(lin), axis_name="data", mesh=mesh)(bg)
    checks["Parallel"] = np.allclose(
        eqpar.gather(out), jax.vmap(lin)(jnp.asarray(batch)), rtol=1e-5, atol=1e-6
    )

    # unreplicate of a replicated value counts every device of every process.
    r = eqpar.replicate(jnp.arange(5), mesh=mesh)
    checks["unreplicate"] = np.array_equal(
        eqpar.gather(eqpar.unreplicate(r, "sum")), n * np.arange(5)
    )

    for name, ok in checks.items():
        print(f"check {name}: {'ok' if ok else 'FAILED'}", flush=True)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
