"""Any sequence of calls stays right: whatever comes between two calls of a program
that runs on a mesh (the same unplaced model again, a placed one, a fresh one, a
NumPy leaf changed in place, a donated or deleted input, the placement cache turned
off and on), each call gives the single-device result, or eqpar's error for a
deleted input; a donated copy never takes its source with it."""

import equinox as eqx
import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import eqpar


MESH = jax.sharding.Mesh(
    np.array(jax.devices()), ("data",), axis_types=(AxisType.Auto,)
)
ROWS = 2 * len(jax.devices())


def _forward(m, x):
    return jax.vmap(m)(x)


def _same_shape(m, x):  # the donated batch's buffer can be reused (and is deleted)
    return x + jax.vmap(m)(x).sum(-1, keepdims=True)


PROGRAMS = {
    "forward": (
        eqpar.filter_shard_map(
            _forward, mesh=MESH, in_specs=(P(), P("data")), out_specs=P("data")
        ),
        _forward,
    ),
    "donating": (
        eqpar.filter_shard_map(
            _same_shape,
            mesh=MESH,
            in_specs=(P(), P("data")),
            out_specs=P("data"),
            donate="all-except-first",
        ),
        _same_shape,
    ),
}

CALL = st.tuples(
    st.just("call"),
    st.sampled_from(sorted(PROGRAMS)),
    st.sampled_from(["unplaced", "placed", "numpy leaf", "other"]),
    st.sampled_from(["unplaced", "placed", "numpy"]),
)
STEP = st.one_of(
    CALL,
    CALL,
    CALL,  # calls three times as often as anything else
    st.tuples(st.just("fresh model")),
    st.tuples(st.just("fresh batch")),
    st.tuples(st.just("change numpy leaf")),
    st.tuples(st.just("delete a weight")),
    st.tuples(st.just("cache"), st.booleans()),
)


class _World:
    """The inputs a sequence of steps works on, and their values on the host."""

    def __init__(self) -> None:
        self.seed = 0
        self.new_model()
        self.new_batch()
        self.numpy_weight = np.ones((8, 4), np.float32)
        # A second unplaced model, alive all along (a teacher and a student, say).
        self.other = eqx.nn.MLP(4, 3, 8, 1, key=jax.random.key(-1))

    def new_model(self) -> None:
        self.seed += 1
        self.model = eqx.nn.MLP(4, 3, 8, 1, key=jax.random.key(self.seed))
        params, static = eqx.partition(self.model, eqx.is_array)
        placed = jax.device_put(params, NamedSharding(MESH, P()))
        self.placed = eqx.combine(placed, static)

    def new_batch(self) -> None:
        self.seed += 1
        self.x = jax.random.normal(jax.random.key(self.seed), (ROWS, 4))
        self.x_placed = jax.device_put(self.x, NamedSharding(MESH, P("data")))
        self.x_host = np.asarray(self.x)

    def model_of(self, kind: str):
        if kind == "unplaced":
            return self.model
        if kind == "placed":
            return self.placed
        if kind == "other":
            return self.other
        return eqx.tree_at(lambda m: m.layers[0].weight, self.model, self.numpy_weight)

    def batch_of(self, kind: str):
        return {"unplaced": self.x, "placed": self.x_placed, "numpy": self.x_host}[kind]


def _host(tree):
    """`tree` with every array copied to the host now (a reference that nothing done
    to the inputs afterwards can change)."""
    return jax.tree.map(lambda a: np.array(a) if eqx.is_array(a) else a, tree)


def _deleted(tree) -> bool:
    return any(
        isinstance(a, jax.Array) and a.is_deleted() for a in jax.tree.leaves(tree)
    )


@pytest.fixture(autouse=True)
def _cache_back_on():
    bound = eqpar.placement_cache().max_bytes
    yield
    eqpar.placement_cache(max_bytes=bound, clear=True)


@settings(max_examples=60)
@given(st.lists(STEP, min_size=4, max_size=14))
def test_any_sequence_of_calls_gives_the_single_device_result(steps):
    world = _World()
    for step in steps:
        kind = step[0]
        if kind == "fresh model":
            world.new_model()
        elif kind == "fresh batch":
            world.new_batch()
        elif kind == "change numpy leaf":
            world.numpy_weight += 1.0
        elif kind == "delete a weight":
            world.model.layers[0].weight.delete()
        elif kind == "cache":
            eqpar.placement_cache(max_bytes=(1 << 30) if step[1] else 0)
        else:
            _, name, model_kind, batch_kind = step
            program, reference = PROGRAMS[name]
            m, x = world.model_of(model_kind), world.batch_of(batch_kind)
            if _deleted(m) or _deleted(x):
                with pytest.raises(eqpar.DeletedArrayError):
                    program(m, x)
                continue
            want = reference(_host(m), np.asarray(x))
            unplaced = [a for a in (x, *jax.tree.leaves(m)) if _on_one_device(a)]
            with _maybe_copy_donated(name, batch_kind):
                out = program(m, x)
            np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
            assert not any(a.is_deleted() for a in unplaced), "a source was donated"


def _on_one_device(a) -> bool:
    return isinstance(a, jax.Array) and len(a.sharding.device_set) == 1


def _maybe_copy_donated(name: str, batch_kind: str):
    """The warning a donating program gives when it donates a copy of its batch."""
    if name == "donating" and batch_kind != "placed":
        return pytest.warns(eqpar.EqparWarning, match="the copy was donated")
    return _Nothing()


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
