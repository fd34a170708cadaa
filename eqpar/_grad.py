"""Gradients across devices: one call that differentiates and averages, and a
`grad_mean` that never guesses.

The mean gradient of a data-parallel step is the gradient of the mean loss: with a
loss value `L_d` on each device `d` (and optionally `count_d` real examples there),
the objective is `J = mean_d L_d`, or `J = sum_d count_d * L_d / sum_d count_d`. A
loss that is already the same on every device (reduced with `pmean`/`psum`) is its
own mean, so the same objective covers per-device losses, `pmean`-ed losses,
globally normalised losses and weight decay alike.

[`eqpar.filter_value_and_grad_mean`][] differentiates exactly that `J`, and it can
because it owns the whole step: it marks the parameters varying (one copy per
device, [`eqpar.mark_varying`][]), casts the loss to varying (so that a loss every
device holds alike counts once per device, as under `vmap` and `pmap`), weights each
device's loss, differentiates, and sums the per-device gradients over the axis. Every
backend then computes the same thing: under `filter_vmap(axis_name=)`, `filter_pmap`
and `check_vma=False` the backward pass of `psum` is a `psum`, and under
`check_vma=True` the casts make it so.

[`eqpar.grad_mean`][] only sees gradients. Under `check_vma=True` an invariant
gradient (the same on every device) may be a sum over devices (the gradient of a
per-device loss), an average (of a `pmean`-ed loss) or a term that never varied
(weight decay): its replication type cannot tell which, so `grad_mean` raises
`eqpar.ReplicationError` for it instead of guessing.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import ArrayLike, PyTree

from ._collectives import axis_size, mark_varying
from ._errors import Checked, ReplicationError, SpecError
from ._microbatch import accumulate, check_microbatch
from ._specs import is_array
from ._vma import (
    axis_names,
    AxisName,
    manual_axes,
    to_varying,
    typed,
    varying_axes,
)


def _is_inexact(x: Any) -> bool:
    return is_array(x) and jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _count(count: ArrayLike, what: str) -> Any:
    if np.ndim(count) != 0:
        raise SpecError(
            f"{what} got count of shape {np.shape(count)}; `count` is one number per "
            "device: how many of this device's examples are real, e.g. "
            "`count=jnp.sum(mask)`."
        )
    return jnp.asarray(count, dtype=jnp.float32)


def _weights(
    count: ArrayLike | None,
    axis_name: AxisName,
    manual: tuple,
    checked: bool,
    what: str,
) -> tuple[Any, Any]:
    """`(weight, keep)`: this device's share of the mean, and whether it has any real
    examples (`None` without `count`)."""
    if count is None:
        return 1.0 / axis_size(axis_name), None
    c = _count(count, what)
    if checked:
        c = to_varying(c, manual)
    return c / checked_total(c, axis_name, what), c > 0


def checked_total(c: Any, axis_name: AxisName, what: str) -> Any:
    """`psum(c)` over the axis, checked when the program runs: a negative count, or
    no real example on any device, is an error (a weighted mean of them would be
    silently wrong, or NaN)."""
    total = jax.lax.psum(c, axis_name)
    negative = jax.lax.psum((c < 0).astype(jnp.int32), axis_name)
    total = eqx.error_if(
        total,
        negative > 0,
        f"eqpar.{what}: a `count` is negative; each device's count is the number "
        "of its real examples (e.g. `jnp.sum(mask)`), 0 or more.",
    )
    return eqx.error_if(
        total,
        total == 0,
        f"eqpar.{what}: every device's `count` is 0, so there is no real example "
        "to average over (the mean of nothing is undefined). Skip this step, or "
        "leave out a batch that is all padding.",
    )


def _psum_kept(
    tree: PyTree,
    keep: Any,
    axis_name: AxisName,
    manual: tuple,
    checked: bool,
    already: PyTree | None = None,
) -> PyTree:
    """Sums each inexact leaf over the axis, dropping devices with `keep` false (even
    where their value is NaN). `already`, a tree of the same structure, gives per
    leaf the mesh axes it is already summed over (see `_value_and_grad_mean`)."""

    def total(x: Any, done: frozenset = frozenset()) -> Any:
        if not _is_inexact(x):
            return x
        x = jnp.asarray(x)
        if keep is not None:
            x = jnp.where(keep, x, jnp.zeros_like(x))
        if checked:
            x = to_varying(x, manual)
        axes = [a for a in axis_names(axis_name) if a not in done]
        if not axes:
            return x
        return jax.lax.psum(x, tuple(axes) if len(axes) > 1 else axes[0])

    if already is None:
        return jtu.tree_map(total, tree)
    return jtu.tree_map(total, tree, already)


_NONE: frozenset = frozenset()


def _value_and_grad_mean(
    fun: Callable[..., Any],
    axis_name: AxisName,
    has_aux: bool,
    model: Any,
    args: tuple,
    kwargs: dict,
    count: ArrayLike | None,
    microbatch: int | None = None,
) -> tuple[Any, PyTree]:
    manual = manual_axes(axis_name)
    checked = typed(manual)
    weight, keep = _weights(
        count, axis_name, manual, checked, "filter_value_and_grad_mean"
    )

    def objective(m: Any, *a: Any, **k: Any) -> tuple[Any, tuple[Any, Any]]:
        out = fun(m, *a, **k)
        value, aux = out if has_aux else (out, None)
        value = jnp.asarray(value)
        if checked:  # a loss every device holds alike counts once per device
            value = to_varying(value, manual)
        if keep is not None:
            value = jnp.where(keep, value, jnp.zeros_like(value))
        share = value * jnp.asarray(weight).astype(value.dtype)
        return share, (share, aux)

    diff, static = eqx.partition(model, eqx.is_inexact_array)
    # A parameter that already varies over the axis (sharded over it, as in FSDP,
    # or one per device) gets its whole gradient from autodiff: the transpose of
    # the collective that gathers it (or its own device) already sums over the
    # axis. Only the axes a parameter is the same along are marked varying and
    # summed afterwards.
    already = jtu.tree_map(
        lambda x: frozenset(varying_axes(x)) & frozenset(manual) if checked else _NONE,
        diff,
    )
    local = eqx.combine(mark_varying(diff, axis_name), static)
    value_and_grad = eqx.filter_value_and_grad(objective, has_aux=True)
    if microbatch is None:
        (_, (share, aux)), grads = value_and_grad(local, *args, **kwargs)
    else:  # the same objective, `microbatch` examples at a time
        share, aux, grads = accumulate(
            value_and_grad,
            local,
            args,
            kwargs,
            microbatch,
            count,
            has_aux,
            "filter_value_and_grad_mean",
        )
    value = _psum_kept(share, keep, axis_name, manual, checked)
    grads = _psum_kept(grads, keep, axis_name, manual, checked, already)
    return ((value, aux) if has_aux else value), grads


class _ValueAndGradMean(eqx.Module):
    _fun: Callable[..., Any]
    _axis_name: AxisName = eqx.field(static=True)
    _has_aux: bool = eqx.field(static=True)
    _grad_only: bool = eqx.field(static=True)
    _microbatch: int | None = eqx.field(static=True, default=None)

    @property
    def __wrapped__(self) -> Callable[..., Any]:
        return self._fun

    def __call__(
        self, model: Any, /, *args: Any, count: ArrayLike | None = None, **kwargs: Any
    ) -> Any:
        out, grads = _value_and_grad_mean(
            self._fun,
            self._axis_name,
            self._has_aux,
            model,
            args,
            kwargs,
            count,
            self._microbatch,
        )
        if not self._grad_only:
            return out, grads
        return (grads, out[1]) if self._has_aux else grads

    def __get__(self, instance: Any, owner: Any) -> Any:
        if instance is None:
            return self
        return eqx.Partial(self, instance)


def filter_value_and_grad_mean(
    fun: Callable[..., Any],
    axis_name: AxisName,
    *,
    has_aux: bool = False,
    microbatch: Checked[int | None] = None,
) -> Callable[..., Any]:
    """The loss and its gradient, averaged across devices, in one call: the
    data-parallel form of `eqx.filter_value_and_grad`, the same under every transform.

    Differentiates with respect to the inexact arrays of the first argument (the
    model), like `eqx.filter_value_and_grad`. Each device's loss is its own value;
    the result is the value and gradient of their mean over `axis_name` (a loss that
    is already the same on every device, e.g. `pmean`-ed, is its own mean). So a
    per-device mean loss, a `pmean`-ed loss, a loss normalised by the global example
    count and weight decay in the loss all give the single-device gradient, under
    `filter_vmap(axis_name=...)`, `filter_pmap`, `filter_shard_map` (with or
    without `check_vma`) and `Parallel` alike.

    **Arguments:**

    - `fun`: the per-device loss, `fun(model, *args, **kwargs) -> scalar` (or
        `(scalar, aux)` with `has_aux=True`). It runs once per device on that
        device's shard of the batch.
    - `axis_name`: the data-parallel axis (or a tuple of axes) to average over.
    - `has_aux`: whether `fun` returns `(loss, aux)`.
    - `microbatch`: gradient accumulation: split each device's batch (axis 0 of
        every array argument after the model) into microbatches of this many
        examples, differentiate `fun` on one at a time (a `lax.scan`, so only one
        microbatch's activations are alive) and sum their gradients, each weighted
        by its share of the device's examples. For a `fun` that returns the mean
        loss over its rows this is exactly the full-batch result (with `count`,
        the first `count` rows are the real ones, as `eqpar.pad_batch` and
        `Parallel` lay them out). With `has_aux=True`, `aux` comes back stacked
        per microbatch, so the microbatch must divide the batch. See the
        [chunking page](../chunking.md).

    **Returns:**

    A function `(model, *args, count=None, **kwargs) -> (loss, grads)`, or
    `((loss, aux), grads)` with `has_aux=True`; `loss` and `grads` are the same on
    every device, `aux` is this device's own. `count` is taken by the wrapper, not
    passed to `fun`: the number of real examples on this device. With it the mean is
    example-weighted, `sum_d count_d * L_d / sum_d count_d`, so a padded or uneven
    batch whose loss is each device's mean over its real examples gives the
    single-device result; a device with `count == 0` contributes nothing (even if
    its loss or gradient is NaN).

    !!! example

        ```python
        import equinox as eqx, jax, jax.numpy as jnp, eqpar
        from jax.sharding import PartitionSpec as P

        mesh = eqpar.data_mesh()
        model = eqx.nn.Linear(3, 1, key=jax.random.key(0))
        x = jnp.linspace(-1, 1, 3 * 8 * jax.device_count()).reshape(-1, 3)

        def loss(model, x):                       # this device's mean loss
            return jnp.mean(jax.vmap(model)(x) ** 2)

        @eqpar.filter_shard_map(mesh=mesh, in_specs=(P(), P("data")), out_specs=P())
        def step(model, x):
            return eqpar.filter_value_and_grad_mean(loss, "data")(model, x)

        value, grads = step(model, x)
        ref_value, ref_grads = eqx.filter_value_and_grad(loss)(model, x)
        assert jnp.allclose(value, ref_value, rtol=1e-5)
        assert jnp.allclose(grads.weight, ref_grads.weight, rtol=1e-5)
        ```
    """
    check_microbatch(microbatch, "filter_value_and_grad_mean")
    wrapper = _ValueAndGradMean(fun, axis_name, has_aux, False, microbatch)
    return eqx.module_update_wrapper(wrapper)


def filter_grad_mean(
    fun: Callable[..., Any],
    axis_name: AxisName,
    *,
    has_aux: bool = False,
    microbatch: Checked[int | None] = None,
) -> Callable[..., Any]:
    """As [`eqpar.filter_value_and_grad_mean`][], returning only the averaged
    gradient: the data-parallel form of `eqx.filter_grad`.

    **Arguments:**

    As [`eqpar.filter_value_and_grad_mean`][].

    **Returns:**

    A function `(model, *args, count=None, **kwargs) -> grads`, or `(grads, aux)`
    with `has_aux=True`.

    !!! example

        ```python
        import jax, jax.numpy as jnp, eqpar

        def loss(w, x):
            return jnp.mean((x @ w) ** 2)

        w, x = jnp.array([1.0, -1.0]), jnp.arange(16.0).reshape(4, 2, 2)
        grads = eqpar.filter_vmap(
            eqpar.filter_grad_mean(loss, "i"), in_axes=(None, 0), axis_name="i"
        )(w, x)
        assert jnp.allclose(grads[0], jax.grad(loss)(w, x.reshape(8, 2)))
        ```
    """
    check_microbatch(microbatch, "filter_grad_mean")
    wrapper = _ValueAndGradMean(fun, axis_name, has_aux, True, microbatch)
    return eqx.module_update_wrapper(wrapper)


def _invariant_leaves(grads: PyTree, axis_name: AxisName) -> list[str]:
    """Paths of the inexact leaves that do not vary over a manual axis of
    `axis_name` (under `check_vma=True`)."""
    manual = manual_axes(axis_name)
    if not typed(manual):
        return []
    found = []
    for path, leaf in jtu.tree_leaves_with_path(grads):
        if _is_inexact(leaf):
            missing = [a for a in manual if a not in varying_axes(jnp.asarray(leaf))]
            if missing:
                found.append(
                    f"{jtu.keystr(path) or '(root)'} (shape {np.shape(leaf)}, "
                    f"invariant over {tuple(missing)})"
                )
    return found


def _check_per_device(grads: PyTree, axis_name: AxisName, what: str) -> None:
    """Raises `ReplicationError` if `grads` has a leaf `grad_mean` cannot know."""
    found = _invariant_leaves(grads, axis_name)
    if not found:
        return
    shown = "; ".join(found[:4]) + (f"; and {len(found) - 4} more" if found[4:] else "")
    raise ReplicationError(
        f"{what} got gradient leaves that are the same on every device (invariant "
        f"under `check_vma=True`): {shown}. Such a gradient may already be summed "
        "over the devices (the gradient of a replicated `P()` parameter and a "
        "per-device loss), averaged (of a `pmean`-ed loss) or never have varied "
        "(weight decay): its replication type cannot say which, so eqpar will not "
        "guess. Let eqpar differentiate and average in one call, where "
        "`loss(model, x, y)` is this device's loss (add `count=` the number of real "
        "examples on this device for a padded batch):\n\n"
        f"    value, grads = eqpar.filter_value_and_grad_mean(loss, {axis_name!r})"
        "(model, x, y)\n\n"
        "Its gradients are averaged already: use them as they are, without "
        "grad_mean or pmean_updates."
    )


def grad_mean(
    grads: PyTree, axis_name: AxisName, *, count: ArrayLike | None = None
) -> PyTree:
    """The mean across devices of per-device gradients.

    Averages the inexact-array leaves of `grads`; other leaves pass through. Each
    leaf must be this device's own gradient: under `filter_vmap(axis_name=...)`,
    `filter_pmap` and `check_vma=False` every gradient is; under `filter_shard_map`
    and `Parallel` with `check_vma=True` only gradients with respect to values that
    vary over the axis are. An invariant gradient leaf there (e.g. of a replicated
    `P()` parameter) may be a sum, an average or a term that never varied, so it
    raises `eqpar.ReplicationError` rather than be guessed at. For the usual step
    use [`eqpar.filter_value_and_grad_mean`][], which differentiates and averages
    in one call and is exact on every transform.

    **Arguments:**

    - `grads`: the local gradient pytree; each device's gradient should be the
        gradient of its own mean loss over its own examples.
    - `axis_name`: the data-parallel axis (or a tuple of axes).
    - `count`: the number of real examples on this device. With it the result is the
        exact example-weighted mean `sum_d count_d * g_d / sum_d count_d`, so a padded
        or uneven batch gives the single-device gradient of the real examples. A
        device with `count == 0` contributes nothing (even if its gradient is NaN).

    **Returns:**

    The averaged gradients, identical on every device.

    !!! example

        ```python
        import jax, jax.numpy as jnp, eqpar

        def loss(w, x):
            return jnp.mean((x @ w) ** 2)

        def per_device(w, x):                  # filter_vmap: gradients per device
            return eqpar.grad_mean(jax.grad(loss)(w, x), "i")

        w, x = jnp.array([1.0, -1.0]), jnp.arange(16.0).reshape(4, 2, 2)
        g = eqpar.filter_vmap(per_device, in_axes=(None, 0), axis_name="i")(w, x)
        assert jnp.allclose(g[0], jax.grad(loss)(w, x.reshape(8, 2)))
        ```
    """
    return mean_of_grads(grads, axis_name, count, "grad_mean")


def mean_of_grads(
    grads: PyTree, axis_name: AxisName, count: ArrayLike | None, what: str
) -> PyTree:
    axis_size(axis_name)
    manual = manual_axes(axis_name)
    checked = typed(manual)
    _check_per_device(grads, axis_name, what)
    if count is None:
        return jtu.tree_map(
            lambda g: jax.lax.pmean(jnp.asarray(g), axis_name) if _is_inexact(g) else g,
            grads,
        )
    c = _count(count, what)
    if checked:
        c = to_varying(c, manual)
    total = checked_total(c, axis_name, what)
    keep = c > 0
    weighted = jtu.tree_map(
        lambda g: (
            jnp.asarray(g) * c.astype(jnp.result_type(g)) if _is_inexact(g) else g
        ),
        grads,
    )
    summed = _psum_kept(weighted, keep, axis_name, manual, checked)
    return jtu.tree_map(
        lambda s: s / total.astype(s.dtype) if _is_inexact(s) else s, summed
    )
