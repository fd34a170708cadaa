"""Gradient accumulation: the gradient of a device's batch computed `microbatch`
examples at a time, so that the activations alive at once are one microbatch's.

`filter_value_and_grad_mean(..., microbatch=k)` calls `accumulate` in place of one
`filter_value_and_grad` over the device's whole batch. Each microbatch `m` of `n_m`
rows (`c_m` of them real, with `count=`) gives the value and gradient of the loss
on those rows, `L_m`; the device's loss is their weighted sum `sum_m w_m L_m`, with
`w_m = n_m / n` (or `c_m / count`), which is exactly the device's mean loss when
`fun` returns a mean over its rows. A `lax.scan` over the full microbatches sums the
weighted values and gradients in its carry (one traced body, replayed); a smaller
last microbatch, when `k` does not divide the batch, is one more call of its own
shape (the loss must see exactly the rows it averages, so it is not padded).

Everything the caller does around it (parameters marked varying once, the device
weights, the sum over devices) is unchanged, so the result is the full-batch
gradient averaged over devices: the same number, less memory.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax.extend.core import jaxpr_as_fun

from ._chunking import initial_buffer
from ._errors import AxisSizeError, SpecError
from ._specs import is_array, replace_leaves


def check_microbatch(microbatch: Any, who: str) -> None:
    if microbatch is not None and (
        isinstance(microbatch, bool)
        or not isinstance(microbatch, int)
        or microbatch < 1
    ):
        raise SpecError(
            f"{who}: `microbatch` must be a positive int (examples per gradient "
            f"step of the accumulation) or None (the whole batch at once), got "
            f"{microbatch!r}."
        )


def _batch_size(args: tuple, kwargs: dict, who: str) -> tuple[int | None, list[int]]:
    """The batch size (axis 0 of every array argument of rank >= 1) and the flat
    indices of those leaves; an `AxisSizeError` naming them if they disagree."""
    paths = jtu.tree_flatten_with_path((args, kwargs))[0]
    index = [i for i, (_, x) in enumerate(paths) if is_array(x) and np.ndim(x) >= 1]
    sizes = {np.shape(paths[i][1])[0] for i in index}
    if len(sizes) > 1:
        lines = "\n".join(
            f"  - {_name(paths[i][0])}: shape {np.shape(paths[i][1])}" for i in index
        )
        raise AxisSizeError(
            f"{who}(microbatch=...) splits axis 0 of every array argument after the "
            f"model into microbatches, but they disagree on its size "
            f"({sorted(sizes)}):\n{lines}\nPass per-batch values as arrays with the "
            "batch first, and anything else (a scalar, a broadcast table) as a "
            "scalar, a Python value, or part of the model."
        )
    return (sizes.pop() if sizes else None), index


def _name(path: Any) -> str:
    (args_or_kwargs, *rest) = path
    where = "args" if args_or_kwargs.idx == 0 else "kwargs"
    return f"{where}{jtu.keystr(tuple(rest))}"


def accumulate(
    value_and_grad: Callable[..., Any],
    model: Any,
    args: tuple,
    kwargs: dict,
    microbatch: int,
    count: Any,
    has_aux: bool,
    who: str,
) -> tuple[Any, Any, Any]:
    """`(value, aux, grads)` of `value_and_grad(model, *args, **kwargs)` (which returns
    `((value, (value, aux)), grads)`, as `eqx.filter_value_and_grad(..., has_aux=True)`
    of the caller's objective does), accumulated over microbatches of axis 0."""
    size, index = _batch_size(args, kwargs, who)
    if size is None or microbatch >= size:
        (_, (value, aux)), grads = value_and_grad(model, *args, **kwargs)
        return value, aux, grads
    full, rest = divmod(size, microbatch)
    if has_aux and rest:
        # The largest that divides: no more memory than asked for.
        near = max(d for d in range(1, microbatch + 1) if size % d == 0)
        raise SpecError(
            f"{who}(has_aux=True, microbatch={microbatch}): the device's batch of "
            f"{size} examples does not split into equal microbatches of "
            f"{microbatch}, and aux comes back stacked per microbatch, which needs "
            f"them equal. Use a microbatch that divides {size} (e.g. "
            f"microbatch={near}), or has_aux=False."
        )
    leaves, treedef = jtu.tree_flatten((args, kwargs))
    real = jnp.asarray(size if count is None else count, jnp.float32)

    def rows(start: Any, n: int, dynamic: bool) -> tuple[tuple, dict]:
        sliced = [
            jax.lax.dynamic_slice_in_dim(leaves[i], start, n)
            if dynamic
            else jax.lax.slice_in_dim(leaves[i], start, start + n)
            for i in index
        ]
        return replace_leaves(treedef, leaves, index, sliced)

    def weighted(start: Any, n: int, a: tuple, k: dict) -> tuple[Any, Any, Any]:
        """This microbatch's value and gradient, weighted by its share of the
        device's real examples (the first `count` rows, as `pad_batch` and
        `Parallel` lay them out); one with none contributes zeros, even NaNs."""
        (_, (value, aux)), grads = value_and_grad(model, *a, **k)
        real_here = jnp.clip(real - jnp.asarray(start, jnp.float32), 0.0, float(n))
        share = jnp.where(real > 0, real_here / jnp.maximum(real, 1.0), 0.0)
        keep = real_here > 0

        def scale(g: Any) -> Any:
            if g is None or not jnp.issubdtype(jnp.result_type(g), jnp.inexact):
                return g
            s = share.astype(jnp.result_type(g))
            return jnp.where(keep, g * s, jnp.zeros_like(g))

        return scale(value), aux, jtu.tree_map(scale, grads)

    def body(start: Any) -> tuple[Any, Any, Any]:
        a, k = rows(start, microbatch, True)
        return weighted(start, microbatch, a, k)

    # Trace the loss once (first microbatch's shapes); the loop replays it.
    closed, shapes = jax.make_jaxpr(body, return_shape=True)(jnp.int32(0))
    program = jaxpr_as_fun(closed)
    out_tree = jtu.tree_structure(shapes)
    value_shape, _, grad_shapes = shapes
    init = (_zeros_like(value_shape), jtu.tree_map(_zeros_like, grad_shapes))

    def step(carry: Any, i: Any) -> tuple[Any, Any]:
        value_sum, grad_sum = carry
        value, aux, grads = jtu.tree_unflatten(out_tree, program(i * microbatch))
        grad_sum = jtu.tree_map(jnp.add, grad_sum, grads)
        return (value_sum + value, grad_sum), aux

    (value, grads), aux = jax.lax.scan(step, init, jnp.arange(full, dtype=jnp.int32))
    if rest:  # a smaller last microbatch: its own shape, exact
        a, k = rows(full * microbatch, rest, False)
        v_last, _, g_last = weighted(jnp.int32(full * microbatch), rest, a, k)
        value = value + v_last
        grads = jtu.tree_map(jnp.add, grads, g_last)
    return value, aux, grads


def _zeros_like(shape: Any) -> Any:
    return initial_buffer(tuple(shape.shape), shape)
