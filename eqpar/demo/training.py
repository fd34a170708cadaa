"""Data-parallel training, checked against one device: an MLP fit by Adam to a batch
that does not divide over the devices, on one device and with the batch split over a
mesh (`filter_shard_map` + `filter_value_and_grad_mean`: padded, weighted by count),
and the loop that runs both, showing progress (tqdm's bar on a terminal, a few plain
lines in a pipe or a log file).
"""

import math
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, runtime_checkable

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float

import eqpar


EXAMPLES = 37  # does not divide over 2, 4 or 8 devices: the batch is padded


def padded_size(n: int) -> int:
    """The batch padded to a multiple of `n` devices."""
    return math.ceil(EXAMPLES / n) * n


def loss_fn(
    model: eqx.nn.MLP, x: Float[Array, "b i"], y: Float[Array, "b o"], mask: Any
) -> Float[Array, ""]:
    """The mean squared error over the examples that `mask` marks as real."""
    err = jnp.sum((jax.vmap(model)(x) - y) ** 2, axis=-1)
    count = jnp.maximum(jnp.sum(mask, dtype=jnp.float32), 1.0)
    return jnp.sum(jnp.where(mask, err, 0.0)) / count


def steps(n: int, optimiser: Any) -> tuple[eqx.nn.MLP, Callable, Callable]:
    """`(model, single_step, parallel_step)`: the initial MLP, and one optimiser step
    on every example, on one device and with the batch split over `n` devices. Both
    steps take `(model, opt_state)` and return `(model, opt_state, loss)`."""
    kx, km = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (EXAMPLES, 4))
    y = jnp.stack([jnp.sin(x[:, 0]) + x[:, 1] * x[:, 2], jnp.cos(x[:, 3])], axis=1)
    model = eqx.nn.MLP(4, 2, 32, 2, key=km)
    pad = padded_size(n) - EXAMPLES
    xp = jnp.pad(x, ((0, pad), (0, 0)))
    yp = jnp.pad(y, ((0, pad), (0, 0)))
    mask = jnp.arange(EXAMPLES + pad) < EXAMPLES

    @eqpar.filter_jit
    def single_step(model, opt_state):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(
            model, x, y, jnp.ones(EXAMPLES, bool)
        )
        updates, opt_state = optimiser.update(grads, opt_state, model)
        return eqx.apply_updates(model, updates), opt_state, loss

    def per_device(model, opt_state, x, y, mask):
        # The loss and gradient of the mean over the real examples, weighted by count.
        loss, grads = eqpar.filter_value_and_grad_mean(loss_fn, "data")(
            model, x, y, mask, count=jnp.sum(mask)
        )
        updates, opt_state = optimiser.update(grads, opt_state, model)
        return eqx.apply_updates(model, updates), opt_state, loss

    sharded = eqpar.filter_shard_map(
        per_device,
        mesh=jax.make_mesh((n,), ("data",)),
        in_specs=(P(), P(), P("data"), P("data"), P("data")),
        out_specs=P(),
    )

    def parallel_step(model, opt_state):
        return sharded(model, opt_state, xp, yp, mask)

    return model, single_step, parallel_step


class Run(NamedTuple):
    """A training run: the final model, each step's loss and wall time (seconds)."""

    model: eqx.nn.MLP
    losses: list[float]
    times: list[float]


def train_both(n: int, count: int) -> tuple[Run, Run]:
    """`count` Adam steps from the same start on one device and on `n` devices, each
    step compiled beforehand (the times are steady-state); the second shows its
    progress on stdout."""
    optimiser = optax.adam(1e-2)
    model, single_step, parallel_step = steps(n, optimiser)
    params = eqx.filter(model, eqx.is_inexact_array)
    for step in (single_step, parallel_step):  # compile outside the timings
        # Twice: the second call sees inputs placed by the first (outputs live on
        # the mesh), a new input sharding that jit compiles for once more.
        warm_model, warm_state, _ = step(model, optimiser.init(params))
        jax.block_until_ready(step(warm_model, warm_state))
    single = train(single_step, model, optimiser.init(params), count, None)
    parallel = train(parallel_step, model, optimiser.init(params), count, sys.stdout)
    return single, parallel


@runtime_checkable  # checked at run time under the tests' jaxtyping + beartype
class Stream(Protocol):
    """Where progress goes: `sys.stdout`, a file, an `io.StringIO`."""

    def write(self, s: str, /) -> int: ...

    def flush(self) -> None: ...

    def isatty(self) -> bool: ...


def train(
    step: Callable, model: eqx.nn.MLP, opt_state: Any, count: int, show: Stream | None
) -> Run:
    """`count` calls of `step`, their progress shown on `show` (if not None)."""
    losses, times = [], []
    bar = progress(count, show) if show is not None else None
    for _ in range(count):
        t0 = time.perf_counter()
        model, opt_state, loss = step(model, opt_state)
        jax.block_until_ready(eqx.filter(model, eqx.is_array))
        losses.append(float(loss))
        times.append(time.perf_counter() - t0)
        if bar is not None:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    return Run(model, losses, times)


def progress(total: int, stream: Stream) -> Any:
    """A progress bar over `total` steps: tqdm's, redrawn in place, where `stream` is
    a terminal; elsewhere (or without tqdm) about five plain lines, with no carriage
    returns. Either has tqdm's `update`, `set_postfix` and `close`."""
    if stream.isatty():
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            return tqdm(total=total, desc="  training", ncols=80, file=stream)
    return _Lines(total, stream)


class _Lines:
    """Progress as plain lines, at every fifth of the run: for pipes and log files."""

    def __init__(self, total: int, stream: Stream):
        self.total, self.n, self.postfix, self.stream = total, 0, "", stream

    def set_postfix(self, **values: str) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def update(self, k: int) -> None:
        self.n += k
        if self.n % max(self.total // 5, 1) == 0 or self.n == self.total:
            print(
                f"  training step {self.n}/{self.total} {self.postfix}",
                flush=True,
                file=self.stream,
            )

    def close(self) -> None:
        pass
