"""Optax integration: cross-device gradient averaging as a `GradientTransformation`."""

from typing import Any

import optax
from jaxtyping import ArrayLike

from ._grad import mean_of_grads
from ._vma import AxisName


def pmean_updates(axis_name: AxisName) -> optax.GradientTransformationExtraArgs:
    """An optax transformation that averages per-device updates across devices with
    [`eqpar.grad_mean`][]; put it first in an `optax.chain`.

    Like `grad_mean` it needs each device's own gradient: under `filter_vmap`,
    `filter_pmap` and `check_vma=False` that is what `eqx.filter_grad` gives; under
    `filter_shard_map` and `Parallel` with `check_vma=True` the gradient of a
    replicated parameter is invariant, and `update` raises `eqpar.ReplicationError`.
    Gradients from [`eqpar.filter_value_and_grad_mean`][] are averaged already: use a
    plain optax chain without `pmean_updates` after it.

    **Arguments:**

    - `axis_name`: the data-parallel axis (or a tuple of axes).

    **Returns:**

    A `GradientTransformationExtraArgs`: its `update` accepts `count=` (the number of
    real examples on this device), which `optax.chain` forwards, for the exact
    example-weighted mean of a padded or uneven batch.

    !!! example

        ```python
        import optax, eqpar

        optimiser = optax.chain(eqpar.pmean_updates("data"), optax.sgd(1e-2))
        # inside the per-device step:
        #   updates, state = optimiser.update(grads, state, params, count=n_real)
        ```
    """

    def init(params: optax.Params) -> optax.OptState:
        del params
        return optax.EmptyState()

    def update(
        updates: optax.Updates,
        state: optax.OptState,
        params: optax.Params | None = None,
        *,
        count: ArrayLike | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, optax.OptState]:
        del params, extra_args
        return mean_of_grads(updates, axis_name, count, "pmean_updates"), state

    return optax.GradientTransformationExtraArgs(init, update)
