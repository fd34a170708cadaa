"""Deep models (issue 23 items 1-5): the specs of stacked Modules, `eqpar.Stacked`
(built sharded, folded and scanned with one trace of the block, indexable), its
remat policy, FSDP and tensor parallelism over a stack (automatic and inside
`filter_shard_map`, one layer gathered at a time), and `eqpar.filter_scan` whose
carry becomes per-device under `check_vma=True`. Every parallel result is checked
against one device running the layers one by one (unstacked)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, strategies as st
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import AxisType, PartitionSpec as P
from jaxtyping import Array, Float, Int

import eqpar

from .helpers import assert_tree_allclose, TraceCounter


AUTO = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
EXPLICIT = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
E, H = 8, 16  # embed, hidden


class Block(eqx.Module):
    w1: Float[Array, "embed hidden"]
    b1: Float[Array, " hidden"]
    w2: Float[Array, "hidden embed"]
    b2: Float[Array, " embed"]
    tp: str | None = eqx.field(static=True, default=None)  # the tensor-parallel axis

    def __call__(self, x: Float[Array, "batch embed"]) -> Float[Array, "batch embed"]:
        h = checkpoint_name(jax.nn.gelu(x @ self.w1 + self.b1[None]), "hidden")
        out = h @ self.w2
        if self.tp is not None:
            out = eqpar.psum(out, self.tp)
        return x + 0.5 * jnp.tanh(out + self.b2[None])


def make_block(key, tp=None, e=E, h=H):
    k1, k2, k3 = jax.random.split(key, 3)
    return Block(
        jax.random.normal(k1, (e, h)) * 0.3,
        jax.random.normal(k3, (h,)) * 0.1,
        jax.random.normal(k2, (h, e)) * 0.3,
        jnp.full(e, 0.1),
        tp,
    )


def keys(n):
    return jax.random.split(jax.random.key(0), n)


def data():
    kx, ky = jax.random.split(jax.random.key(1))
    return jax.random.normal(kx, (8, E)), jax.random.normal(ky, (8, E))


def unstacked_apply(layers, x):
    for layer in layers:
        x = layer(x)
    return x


def unstacked_loss(layers, x, y):
    return jnp.mean((unstacked_apply(layers, x) - y) ** 2)


def stacked_loss(stack, x, y, gather=None):
    return jnp.mean((stack.fold(x, gather=gather) - y) ** 2)


def as_unstacked(stack):
    return [stack[i] for i in range(len(stack))]


# ---------------------------------------------------------------- item 1: specs


class Shapes(eqx.Module):
    batched: Float[Array, "*batch hidden"]
    front: Float[Array, "hidden ..."]
    fixed: Float[Array, "3 hidden"]
    labelled: Float[Array, "rows=2 hidden"]
    broadcast: Float[Array, "#embed hidden"]
    anonymous: Float[Array, "_ hidden"]
    quiet: Float[Array, "embed _hidden"]
    symbolic: Float[Array, "hidden+1"]  # noqa: F821
    maybe: Float[Array, "embed hidden"] | None
    count: Int[Array, ""]
    plain: Array


def _shapes(_):
    return Shapes(
        batched=jnp.ones((2, 3, 8)),
        front=jnp.ones((8, 2, 3)),
        fixed=jnp.ones((3, 8)),
        labelled=jnp.ones((2, 8)),
        broadcast=jnp.ones((1, 8)),
        anonymous=jnp.ones((5, 8)),
        quiet=jnp.ones((4, 8)),
        symbolic=jnp.ones(9),
        maybe=jnp.ones((4, 8)),
        count=jnp.array(3),
        plain=jnp.ones((8, 8)),
    )


DIMS = {"hidden": "model", "rows": "data", "embed": "data"}


def test_the_issue_cases_a_stack_built_by_hand_shards_the_trailing_dims():
    stack = eqx.filter_vmap(make_block)(keys(3))  # w1: (3, 8, 16)
    specs = eqpar.partition_specs(stack, dims={"hidden": "model"})
    assert specs.w1 == P(None, None, "model") and specs.b1 == P(None, "model")
    specs = eqpar.partition_specs(stack, dims={"embed": "data"})
    assert specs.w1 == P(None, "data", None)  # not the layer axis
    assert specs.w2 == P(None, None, "data") and specs.b2 == P(None, "data")


def test_every_jaxtyping_form_in_a_stacked_module():
    one = eqpar.partition_specs(_shapes(0), dims=DIMS)
    stack = eqpar.Stacked(eqx.filter_vmap(_shapes, axis_size=4)(jnp.arange(4)))
    stacked = eqpar.partition_specs(stack, dims=DIMS | {"layers": None})
    for name in ["fixed", "labelled", "broadcast", "anonymous", "quiet", "maybe"]:
        assert getattr(stacked.layers, name) == P(None, *getattr(one, name)), name
    assert one.symbolic == P(None) and stacked.layers.symbolic == P(None, None)
    assert stacked.layers.count == P(None)
    assert stacked.layers.plain == P(None, None, None)  # its layer axis is named
    # Around a variadic part the stack's axis comes first, then the front names.
    assert stacked.layers.batched == P(None, None, None, "model")
    assert stacked.layers.front == P(None, "model", None, None)
    # The layer axis is named: sharded only when asked (pipeline stages).
    staged = eqpar.partition_specs(stack, dims={"layers": "data", "hidden": "model"})
    assert staged.layers.fixed == P("data", None, "model")
    assert staged.layers.plain == P("data", None, None)


@given(
    leading=st.lists(st.integers(1, 3), max_size=2),
    names=st.fixed_dictionaries(
        {}, optional={n: st.sampled_from(["data", "model", None]) for n in DIMS}
    ),
    stacked=st.booleans(),
)
def test_a_stack_gets_the_block_specs_with_unsharded_axes_in_front(
    leading, names, stacked
):
    """Any number of leading stack dimensions (hand-made stacks) or an
    `eqpar.Stacked`'s layer axis: the block's own specs, with `None` in front."""
    names = names or {"hidden": "model"}
    one = eqpar.partition_specs(_shapes(0), dims=names)
    tree = _shapes(0)
    for size in reversed(leading):
        tree = eqx.filter_vmap(lambda _, t=tree: t, axis_size=size)(jnp.arange(size))
    front = len(leading)
    if stacked:
        tree = eqpar.Stacked(
            eqx.filter_vmap(lambda _, t=tree: t, axis_size=2)(jnp.arange(2))
        )
        front += 1
    specs = eqpar.partition_specs(tree, dims=names)
    specs = specs.layers if stacked else specs
    for name in ["fixed", "labelled", "broadcast", "anonymous", "quiet", "maybe"]:
        want = P(*([None] * front), *getattr(one, name))
        assert getattr(specs, name) == want, (name, leading, stacked)
    # Around a variadic part the front names stay in front of the stack's axes
    # only for an `eqpar.Stacked`, which says how many axes it adds.
    if stacked:
        assert specs.front == P(None, *one.front[:1], *([None] * (front + 1)))


def test_an_optimiser_state_of_a_stack_gets_the_stack_specs():
    stack = eqpar.Stacked.build(make_block, keys(4))
    state = optax.adam(1e-3).init(eqx.filter(stack, eqx.is_array))
    _, (adam, _) = eqpar.partition_specs((stack, state), dims={"hidden": "model"})
    assert adam.mu.layers.w1 == adam.nu.layers.w1 == P(None, None, "model")
    assert adam.count == P()


def test_a_rank_that_cannot_be_explained_is_an_error_naming_the_leaf():
    bad = Block(jnp.ones(E), jnp.ones(H), jnp.ones((H, E)), jnp.ones(E))
    with pytest.raises(eqpar.SpecError, match=r"\.w1 has shape \(8,\).*'embed hidden'"):
        eqpar.partition_specs(bad, dims={"hidden": "model"})
    # Without `dims` no annotation is read (e.g. only path rules for an
    # optimiser state whose factored moments have other ranks).
    assert eqpar.partition_specs(bad, paths=[(r"w2", P("model"))]).w1 == P()
    # A path rule for that leaf is the way out.
    specs = eqpar.partition_specs(bad, dims={"hidden": "model"}, paths=[(r"w1", P())])
    assert specs.w1 == P() and specs.w2 == P("model", None)


# ---------------------------------------------------------------- item 2: Stacked


def test_fold_scan_index_and_unstack_equal_the_layers_one_by_one():
    stack = eqpar.Stacked.build(make_block, keys(5))
    layers = [make_block(k) for k in keys(5)]
    assert len(stack) == 5
    assert_tree_allclose(stack[2], layers[2])
    assert_tree_allclose(list(stack.unstacked()), layers)
    assert_tree_allclose(eqpar.Stacked.from_layers(layers), stack)
    x, _ = data()
    np.testing.assert_allclose(stack(x), unstacked_apply(layers, x), rtol=1e-5)
    head = stack[1:3]
    assert isinstance(head, eqpar.Stacked) and len(head) == 2
    np.testing.assert_allclose(head(x), unstacked_apply(layers[1:3], x), rtol=1e-5)

    # scan: per-layer outputs; PerLayer: per-layer inputs; the rest broadcast.
    def with_extras(block, x, scale, *, noise):
        out = block(x) * scale + noise
        return out, (out.sum(), "static")

    class Extra(eqx.Module):
        block: Block

        def __call__(self, x, scale, *, noise):
            return with_extras(self.block, x, scale, noise=noise)

    noise = jax.random.normal(jax.random.key(2), (5, 8, E))
    wrapped = eqpar.Stacked(Extra(stack.layers))
    out, (ys, tag) = wrapped.scan(x, 0.5, noise=eqpar.PerLayer(noise))
    assert tag == "static"
    ref, ref_ys = x, []
    for i, layer in enumerate(layers):
        ref, (y, _) = with_extras(layer, ref, 0.5, noise=noise[i])
        ref_ys.append(y)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ys, jnp.stack(ref_ys), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("depth", [2, 16])
def test_the_block_is_traced_once_whatever_the_depth(depth):
    counted = TraceCounter(Block.__call__)

    class Counted(Block):
        def __call__(self, x):
            return counted(self, x)

    stack = eqpar.Stacked(eqx.filter_vmap(make_block)(keys(depth)))
    stack = eqpar.Stacked(Counted(**{f: getattr(stack.layers, f) for f in _FIELDS}))
    x, y = data()
    jax.jit(jax.grad(stacked_loss))(stack, x, y)
    assert counted.count == 1


_FIELDS = ["w1", "b1", "w2", "b2", "tp"]


@pytest.mark.parametrize("depth", [2, 16])
def test_inside_typed_shard_map_the_block_is_traced_twice_whatever_the_depth(depth):
    """Once abstractly to find the carry's replication type, once by the scan."""
    counted = TraceCounter(Block.__call__)

    class Counted(Block):
        def __call__(self, x):
            return counted(self, x)

    layers = eqx.filter_vmap(lambda k: make_block(k, tp="model"))(keys(depth))
    stack = eqpar.Stacked(Counted(**{f: getattr(layers, f) for f in _FIELDS}))
    specs = eqpar.partition_specs(stack, dims={"hidden": "model"})
    x, _ = data()
    f = eqpar.filter_shard_map(
        lambda s, x: s(x), mesh=AUTO, in_specs=(specs, P()), out_specs=P()
    )
    out = f(eqpar.filter_device_put(stack, specs, mesh=AUTO), x)
    assert counted.count == 2
    ref = unstacked_apply([make_block(k) for k in keys(depth)], x)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_built_sharded_never_whole_and_equal():
    stack = eqpar.Stacked.build(
        make_block, keys(4), dims={"embed": "data", "hidden": "model"}, mesh=AUTO
    )
    assert stack.layers.w1.sharding.spec == P(None, "data", "model")
    shard = stack.layers.w1.addressable_shards[0].data
    assert shard.shape == (4, E // 2, H // 4)
    assert_tree_allclose(stack, eqpar.Stacked.build(make_block, keys(4)))


def test_a_stack_is_checkpointed_with_its_optimiser_state(tmp_path):
    stack = eqpar.Stacked.build(
        make_block, keys(3), dims={"hidden": "model"}, mesh=AUTO
    )
    state = optax.adam(1e-3).init(eqx.filter(stack, eqx.is_array))
    with eqpar.CheckpointManager(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, (stack, state))
        ckpt.wait()
        like = eqpar.Stacked.build(
            make_block,
            jax.random.split(jax.random.key(9), 3),
            dims={"hidden": "model"},
            mesh=AUTO,
        )
        back = ckpt.restore((like, state))
    assert_tree_allclose(back, (stack, state))
    assert back[0].layers.w1.sharding.spec == P(None, None, "model")


# ---------------------------------------------------------------- item 3: remat


@pytest.mark.parametrize(
    "remat",
    [True, ("hidden",), jax.checkpoint_policies.dots_saveable],
    ids=["everything", "names", "policy"],
)
def test_gradients_are_the_same_with_and_without_remat(remat):
    stack = eqpar.Stacked.build(make_block, keys(4))
    x, y = data()
    plain = jax.jit(jax.value_and_grad(stacked_loss))(stack, x, y)
    rematted = eqpar.Stacked(stack.layers, remat=remat)
    again = jax.jit(jax.value_and_grad(stacked_loss))(rematted, x, y)
    assert_tree_allclose(again[0], plain[0])
    assert_tree_allclose(again[1].layers, plain[1].layers)
    ref = jax.grad(unstacked_loss)(as_unstacked(stack), x, y)
    assert_tree_allclose(as_unstacked(again[1]), ref, rtol=1e-5, atol=1e-6)


def test_remat_recomputes_in_the_backward_pass():
    stack = eqpar.Stacked.build(make_block, keys(4))
    x, y = data()

    def saved_bytes(s):  # what the backward pass keeps from the forward one
        _, backward = jax.vjp(lambda s: stacked_loss(s, x, y), s)
        return sum(a.nbytes for a in jax.tree.leaves(backward) if eqx.is_array(a))

    everything = saved_bytes(stack)
    named = saved_bytes(eqpar.Stacked(stack.layers, remat=("hidden",)))
    nothing = saved_bytes(eqpar.Stacked(stack.layers, remat=True))
    assert nothing < named < everything


# ---------------------------------------------------------------- item 4: FSDP, TP

RULES = dict(dims={"embed": "data", "hidden": "model"})  # FSDP over data, TP over model
FSDP_ONLY = dict(dims={"embed": "data"})
STEPS = 3


def _reference(steps=STEPS):
    layers = [make_block(k) for k in keys(4)]
    x, y = data()
    opt = optax.adam(1e-2)
    state = opt.init(layers)
    for _ in range(steps):
        grads = jax.grad(unstacked_loss)(layers, x, y)
        updates, state = opt.update(grads, state, layers)
        layers = optax.apply_updates(layers, updates)
    return layers, unstacked_loss(layers, x, y)


def _same(a, b, ndim):
    def pad(s):
        return tuple(s) + (None,) * (ndim - len(s))

    return pad(a) == pad(b)


@jax.numpy_dtype_promotion("standard")  # as optax needs
def test_automatic_fsdp_and_tensor_parallel_training_equals_one_device():
    stack = eqpar.Stacked.build(make_block, keys(4), remat=True, **RULES, mesh=AUTO)
    opt = optax.adam(1e-2)
    state = opt.init(eqx.filter(stack, eqx.is_array))
    specs = eqpar.partition_specs((stack, state), **RULES)
    gather = eqpar.partition_specs(stack, **FSDP_ONLY)
    state = eqpar.filter_device_put(state, specs[1], mesh=AUTO)
    x, y = eqpar.filter_device_put(data(), P("data"), mesh=AUTO)

    @eqpar.filter_jit
    def step(stack, state, x, y):
        grads = eqx.filter_grad(stacked_loss)(stack, x, y, gather)
        updates, state = opt.update(grads, state, stack)
        return eqx.apply_updates(stack, updates), state, grads

    with jax.set_mesh(AUTO):
        for _ in range(STEPS):
            stack, state, grads = step(stack, state, x, y)
    ref, ref_loss = _reference()
    assert_tree_allclose(as_unstacked(stack), ref, rtol=1e-5, atol=1e-5)
    with jax.set_mesh(AUTO):
        out = eqpar.filter_jit(lambda s, x: s.fold(x, gather=gather))(stack, x)
    np.testing.assert_allclose(
        out, unstacked_apply(ref, data()[0]), rtol=1e-5, atol=1e-5
    )
    for g, s in zip(jax.tree.leaves(grads), jax.tree.leaves(specs[0])):
        assert _same(g.sharding.spec, s, g.ndim)  # gradients sharded as the params
    for a, s in zip(jax.tree.leaves((stack, state)), jax.tree.leaves(specs)):
        assert _same(a.sharding.spec, s, a.ndim)


def test_fsdp_on_explicit_mesh_axes_equals_one_device():
    """On Explicit axes (sharding in the types) the layer is resharded in the scan
    body; the gradient keeps the parameters' sharding."""
    stack = eqpar.Stacked.build(make_block, keys(4), **FSDP_ONLY, mesh=EXPLICIT)
    gather = eqpar.partition_specs(stack, **FSDP_ONLY)
    x, y = data()
    xs, ys = eqpar.filter_device_put((x, y), P("data"), mesh=EXPLICIT)
    with jax.set_mesh(EXPLICIT):
        value, grads = eqpar.filter_jit(eqx.filter_value_and_grad(stacked_loss))(
            stack, xs, ys, gather
        )
    layers = [make_block(k) for k in keys(4)]
    ref_value, ref_grads = jax.value_and_grad(unstacked_loss)(layers, x, y)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    assert_tree_allclose(as_unstacked(grads), ref_grads, rtol=1e-5, atol=1e-6)
    assert grads.layers.w1.sharding.spec == P(None, "data", None)


def _explicit_step(stack, x, y, gather):
    return eqpar.filter_value_and_grad_mean(stacked_loss, "data")(stack, x, y, gather)


@pytest.mark.parametrize("remat", [False, True], ids=["plain", "remat"])
@jax.numpy_dtype_promotion("standard")
def test_explicit_fsdp_and_tensor_parallel_training_equals_one_device(remat):
    """Inside filter_shard_map: each layer's shards all-gathered over `data` in the
    scan body, tensor parallel over `model` (a psum in the block), gradients
    reduce-scattered back to the parameters' shards."""
    stack = eqpar.Stacked.build(
        lambda k: make_block(k, tp="model"), keys(4), remat=remat, **RULES, mesh=AUTO
    )
    specs = eqpar.partition_specs(stack, **RULES)
    gather = eqpar.partition_specs(stack, **FSDP_ONLY)
    x, y = eqpar.filter_device_put(data(), P("data"), mesh=AUTO)
    grad_step = eqpar.filter_shard_map(
        lambda s, x, y: _explicit_step(s, x, y, gather),
        mesh=AUTO,
        in_specs=(specs, P("data"), P("data")),
        out_specs=(P(), specs),
    )
    opt = optax.adam(1e-2)
    state = opt.init(eqx.filter(stack, eqx.is_array))

    @eqpar.filter_jit
    def step(stack, state, x, y):
        loss, grads = grad_step(stack, x, y)
        updates, state = opt.update(grads, state, stack)
        return eqx.apply_updates(stack, updates), state, grads

    for _ in range(STEPS):
        stack, state, grads = step(stack, state, x, y)
    ref, _ = _reference()
    untp = [Block(b.w1, b.b1, b.w2, b.b2) for b in as_unstacked(stack)]
    assert_tree_allclose(untp, ref, rtol=1e-5, atol=1e-5)
    for g, s in zip(jax.tree.leaves(grads), jax.tree.leaves(specs)):
        assert _same(g.sharding.spec, s, g.ndim)
    # The loss and gradients at the trained parameters: those of one device.
    loss, grads = eqpar.filter_jit(grad_step)(stack, x, y)
    ref_loss, ref_grads = jax.value_and_grad(unstacked_loss)(ref, *data())
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    untp = [Block(b.w1, b.b1, b.w2, b.b2) for b in as_unstacked(grads)]
    assert_tree_allclose(untp, ref_grads, rtol=1e-5, atol=1e-6)


def _all_gather_shapes(hlo):
    import re

    return re.findall(r"= f32\[([\d,]*)\]\{[^}]*\} all-gather", hlo)


def _fsdp_step(depth, explicit, remat, e=64, h=256, rows=8):
    """The compiled gradient step of a stack of `depth` layers under FSDP over
    `data`: layers large next to the activations, so that the temporaries tell one
    gathered layer from the stack."""
    stack = eqpar.Stacked.build(
        lambda k: make_block(k, e=e, h=h),
        keys(depth),
        remat=remat,
        **FSDP_ONLY,
        mesh=AUTO,
    )
    gather = eqpar.partition_specs(stack, **FSDP_ONLY)
    x = jax.random.normal(jax.random.key(1), (rows, e))
    x, y = eqpar.filter_device_put((x, x), P("data"), mesh=AUTO)
    if explicit:
        grads = eqpar.filter_shard_map(
            lambda s, x, y: _explicit_step(s, x, y, gather)[1],
            mesh=AUTO,
            in_specs=(gather, P("data"), P("data")),
            out_specs=gather,
        )
        step = eqpar.filter_jit(grads)
    else:
        step = eqpar.filter_jit(
            lambda s, x, y: eqx.filter_grad(stacked_loss)(s, x, y, gather)
        )
    with jax.set_mesh(AUTO):
        return step.lower(stack, x, y).compile()


@pytest.mark.parametrize("remat", [False, True], ids=["plain", "remat"])
@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "shard_map"])
def test_fsdp_never_gathers_the_whole_stack(explicit, remat):
    depth, e, h, rows = 6, 64, 256, 8
    compiled = _fsdp_step(depth, explicit, remat)
    shapes = _all_gather_shapes(compiled.as_text())
    assert f"{e},{h}" in shapes or f"{h},{e}" in shapes, shapes  # one layer's
    whole = [s for s in shapes if s.count(",") == 2 and s.startswith(f"{depth},")]
    assert not whole, shapes  # never (depth, ...)
    if not remat:
        return
    # With remat, the temporaries are one or two gathered layers and one layer's
    # activations, whatever the depth.
    layer_bytes = 4 * (2 * e * h + h + e)
    acts = 4 * rows * (2 * e + 2 * h)
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp <= 2 * layer_bytes + acts, (temp, layer_bytes)
    deeper = _fsdp_step(2 * depth, explicit, remat)
    more = deeper.memory_analysis().temp_size_in_bytes - temp
    assert more < layer_bytes // 4, (more, layer_bytes)


# ---------------------------------------------------------------- item 5: filter_scan


def test_filter_scan_carry_becomes_per_device_without_a_cast():
    w = jnp.arange(8.0)

    def body(x):
        def step(c, v):
            return {"sum": c["sum"] + v * x[0], "tag": c["tag"]}, c["sum"]

        init = {"sum": jnp.zeros(()), "tag": "static"}
        carry, ys = eqpar.filter_scan(step, init, w)
        assert carry["tag"] == "static"
        return carry["sum"][None], ys[None]

    f = eqpar.filter_shard_map(
        body, mesh=AUTO, in_specs=P("data"), out_specs=(P("data"), P("data"))
    )
    x = jnp.arange(2.0) + 1
    carry, ys = f(eqpar.filter_device_put(x, P("data"), mesh=AUTO))
    np.testing.assert_allclose(carry, w.sum() * x)
    np.testing.assert_allclose(ys, x[:, None] * (jnp.cumsum(w) - w)[None])


def test_filter_scan_outside_shard_map_is_lax_scan():
    xs = jnp.arange(5.0)
    got = eqpar.filter_scan(lambda c, x: (c + x, c * x), jnp.ones(()), xs)
    want = jax.lax.scan(lambda c, x: (c + x, c * x), jnp.ones(()), xs)
    assert_tree_allclose(got, want)


def test_a_stack_carry_becomes_per_device_under_check_vma():
    """The first layer's input is the same on every device; the layers are sharded
    over `model` so the carry varies: no cast written."""
    stack = eqpar.Stacked.build(lambda k: make_block(k, tp="model"), keys(3))
    specs = eqpar.partition_specs(stack, dims={"hidden": "model"})
    x, _ = data()
    f = eqpar.filter_shard_map(
        lambda s, x: s(x),
        mesh=AUTO,
        in_specs=(specs, P()),
        out_specs=P(),
    )
    placed = eqpar.filter_device_put(stack, specs, mesh=AUTO)
    ref = unstacked_apply([make_block(k) for k in keys(3)], x)
    np.testing.assert_allclose(f(placed, x), ref, rtol=1e-5, atol=1e-6)
