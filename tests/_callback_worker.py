"""Run by tests/test_dispatch.py in a process of its own (a failed host callback
leaves JAX's effect tokens failed for the rest of the process): how often a host
callback runs per call of each compiling transform, against the same program in raw
JAX, when it raises and when it does not. Prints one JSON object."""

import json
import os
import sys


os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import io_callback  # noqa: E402
from jax.sharding import AxisType, PartitionSpec as P  # noqa: E402

import eqpar  # noqa: E402


N = 8
MESH = jax.make_mesh((N,), ("data",), axis_types=(AxisType.Auto,))


def programs(effect):
    def fun(x):
        io_callback(effect, None, x.sum())
        return x

    sm = dict(mesh=MESH, in_specs=P("data"), out_specs=P("data"))
    raw_sm = jax.jit(jax.shard_map(fun, **sm))
    return {
        "filter_jit": (eqpar.filter_jit(fun), jax.jit(fun)),
        "filter_shard_map": (eqpar.filter_shard_map(fun, **sm), raw_sm),
        "filter_pmap": (eqpar.filter_pmap(fun), raw_sm),
        "Parallel": (eqpar.Parallel(fun, mesh=MESH, axis_name="data"), raw_sm),
    }


def count(f, runs, raising):
    runs.clear()
    try:
        jax.block_until_ready(f(jnp.arange(float(N))))
        jax.effects_barrier()
    except Exception:
        if not raising:
            raise
    return len(runs)


def main(raising: bool) -> dict:
    runs: list[None] = []

    def effect(_):
        runs.append(None)
        if raising:
            raise ValueError("boom")

    out = {}
    for name, (ours, raw) in programs(effect).items():
        # raw first, then eqpar twice (a first call and a cached one)
        out[name] = [count(f, runs, raising) for f in (raw, ours, ours)]
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1] == "raise")))
    sys.stdout.flush()
    os._exit(0)  # a failed callback would make JAX's shutdown barrier raise again
