"""Models fed back stay right, whatever the order: a compiled call's output Modules
are remembered as they are rebuilt (so that the next call looks them up instead of
flattening them), and any sequence of steps on the current model, an older one,
one edited with `eqx.tree_at`, through two programs whose outputs put the model at
different places, equals the same steps on the host, with one trace per program."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

import eqpar

from .helpers import TraceCounter


class Model(eqx.Module):
    w: jax.Array
    b: jax.Array
    act: Callable  # a non-array leaf: outputs come back through jit's node data
    name: str = eqx.field(static=True, default="m")


def _update(m: Model, x: jax.Array) -> tuple[Model, jax.Array]:
    y = m.act(x @ m.w + m.b[None])
    loss = jnp.mean(y**2)
    new = eqx.tree_at(lambda m: (m.w, m.b), m, (0.9 * m.w, m.b - 0.1 * y.mean(0)))
    return new, loss


def _model_first(m, x):
    return _update(m, x)


def _loss_first(m, x):
    new, loss = _update(m, x)
    return loss, (new, loss)  # the Module one level down: not remembered, still right


PROGRAMS = {"model first": _model_first, "loss first": _loss_first}

STEP = st.one_of(
    st.tuples(
        st.just("step"),
        st.sampled_from(sorted(PROGRAMS)),
        st.sampled_from(["current", "previous", "edited"]),
    ),
    st.tuples(st.just("edit")),
)


def _host(m: Model) -> Model:
    return jax.tree.map(lambda a: np.array(a) if eqx.is_array(a) else a, m)


def _new_model(out, name: str) -> Model:
    return out[0] if name == "model first" else out[1][0]


@settings(max_examples=30)
@given(st.lists(STEP, min_size=3, max_size=12))
def test_any_sequence_of_fed_back_models_equals_the_host(steps):
    counters = {k: TraceCounter(f) for k, f in PROGRAMS.items()}
    programs = {k: eqpar.filter_jit(c) for k, c in counters.items()}
    x = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)
    current = Model(jnp.ones((3, 2)), jnp.zeros(2), jnp.tanh)
    models = {"current": current, "previous": current, "edited": current}
    for step in steps:
        if step[0] == "edit":
            c = models["current"]
            models["edited"] = eqx.tree_at(lambda m: m.b, c, c.b + 1.0)
            continue
        _, name, which = step
        m = models[which]
        want = PROGRAMS[name](_host(m), np.asarray(x))
        out = programs[name](m, x)
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(want)):
            if eqx.is_array(a):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
            else:
                assert a is b
        new = _new_model(out, name)
        assert new.act is jnp.tanh and new.name == "m"
        models["previous"], models["current"] = models["current"], new
    for name, counter in counters.items():
        assert counter.count <= 1, name
