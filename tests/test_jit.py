import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import eqpar

from .helpers import assert_tree_allclose, TraceCounter


def test_filter_jit_module_and_statics(getkey):
    mlp = eqx.nn.MLP(4, 2, 8, 2, key=getkey())
    x = jax.random.normal(getkey(), (5, 4))
    f = eqpar.filter_jit(lambda m, x: eqpar.filter_vmap(m)(x))
    assert_tree_allclose(f(mlp, x), jax.vmap(mlp)(x))


def test_equal_but_different_statics_do_not_share_a_trace():
    counter = TraceCounter(lambda x, k: (x, type(k).__name__))
    f = eqpar.filter_jit(counter)
    x = jnp.arange(3.0)
    # 1 == 1.0 == True and they hash alike, but each must get its own trace.
    assert [f(x, k)[1] for k in (1, 1.0, True)] == ["int", "float", "bool"]
    assert counter.count == 3


def test_unhashable_static_leaf_is_an_error_naming_it():
    """As in `equinox.filter_jit` (and `jax.jit` static arguments): a static leaf
    that cannot be hashed would retrace on every call, so it is refused by name;
    the advice (close over it instead) works."""

    class Config:  # unhashable: defines __eq__ without __hash__
        def __init__(self, k):
            self.k = k

        def __eq__(self, other):
            return isinstance(other, Config) and other.k == self.k

    def scale(x, config):
        return x * config.k

    with pytest.raises(eqpar.SpecError, match=r"`config` at \(root\) \(Config\)"):
        eqpar.filter_jit(scale)(jnp.ones(2), Config(3))
    with pytest.raises(ValueError, match="Non-hashable"):  # Equinox refuses it too
        eqx.filter_jit(scale)(jnp.ones(2), Config(3))
    config = Config(3)
    closed = eqpar.filter_jit(lambda x: scale(x, config))
    assert_tree_allclose(closed(jnp.ones(2)), 3 * jnp.ones(2))


def test_unhashable_static_field_in_the_tree_structure():
    """A Module static field that cannot be hashed (a list) makes the tree
    structure itself unhashable: compared by value instead, equal lists share a
    trace and a changed list gets its own."""

    class Layers(eqx.Module):
        w: jax.Array
        sizes: list = eqx.field(static=True)

    counter = TraceCounter(lambda m, x: m.w * x + len(m.sizes))
    f = eqpar.filter_jit(counter)
    x = jnp.ones(3)
    assert_tree_allclose(f(Layers(jnp.ones(3), [1, 2]), x), jnp.full(3, 3.0))
    assert_tree_allclose(f(Layers(jnp.zeros(3), [1, 2]), x), jnp.full(3, 2.0))
    assert counter.count == 1
    assert_tree_allclose(f(Layers(jnp.ones(3), [1, 2, 3]), x), jnp.full(3, 4.0))
    assert counter.count == 2


def test_a_leaf_changing_kind_changes_the_signature():
    """The same tree structure with an array where a number was (or the reverse)
    is another signature: the number static, the array traced."""
    counter = TraceCounter(lambda x, k: x * k)
    f = eqpar.filter_jit(counter)
    x = jnp.ones(2)
    assert_tree_allclose(f(x, 2.0), 2 * x)
    assert_tree_allclose(f(x, jnp.float32(3.0)), 3 * x)
    assert_tree_allclose(f(x, jnp.float32(4.0)), 4 * x)  # traced: no new trace
    assert_tree_allclose(f(x, 2.0), 2 * x)
    assert counter.count == 2


def test_static_outputs_that_depend_on_shapes():
    f = eqpar.filter_jit(lambda x: (x * 2, x.shape[0]))
    assert f(jnp.ones(3))[1] == 3
    assert f(jnp.ones(5))[1] == 5
    assert f(jnp.ones(3))[1] == 3  # cached trace, its own static output


def test_wrapper_is_a_pytree_and_keeps_metadata(getkey):
    mlp = eqx.nn.MLP(2, 2, 4, 1, key=getkey())
    wrapped = eqpar.filter_vmap(mlp)
    assert len(jax.tree.leaves(wrapped)) == len(jax.tree.leaves(mlp))

    def documented(x):
        """Docs."""
        return x

    g = eqpar.filter_pmap(documented)
    assert g.__name__ == "documented" and g.__doc__ == "Docs."
    assert g.__wrapped__ is documented
