"""Per-call dispatch as the number of array leaves grows: 10, 100 and 1000.

A Module holding N small arrays (shape (4,)) and three static fields (a name, a
scale, an activation) goes through each transform; the computation is trivial, so
the times are the per-call cost of getting N arrays in and out. Contenders:

(a) `eqpar.filter_jit` of a function using `eqpar.filter_vmap` inside, against
    `jax.jit` of the same function on the flattened leaves (a list of arrays,
    the static fields baked in) and `eqx.filter_jit` + `eqx.filter_vmap`;
(b) `eqpar.filter_pmap` against `jax.pmap` on the flattened leaves and
    `eqx.filter_pmap`;
(c) `eqpar.filter_shard_map` against `jax.jit(jax.shard_map)` on the flattened
    leaves.

Inputs are pre-placed where the raw baseline has them (replicated leaves, sharded
batch). Goals: eqpar <= 1.2x raw at every size (1.15x for `filter_jit`, shown
beside the floor: flatten + jit of the array list), and eqpar's growth
time(1000) / time(10) no steeper than raw's.
"""

import statistics
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from jaxtyping import Array

import eqpar

from ._common import Goal, interleaved, ratio_goal, ratios, Result, table


SIZES = (10, 100, 1000)
GOAL = 1.2
GOALS = {"jit(vmap)": 1.15}  # issue 14: filter_jit(filter_vmap) <= 1.15x raw


class Leaves(eqx.Module):
    arrays: tuple[Array, ...]
    name: str = eqx.field(static=True)
    scale: float = eqx.field(static=True)
    activation: Callable = eqx.field(static=True)


def make(n: int) -> Leaves:
    values = np.linspace(0.0, 1.0, 4 * n, dtype=np.float32).reshape(n, 4)
    arrays = tuple(jax.device_put(list(values)))
    return Leaves(arrays, name=f"leaves{n}", scale=0.5, activation=jnp.tanh)


def apply(m: Leaves, x: Array) -> Array:
    """One example, shape (4,): trivial work, every leaf used."""
    return m.activation(x * jnp.sum(jnp.stack(m.arrays), axis=0)) * m.scale


def per_device(m: Leaves, x: Array) -> Array:
    return jax.vmap(apply, in_axes=(None, 0))(m, x)


def contenders(n: int, devices: int) -> dict[str, dict[str, Callable[[], Any]]]:
    """{group: {contender: call}} for a Module of `n` leaves."""
    model = make(n)
    leaves, treedef = jtu.tree_flatten(model)

    def rebuilt(fn: Callable) -> Callable:
        return lambda leaves, x: fn(jtu.tree_unflatten(treedef, leaves), x)

    batch = 2 * devices
    x = jnp.linspace(-1.0, 1.0, batch * 4, dtype=jnp.float32).reshape(batch, 4)
    ref = per_device(model, x)

    # (a) a compiled call with a vmap inside
    raw_jit = jax.jit(rebuilt(per_device))
    eqpar_jit = eqpar.filter_jit(
        lambda m, x: eqpar.filter_vmap(apply, in_axes=(None, 0))(m, x)
    )
    eqx_jit = eqx.filter_jit(
        lambda m, x: eqx.filter_vmap(apply, in_axes=(None, 0))(m, x)
    )

    # (b) pmap: one row of (devices, 2, 4) per device; leaves replicated
    mesh_p = jax.make_mesh((devices,), ("i",), axis_types=(AxisType.Auto,))
    xp = jax.device_put(x.reshape(devices, 2, 4), NamedSharding(mesh_p, P("i")))
    leaves_p = jax.device_put(leaves, NamedSharding(mesh_p, P()))
    model_p = jtu.tree_unflatten(treedef, leaves_p)
    raw_pmap = jax.pmap(rebuilt(per_device), in_axes=(None, 0))
    eqpar_pmap = eqpar.filter_pmap(per_device, in_axes=(None, 0), axis_name="i")
    eqx_pmap = eqx.filter_pmap(per_device, in_axes=(None, 0))

    # (c) shard_map over a 1-D data mesh
    mesh = jax.make_mesh((devices,), ("data",))
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    leaves_s = jax.device_put(leaves, NamedSharding(mesh, P()))
    model_s = jtu.tree_unflatten(treedef, leaves_s)
    specs = dict(mesh=mesh, in_specs=(P(), P("data")), out_specs=P("data"))
    raw_sm = jax.jit(jax.shard_map(rebuilt(per_device), **specs))  # type: ignore
    eqpar_sm = eqpar.filter_shard_map(per_device, **specs)  # type: ignore

    # The design's floor: flatten the call in Python, pick the arrays, jit the
    # array tuple (eqpar's own compiled program). Flatten-once beats it.
    eqpar_jit(model, x)
    fun = eqpar_jit.__wrapped__
    entry, _ = eqpar_jit._compiled._lookup(fun, (model, x), {})  # noqa: SLF001
    jitted = entry.jitted

    def floor() -> Any:
        flat = jtu.tree_leaves((fun, (model, x), {}))
        return jitted(tuple(leaf for leaf in flat if eqx.is_array(leaf)))

    groups: dict[str, dict[str, Callable[[], Any]]] = {
        "jit(vmap)": {
            "jax.jit(leaves)": lambda: raw_jit(leaves, x),
            "eqpar.filter_jit(filter_vmap)": lambda: eqpar_jit(model, x),
            "eqx.filter_jit(filter_vmap)": lambda: eqx_jit(model, x),
            "floor: flatten + jit(array list)": floor,
        },
        "pmap": {
            "jax.pmap(leaves)": lambda: raw_pmap(leaves_p, xp),
            "eqpar.filter_pmap": lambda: eqpar_pmap(model_p, xp),
            "eqx.filter_pmap": lambda: eqx_pmap(model_p, xp),
        },
        "shard_map": {
            "jax.jit(jax.shard_map(leaves))": lambda: raw_sm(leaves_s, xs),
            "eqpar.filter_shard_map": lambda: eqpar_sm(model_s, xs),
        },
    }
    for fns in groups.values():  # same answers before timing anything
        for fn in fns.values():
            out = np.asarray(fn()).reshape(ref.shape)
            np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    return groups


def run(quick: bool = False) -> Result:
    calls, rounds = (40, 3) if quick else (300, 15)
    devices = jax.device_count()
    by_size = {n: contenders(n, devices) for n in SIZES}
    groups = list(by_size[SIZES[0]])
    samples: dict[str, dict[str, dict[int, list[float]]]] = {}
    for group in groups:
        names = list(by_size[SIZES[0]][group])
        # Every size and contender of a group in the same rounds, so that the
        # growth ratios compare rounds measured back to back.
        fns = {(name, n): by_size[n][group][name] for n in SIZES for name in names}
        flat = interleaved(
            {f"{k[0]}@{k[1]}": v for k, v in fns.items()},
            calls=calls,
            rounds=rounds,
            block=jax.block_until_ready,
            warmup=5 if quick else 20,
            alternate=True,
        )
        samples[group] = {
            name: {n: flat[f"{name}@{n}"] for n in SIZES} for name in names
        }

    goals: list[Goal] = []
    parts = []
    for group, by_name in samples.items():
        names = list(by_name)
        raw, ours = names[0], names[1]
        header = ["contender"] + [f"{n} leaves µs/call (min-max)" for n in SIZES]
        header += ["growth 1000/10", "µs per extra leaf"]
        rows = []
        for name in names:
            row = [name]
            for n in SIZES:
                s = by_name[name][n]
                row.append(
                    f"{statistics.median(s) * 1e6:.1f} "
                    f"({min(s) * 1e6:.0f}-{max(s) * 1e6:.0f})"
                )
            growth = [
                b / a for a, b in zip(by_name[name][SIZES[0]], by_name[name][SIZES[-1]])
            ]
            row.append(f"{statistics.median(growth):.1f}x")
            extra_us = statistics.median(by_name[name][SIZES[-1]]) - statistics.median(
                by_name[name][SIZES[0]]
            )
            row.append(f"{extra_us / (SIZES[-1] - SIZES[0]) * 1e6:.2f}")
            rows.append(row)
        ratio_row = [f"**{ours} / {raw}**"]
        for n in SIZES:
            med, lo, hi = ratios(by_name[ours][n], by_name[raw][n])
            ratio_row.append(f"**{med:.2f}x** ({lo:.2f}-{hi:.2f})")
            goals.append(
                ratio_goal(
                    f"{group}, {n} leaves: {ours} / {raw}",
                    by_name[ours][n],
                    by_name[raw][n],
                    at_most=GOALS.get(group, GOAL),
                )
            )
        ratio_row += ["", ""]
        rows.append(ratio_row)
        for name in names[2:]:
            extra = [f"{ours} / {name}"]
            for n in SIZES:
                med, lo, hi = ratios(by_name[ours][n], by_name[name][n])
                extra.append(f"{med:.2f}x ({lo:.2f}-{hi:.2f})")
            rows.append(extra + ["", ""])
        # Growth: (ours(1000) / ours(10)) / (raw(1000) / raw(10)), per round.
        lo_n, hi_n = SIZES[0], SIZES[-1]
        g_ours = [b / a for a, b in zip(by_name[ours][lo_n], by_name[ours][hi_n])]
        g_raw = [b / a for a, b in zip(by_name[raw][lo_n], by_name[raw][hi_n])]
        goals.append(
            ratio_goal(
                f"{group}: growth {hi_n}/{lo_n} leaves of {ours} relative to "
                f"{raw}'s ({statistics.median(g_ours):.1f}x vs "
                f"{statistics.median(g_raw):.1f}x)",
                g_ours,
                g_raw,
                at_most=1.0,
            )
        )
        parts.append(f"#### {group}\n\n" + table(header, rows))

    def plot(fig: Any) -> None:
        axes = fig.subplots(1, len(samples))
        for ax, (group, by_name) in zip(axes, samples.items()):
            for name, by_n in by_name.items():
                ax.plot(
                    SIZES,
                    [statistics.median(by_n[n]) * 1e6 for n in SIZES],
                    marker="o",
                    label=name,
                )
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("array leaves")
            ax.set_title(group, fontsize=9)
            ax.legend(fontsize=6)
        axes[0].set_ylabel("µs per call")

    body = (
        f"{devices} devices; {calls} calls x {rounds} interleaved rounds per "
        "contender and size; median per-call µs (min-max over rounds). Ratios are "
        "medians of per-round ratios.\n\n" + "\n\n".join(parts)
    )
    return Result(
        "dispatch_scale", "dispatch vs number of array leaves", body, goals, plot
    )
