"""The paths users actually take, side by side with raw JAX and Equinox in one run.

Small MLP (32 -> 64 -> 64 -> 32), batch 64, all devices. Groups:

1. *Unplaced model, same object every call* (a Module fresh from its constructor,
   or kept on one device between evaluation calls), under `filter_pmap`,
   `filter_shard_map` and `Parallel` on `eqpar.data_mesh()`: against the same call
   with the model pre-placed, and against `jax.pmap` / `jax.jit(jax.shard_map)` on
   the same unplaced parameters. The batch is placed for everyone.
2. *A model updated every step* (each call's output is the next call's input),
   under `filter_jit`, against `jax.jit` on the parameters and `eqx.filter_jit`.
3. *Inline wrappers*: `eqpar.filter_jit(step)(model, x)` in a loop,
   `eqpar.filter_vmap(model)(x)` at top level, `eqpar.filter_pmap(f)(model, x)`
   inline and `eqpar.filter_pmap(m.__call__)(x)` on a fresh Module every call,
   against the same wrapper built once, with Equinox written inline beside them;
   traces of the function are counted.
4. *The training loop with `Parallel` on `eqpar.data_mesh()`* (Explicit axes),
   started from an unplaced model, outputs fed back, against
   `jax.jit(jax.shard_map)` with `pmean` on the same mesh.
"""

import statistics
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import eqpar

from ._common import (
    blocking,
    Goal,
    interleaved,
    ratio_goal,
    Result,
    table,
    time_rows,
)


BATCH = 64


def _mlp(seed: int = 0) -> eqx.nn.MLP:
    return eqx.nn.MLP(32, 32, 64, 2, key=jax.random.key(seed))


def _apply(m: Any, x: Any) -> Any:
    return jax.vmap(m)(x)


def _check(fns: dict[str, Callable[[], Any]], ref: Any) -> None:
    for name, fn in fns.items():
        out = np.asarray(fn()).reshape(ref.shape)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5, err_msg=name)


def unplaced_groups(devices: int) -> tuple[dict, list[tuple[str, str, str, float]]]:
    """{group: {contender: call}} and the goals (group, num, den, at most)."""
    model = _mlp()
    params, static = eqx.partition(model, eqx.is_array)
    x = jax.random.normal(jax.random.key(1), (BATCH, 32))
    ref = jax.vmap(model)(x)

    # filter_pmap over an Auto mesh, one row of (devices, BATCH / devices, 32) each
    mesh_p = jax.make_mesh((devices,), ("i",), axis_types=(AxisType.Auto,))
    xp = jax.device_put(
        x.reshape(devices, BATCH // devices, 32), NamedSharding(mesh_p, P("i"))
    )
    placed_p = eqx.combine(jax.device_put(params, NamedSharding(mesh_p, P())), static)
    ours_p = eqpar.filter_pmap(_apply, in_axes=(None, 0))
    eqx_p = eqx.filter_pmap(_apply, in_axes=(None, 0))
    raw_p = jax.pmap(lambda p, x: _apply(eqx.combine(p, static), x), in_axes=(None, 0))

    # filter_shard_map over an Auto mesh
    mesh = jax.make_mesh((devices,), ("data",), axis_types=(AxisType.Auto,))
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    placed_s = eqx.combine(jax.device_put(params, NamedSharding(mesh, P())), static)
    specs = dict(mesh=mesh, in_specs=(P(), P("data")), out_specs=P("data"))
    ours_s = eqpar.filter_shard_map(_apply, **specs)  # type: ignore[arg-type]
    raw_s = jax.jit(
        jax.shard_map(lambda p, x: _apply(eqx.combine(p, static), x), **specs)  # type: ignore[arg-type]
    )

    # Parallel on eqpar.data_mesh() (Explicit axes)
    dmesh = eqpar.data_mesh()
    xd = jax.device_put(x, NamedSharding(dmesh, P("data")))
    placed_d = eqx.combine(jax.device_put(params, NamedSharding(dmesh, P())), static)
    ours_d = eqpar.Parallel(_apply, mesh=dmesh, in_axes=(None, 0))

    groups = {
        "filter_pmap": {
            "eqpar.filter_pmap, unplaced model": lambda: ours_p(model, xp),
            "eqpar.filter_pmap, pre-placed model": lambda: ours_p(placed_p, xp),
            "jax.pmap, unplaced params": lambda: raw_p(params, xp),
            "eqx.filter_pmap, unplaced model": lambda: eqx_p(model, xp),
        },
        "filter_shard_map": {
            "eqpar.filter_shard_map, unplaced model": lambda: ours_s(model, xs),
            "eqpar.filter_shard_map, pre-placed model": lambda: ours_s(placed_s, xs),
            "jax.jit(jax.shard_map), unplaced params": lambda: raw_s(params, xs),
        },
        "Parallel on data_mesh": {
            "eqpar.Parallel, unplaced model": lambda: ours_d(model, xd),
            "eqpar.Parallel, pre-placed model": lambda: ours_d(placed_d, xd),
        },
    }
    for fns in groups.values():
        _check(fns, ref)
    goals = [
        ("filter_pmap", "eqpar.filter_pmap, unplaced model",
         "eqpar.filter_pmap, pre-placed model", 1.3),
        ("filter_pmap", "eqpar.filter_pmap, unplaced model",
         "jax.pmap, unplaced params", 0.5),
        ("filter_shard_map", "eqpar.filter_shard_map, unplaced model",
         "eqpar.filter_shard_map, pre-placed model", 1.3),
        ("filter_shard_map", "eqpar.filter_shard_map, unplaced model",
         "jax.jit(jax.shard_map), unplaced params", 0.5),
        ("Parallel on data_mesh", "eqpar.Parallel, unplaced model",
         "eqpar.Parallel, pre-placed model", 1.3),
    ]  # fmt: skip
    return groups, goals


def _updated_group() -> dict[str, Callable[[], Any]]:
    """Each contender feeds its output back as its next input."""
    model = _mlp()
    params, static = eqx.partition(model, eqx.is_array)
    x = jax.random.normal(jax.random.key(1), (BATCH, 32))

    def step(m: Any, x: Any) -> Any:
        p, s = eqx.partition(m, eqx.is_array)
        scale = 1.0 - 1e-3 * jnp.tanh(jnp.mean(jax.vmap(m)(x)))
        return eqx.combine(jax.tree.map(lambda a: a * scale, p), s)

    def raw_step(p: Any, x: Any) -> Any:
        return eqx.filter(step(eqx.combine(p, static), x), eqx.is_array)

    raw, ours, theirs = jax.jit(raw_step), eqpar.filter_jit(step), eqx.filter_jit(step)
    state = {"raw": params, "ours": model, "theirs": model}

    def run_raw() -> Any:
        state["raw"] = raw(state["raw"], x)
        return state["raw"]

    def run_ours() -> Any:
        state["ours"] = ours(state["ours"], x)
        return state["ours"]

    def run_theirs() -> Any:
        state["theirs"] = theirs(state["theirs"], x)
        return state["theirs"]

    return {
        "jax.jit(step), params fed back": run_raw,
        "eqpar.filter_jit(step), model fed back": run_ours,
        "eqx.filter_jit(step), model fed back": run_theirs,
    }


class _Count:
    """Counts the traces of `self.fn`, a plain function (as users pass)."""

    def __init__(self, fn: Callable) -> None:
        self.traces = 0

        def counted(*args: Any) -> Any:
            self.traces += 1
            return fn(*args)

        self.fn = counted


class _Affine(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, x: Any) -> Any:
        return jax.vmap(self.mlp)(x)


def inline_groups(
    devices: int,
) -> tuple[dict[str, dict[str, Callable[[], Any]]], dict[str, _Count]]:
    model = _mlp()
    x = jax.random.normal(jax.random.key(1), (BATCH, 32))
    mesh_p = jax.make_mesh((devices,), ("i",), axis_types=(AxisType.Auto,))
    xp = jax.device_put(
        x.reshape(devices, BATCH // devices, 32), NamedSharding(mesh_p, P("i"))
    )
    counts = {
        "filter_jit inline": _Count(_apply),
        "filter_pmap inline": _Count(_apply),
    }
    jit_inline_fn = counts["filter_jit inline"].fn
    pmap_inline_fn = counts["filter_pmap inline"].fn
    jit_once = eqpar.filter_jit(_apply)
    eqx_jit_once = eqx.filter_jit(_apply)
    pmap_once = eqpar.filter_pmap(_apply, in_axes=(None, 0))
    vmap_once = eqpar.filter_vmap(model)
    fresh_count = counts["filter_pmap(m.__call__) of a fresh Module"] = _Count(_apply)

    class Fresh(eqx.Module):
        mlp: eqx.nn.MLP

        def __call__(self, x: Any) -> Any:
            fresh_count.traces += 1
            return jax.vmap(self.mlp)(x)

    params, static = eqx.partition(model, eqx.is_array)
    fresh_once = eqpar.filter_pmap(lambda m, x: m(x), in_axes=(None, 0))

    def fresh_each_call() -> Any:
        # A new Module of the same structure every call (as after an update),
        # its bound method transformed afresh.
        new = Fresh(eqx.combine(jax.tree.map(lambda a: a, params), static))
        return eqpar.filter_pmap(new.__call__)(xp)

    class Plain(eqx.Module):  # Fresh without the trace counter
        mlp: eqx.nn.MLP

        def __call__(self, x: Any) -> Any:
            return jax.vmap(self.mlp)(x)

    def fresh_to_once() -> Any:
        # A new Module every call too, passed to a wrapper built once.
        new = Plain(eqx.combine(jax.tree.map(lambda a: a, params), static))
        return fresh_once(new, xp)

    groups = {
        "filter_jit(step)(model, x)": {
            "eqpar, inline": lambda: eqpar.filter_jit(jit_inline_fn)(model, x),
            "eqpar, built once": lambda: jit_once(model, x),
            "eqx, inline": lambda: eqx.filter_jit(_apply)(model, x),
            "eqx, built once": lambda: eqx_jit_once(model, x),
        },
        "filter_vmap(model)(x) at top level": {
            "eqpar, inline": lambda: eqpar.filter_vmap(model)(x),
            "eqpar, built once": lambda: vmap_once(x),
            "eqx, inline": lambda: eqx.filter_vmap(model)(x),
        },
        "filter_pmap(f)(model, x)": {
            "eqpar, inline": lambda: eqpar.filter_pmap(
                pmap_inline_fn, in_axes=(None, 0)
            )(model, xp),
            "eqpar, built once": lambda: pmap_once(model, xp),
        },
        "filter_pmap(m.__call__)(x), fresh Module each call": {
            "eqpar, fresh Module each call": fresh_each_call,
            "eqpar, built once": fresh_to_once,
        },
    }
    return groups, counts


def _training(devices: int) -> dict[str, Callable[[], Any]]:
    """Parallel on data_mesh (Explicit), started unplaced, outputs fed back."""
    mesh = eqpar.data_mesh()
    model = eqx.nn.MLP(32, 10, 64, 2, key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_array)
    kx, ky = jax.random.split(jax.random.key(1))
    x = jax.device_put(
        jax.random.normal(kx, (BATCH, 32)), NamedSharding(mesh, P("data"))
    )
    y = jax.device_put(
        jax.random.randint(ky, (BATCH,), 0, 10), NamedSharding(mesh, P("data"))
    )

    def loss(m: Any, x: Any, y: Any) -> Any:
        logits = jax.vmap(m)(x)
        return -jnp.mean(
            jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)
        )

    def step(m: Any, x: Any, y: Any) -> Any:
        grads = eqx.filter_grad(loss)(eqpar.mark_varying(m, "data"), x, y)
        grads = eqpar.grad_mean(grads, "data")
        return eqx.apply_updates(m, jax.tree.map(lambda g: -0.01 * g, grads))

    def raw_step(p: Any, x: Any, y: Any) -> Any:
        grads = jax.grad(lambda p: loss(eqx.combine(p, static), x, y))(p)
        grads = jax.lax.pmean(grads, "data")
        return jax.tree.map(lambda a, g: a - 0.01 * g, p, grads)

    ours = eqpar.Parallel(step, reduce="first", mesh=mesh, in_axes=(None, 0, 0))
    raw = jax.jit(
        jax.shard_map(
            raw_step,
            mesh=mesh,
            in_specs=(P(), P("data"), P("data")),
            out_specs=P(),
            check_vma=False,
        )
    )
    state = {
        "ours": model,  # unplaced: the first step places it
        "raw": jax.device_put(params, NamedSharding(mesh, P())),
    }

    def run_ours() -> Any:
        state["ours"] = ours(state["ours"], x, y)
        return state["ours"]

    def run_raw() -> Any:
        state["raw"] = raw(state["raw"], x, y)
        return state["raw"]

    # Same first step as the raw one before timing anything.
    # One program with collectives in flight at a time: two different ones at once
    # can deadlock the CPU backend's simulated devices on a small machine.
    first = jax.block_until_ready(ours(model, x, y))
    want = jax.block_until_ready(raw(state["raw"], x, y))
    for a, b in zip(
        jax.tree.leaves(eqx.filter(first, eqx.is_array)), jax.tree.leaves(want)
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # Each step waits for its result (as a loop that logs the loss does): several
    # launches of a program with collectives in flight at once can starve the CPU
    # backend's simulated devices of threads on a small machine.
    return {
        "jax.jit(jax.shard_map) + pmean, params fed back": blocking(run_raw),
        "eqpar.Parallel + grad_mean, model fed back (started unplaced)": blocking(
            run_ours
        ),
    }


def run(quick: bool = False) -> Result:
    calls, rounds = (20, 3) if quick else (200, 15)
    devices = jax.device_count()
    timed: dict[str, dict[str, list[float]]] = {}
    goals: list[Goal] = []
    parts: list[str] = []

    def measure(title: str, fns: dict[str, Callable[[], Any]], n: int) -> None:
        print(f"  {title}", flush=True)
        timed[title] = interleaved(
            fns,
            calls=n,
            rounds=rounds,
            block=jax.block_until_ready,
            warmup=3 if quick else 10,
            alternate=True,
            settle=max(n // 10, 1),
        )

    # 1. unplaced model, same object
    groups, unplaced_goals = unplaced_groups(devices)
    for title, fns in groups.items():
        measure(f"unplaced model: {title}", fns, calls)
    for group, num, den, at_most in unplaced_goals:
        s = timed[f"unplaced model: {group}"]
        goals.append(ratio_goal(f"{num} / {den}", s[num], s[den], at_most=at_most))

    # 2. model updated every step
    updated = _updated_group()
    measure("model updated every step: filter_jit", updated, calls)
    s = timed["model updated every step: filter_jit"]
    ours = "eqpar.filter_jit(step), model fed back"
    goals.append(
        ratio_goal(
            f"{ours} / jax.jit(step), params fed back",
            s[ours],
            s["jax.jit(step), params fed back"],
            at_most=1.2,
        )
    )
    goals.append(
        ratio_goal(
            f"{ours} / eqx.filter_jit(step), model fed back",
            s[ours],
            s["eqx.filter_jit(step), model fed back"],
            at_most=1.0,
        )
    )

    # 3. inline wrappers
    inline, counts = inline_groups(devices)
    inline_calls = max(calls // 20, 3)
    for title, fns in inline.items():
        measure(
            f"inline: {title}", fns, inline_calls if "eqx, inline" in fns else calls
        )
        s = timed[f"inline: {title}"]
        fresh = next(k for k in fns if k != "eqpar, built once")
        goals.append(
            ratio_goal(
                f"{title}: {fresh} / eqpar, built once",
                s[fresh],
                s["eqpar, built once"],
                at_most=1.2,
            )
        )
        if "eqx, inline" in fns:
            goals.append(
                ratio_goal(
                    f"{title}: eqpar, inline / eqx, inline",
                    s["eqpar, inline"],
                    s["eqx, inline"],
                    at_most=1.0,
                )
            )
    trace_rows = []
    for what, counter in counts.items():
        n = counter.traces
        trace_rows.append([what, str(n)])
        goals.append(
            Goal(f"{what}: traces of the function over every call", "exactly 1", n,
                 n == 1, unit="count")
        )  # fmt: skip

    # 4. training loop, Parallel on data_mesh
    training = _training(devices)
    measure("training loop: Parallel on data_mesh", training, max(calls // 4, 5))
    s = timed["training loop: Parallel on data_mesh"]
    names = list(training)
    goals.append(
        ratio_goal(f"{names[1]} / {names[0]} (time per step)", s[names[1]],
                   s[names[0]], at_most=1.1)
    )  # fmt: skip

    for title, samples in timed.items():
        parts.append(
            f"#### {title}\n\n"
            + table(
                ["contender", "median µs/call", "min-max over rounds"],
                time_rows(samples, list(samples)),
            )
        )
    parts.append(
        "#### Traces\n\n" + table(["inline pattern", "traces over all calls"],
                                  trace_rows)
    )  # fmt: skip

    def plot(fig: Any) -> None:
        axes = fig.subplots(1, 4)
        sections = [
            [t for t in timed if t.startswith("unplaced")],
            [t for t in timed if t.startswith("model updated")],
            [t for t in timed if t.startswith("inline")],
            [t for t in timed if t.startswith("training")],
        ]
        for ax, titles in zip(axes, sections):
            labels, values = [], []
            for t in titles:
                for name, v in timed[t].items():
                    labels.append(f"{t.split(': ', 1)[1][:18]}: {name[:34]}")
                    values.append(statistics.median(v) * 1e6)
            ax.barh(labels, values)
            ax.set_xscale("log")
            ax.set_xlabel("µs per call (log)")
            ax.tick_params(axis="y", labelsize=5)
        axes[0].set_title("unplaced model", fontsize=8)
        axes[1].set_title("updated every step", fontsize=8)
        axes[2].set_title("inline wrappers", fontsize=8)
        axes[3].set_title("training, data_mesh", fontsize=8)

    body = (
        f"{devices} devices; {calls} calls x {rounds} interleaved rounds per group "
        f"(the inline groups with an Equinox contender that recompiles: "
        f"{inline_calls} calls); median µs per call (min-max over rounds). Goals "
        "are medians of per-round ratios.\n\n" + "\n\n".join(parts)
    )
    return Result("paths", "the paths users take", body, goals, plot)
