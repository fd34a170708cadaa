"""The bad-input table: bad or unusual input to every part of eqpar's public API gets
an eqpar error type whose message names what is wrong and says what to do; where it
gives advice that can be followed as written, following it works. None of these
returns a result silently."""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, PartitionSpec as P
from jaxtyping import Array, Float

import eqpar

from .helpers import assert_tree_allclose


N = 8  # devices (tests/conftest.py)


def auto_mesh(name="data"):
    return jax.make_mesh((N,), (name,), axis_types=(AxisType.Auto,))


def sm(fun, **kw):
    kw.setdefault("mesh", auto_mesh())
    kw.setdefault("in_specs", P("data"))
    kw.setdefault("out_specs", P("data"))
    return eqpar.filter_shard_map(fun, **kw)


def _advice(message: str, start: str) -> str:
    """The first code snippet in backticks of `message` that starts with `start`:
    the advice, to be followed as written."""
    for snippet in re.findall(r"`([^`]+)`", message):
        if snippet.startswith(start):
            return snippet
    raise AssertionError(f"no advice starting with {start!r} in: {message}")


@dataclass
class Row:
    id: str
    bad: Callable[[], Any]
    error: type[Exception]
    match: str
    # Follows the message's advice (given the message); returns (got, want) to
    # compare, or None when running without an error is the point.
    fix: Callable[[str], Any] | None = None


def _vmap_collective_in(kind: str, check_vma: bool = True):
    def inner(x):
        return eqpar.filter_vmap(lambda v: v - eqpar.pmean(v, "b"), axis_name="b")(x)

    x = jnp.arange(16.0).reshape(16, 1)
    if kind == "Parallel":
        return eqpar.Parallel(inner, check_vma=check_vma)(x)
    return sm(inner, check_vma=check_vma)(x)


def _lax_collective_in_shard_map(check_vma: bool = True):
    def inner(x):
        return jax.vmap(lambda v: v - jax.lax.pmean(v, ("data", "b")), axis_name="b")(x)

    return sm(inner, check_vma=check_vma)(jnp.arange(16.0))


def _centred(x):  # what the collectives above compute, on one device
    blocks = x.reshape(N, -1, *x.shape[1:])
    return (blocks - blocks.mean(1, keepdims=True)).reshape(x.shape)


def _grad_explicit(kind: str, context: bool):
    mesh = eqpar.data_mesh(explicit=True)
    x = jnp.arange(16.0)
    if kind == "Parallel":
        f = eqpar.Parallel(lambda w, x: w * x, in_axes=(None, 0), mesh=mesh)
    else:
        f = eqpar.filter_shard_map(
            lambda w, x: w * x,
            mesh=mesh,
            in_specs=(P(), P("data")),
            out_specs=P("data"),
        )
    grad = jax.grad(lambda w: f(w, x).sum())
    if not context:
        return grad(jnp.float32(2.0))
    with jax.set_mesh(mesh):
        return grad(jnp.float32(2.0))


def _unbound_optax():
    opt = eqpar.pmean_updates("data")
    params = jnp.ones(3)
    return opt.update(params, opt.init(params))


# ---------------------------------------------------- checkpoints and start-up


def _saved(tree, step=1, stray=None):
    """A CheckpointManager over a fresh folder holding `tree` as `step` (and an empty
    folder named `stray`, if given), closed when the test's process ends."""
    directory = tempfile.mkdtemp(prefix="eqpar-bad-input-")
    ckpt = eqpar.CheckpointManager(directory)
    _managers.append(ckpt)
    if tree is not None:
        ckpt.save(step, tree)
        ckpt.wait()
    if stray is not None:  # left by something else: seen by the next manager
        ckpt.close()
        os.mkdir(os.path.join(directory, str(stray)))
        ckpt = eqpar.CheckpointManager(directory)
        _managers.append(ckpt)
    return ckpt


_managers: list[eqpar.CheckpointManager] = []
_files: list[str] = []


@pytest.fixture(autouse=True, scope="module")
def _close_managers():
    yield
    for ckpt in _managers:
        ckpt.close()
        shutil.rmtree(ckpt.directory, ignore_errors=True)
    for path in _files:
        os.remove(path)


def _scalars_and_vector():
    return {"step": jnp.int32(3), "w": jnp.arange(8.0)}


def _restore_with_spec(spec):
    tree = _scalars_and_vector()
    return _saved(tree).restore(tree, spec=spec, mesh=eqpar.data_mesh())


def _replicated_pair():
    return eqpar.replicate({"a": jnp.ones(2), "b": jnp.ones(2)}, mesh=eqpar.data_mesh())


def _save_beside_a_stray_folder_keeping_two():
    directory = _saved({"w": jnp.ones(2)}, step=1, stray=5).directory
    ckpt = eqpar.CheckpointManager(directory, max_to_keep=2)
    _managers.append(ckpt)
    with pytest.warns(eqpar.EqparWarning, match="not one"):
        ckpt.save(2, {"w": jnp.ones(2)})


def _a_file():
    handle, path = tempfile.mkstemp(prefix="eqpar-not-a-folder-")
    os.close(handle)
    _files.append(path)
    return path


def _save_onto_stray_folder():
    with pytest.warns(eqpar.EqparWarning, match="not one"):
        ckpt = _saved({"w": jnp.ones(2)}, step=1, stray=5)
        ckpt.latest_step()
    ckpt.save(5, {"w": jnp.ones(2)})


def _kernel_matmul(varying=None):
    """`eqpar.kernel` of a matmul on a 2x4 mesh: x's rows over `data`, w's columns
    over `model`."""
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    x, w = jnp.arange(8.0).reshape(4, 2), jnp.arange(8.0).reshape(2, 4)
    return eqpar.filter_shard_map(
        eqpar.kernel(jnp.matmul, varying=varying),
        mesh=mesh,
        in_specs=(P("data"), P(None, "model")),
        out_specs=P("data", "model"),
    )(x, w)


def _kernel_batched(inside: bool):
    """A kernel mapped by `filter_vmap` around it, or by `jax.vmap` inside it."""
    x, w = jnp.arange(16.0).reshape(8, 1, 2), jnp.arange(6.0).reshape(2, 3)
    mapped = (
        eqpar.kernel(jax.vmap(jnp.matmul, in_axes=(0, None)))
        if inside
        else eqpar.filter_vmap(eqpar.kernel(jnp.matmul), in_axes=(0, None))
    )
    return sm(mapped, in_specs=(P("data"), P()))(x, w)


ROWS = [
    # ---------------------------------------------------------------- filter_vmap
    Row(
        "vmap/sizes-disagree",
        lambda: eqpar.filter_vmap(lambda a, b: a + b)(jnp.ones(2), jnp.ones(3)),
        eqpar.AxisSizeError,
        r"argument `b`.*size 3",
    ),
    Row(
        "vmap/axis-out-of-range",
        lambda: eqpar.filter_vmap(lambda x: x, in_axes=2)(jnp.ones(3)),
        eqpar.SpecError,
        r"axis 2 of argument `x`.*rank 1",
    ),
    Row(
        "vmap/unknown-dict-name",
        lambda: eqpar.filter_vmap(lambda x: x, in_axes=dict(y=0))(jnp.ones(3)),
        eqpar.SpecError,
        r"\['y'\]",
    ),
    Row(
        "vmap/nothing-mapped",
        lambda: eqpar.filter_vmap(lambda x: x, in_axes=None)(jnp.ones(3)),
        eqpar.SpecError,
        "axis_size",
        lambda msg: (
            eqpar.filter_vmap(lambda x: x, in_axes=None, axis_size=2)(jnp.ones(3)),
            jnp.ones((2, 3)),
        ),
    ),
    Row(
        "vmap/spec-not-a-prefix",
        lambda: eqpar.filter_vmap(lambda t: t["a"], in_axes=({"a": 0, "z": None},))(
            {"a": jnp.ones(3), "b": jnp.ones(3)}
        ),
        eqpar.SpecError,
        "argument `t`.*not a pytree prefix",
    ),
    Row(
        "vmap/spec-of-wrong-kind",
        lambda: eqpar.filter_vmap(lambda x: x, in_axes="0")(jnp.ones(3)),
        eqpar.SpecError,
        "int or None",
    ),
    Row(
        "vmap/chunk-size-zero",
        lambda: eqpar.filter_vmap(lambda x: x, chunk_size=0),
        eqpar.SpecError,
        "chunk_size.*positive",
    ),
    Row(
        "vmap/chunk-size-with-axis-name",
        lambda: eqpar.filter_vmap(lambda x: x, chunk_size=2, axis_name="i"),
        eqpar.SpecError,
        "chunk_size.*axis_name",
    ),
    Row(
        "vmap/axis-size-string",
        lambda: eqpar.filter_vmap(lambda x: x, axis_size="8"),
        eqpar.EqparError,
        "axis_size",
    ),
    Row(
        "vmap/axis-size-negative",
        lambda: eqpar.filter_vmap(lambda x: x, axis_size=-1),
        eqpar.EqparError,
        "axis_size",
    ),
    Row(
        "vmap/not-callable",
        lambda: eqpar.filter_vmap(3),
        eqpar.SpecError,
        "not callable",
    ),
    Row(
        "vmap/out-axes-none-on-mapped-output",
        lambda: eqpar.filter_vmap(lambda x: x * 2, out_axes=None)(jnp.arange(3.0)),
        eqpar.EqparError,
        "out_axes",
    ),
    Row(
        "vmap/out-axes-none-chunked",
        lambda: eqpar.filter_vmap(lambda x: x * 2, out_axes=None, chunk_size=2)(
            jnp.arange(5.0)
        ),
        eqpar.EqparError,
        "out_axes",
    ),
    # ---------------------------------------------------------------- filter_pmap
    Row(
        "pmap/sizes-disagree",
        lambda: eqpar.filter_pmap(lambda a, b: a + b)(jnp.ones(2), jnp.ones(3)),
        eqpar.AxisSizeError,
        r"argument `b`.*size 3",
    ),
    Row(
        "pmap/more-elements-than-devices",
        lambda: eqpar.filter_pmap(lambda x: x)(jnp.ones(9)),
        eqpar.AxisSizeError,
        "size 9.*only 8 devices",
    ),
    Row(
        "pmap/devices-string",
        lambda: eqpar.filter_pmap(lambda x: x, devices="cpu"),
        eqpar.EqparError,
        "devices",
    ),
    Row(
        "pmap/devices-empty",
        lambda: eqpar.filter_pmap(lambda x: x, devices=[]),
        eqpar.EqparError,
        "devices.*non-empty",
    ),
    Row(
        "pmap/donate-true",
        lambda: eqpar.filter_pmap(lambda x: x, donate=True),
        eqpar.SpecError,
        "donate",
    ),
    Row(
        "pmap/axis-size-negative",
        lambda: eqpar.filter_pmap(lambda x: x, axis_size=-1),
        eqpar.EqparError,
        "axis_size",
    ),
    Row(
        "pmap/not-callable",
        lambda: eqpar.filter_pmap("f"),
        eqpar.SpecError,
        "not callable",
    ),
    Row(
        "pmap/out-axes-none-on-per-device-output",
        lambda: eqpar.filter_pmap(lambda x: x * 2, out_axes=None)(jnp.arange(8.0)),
        eqpar.EqparError,
        "out_axes",
    ),
    Row(
        "pmap/nested",
        lambda: eqpar.filter_pmap(lambda x: eqpar.filter_pmap(lambda y: y)(x))(
            jnp.ones((2, 2))
        ),
        eqpar.EqparError,
        "nest",
    ),
    # ---------------------------------------------------------------- filter_jit
    Row(
        "jit/donate-true",
        lambda: eqpar.filter_jit(lambda x: x, donate=True),
        eqpar.SpecError,
        "donate",
    ),
    Row(
        "jit/donate-unknown",
        lambda: eqpar.filter_jit(lambda x: x, donate="some"),
        eqpar.SpecError,
        "donate.*'all'",
    ),
    Row(
        "jit/not-callable",
        lambda: eqpar.filter_jit([1]),
        eqpar.SpecError,
        "not callable",
    ),
    Row(
        "jit/unhashable-static",
        lambda: eqpar.filter_jit(lambda x, opts: x)(jnp.ones(2), {1, 2}),
        eqpar.SpecError,
        "hashable.*`opts`.*set",
        lambda msg: (
            eqpar.filter_jit(lambda x, opts: x)(jnp.ones(2), frozenset({1, 2})),
            jnp.ones(2),
        ),
    ),
    # ---------------------------------------------------------- filter_shard_map
    Row(
        "shard_map/mesh-string",
        lambda: sm(lambda x: x, mesh="data"),
        eqpar.MeshError,
        "mesh='data'.*jax.sharding.Mesh.*data_mesh",
        lambda msg: (
            sm(lambda x: x, mesh=eqpar.data_mesh())(jnp.arange(8.0)),
            jnp.arange(8.0),
        ),
    ),
    Row(
        "shard_map/axis-names-string",
        lambda: sm(lambda x: x, axis_names="data"),
        eqpar.SpecError,
        "axis_names='data'.*set.*characters",
        lambda msg: (
            sm(lambda x: x, **eval("dict(" + _advice(msg, "axis_names={") + ")"))(
                jnp.arange(8.0)
            ),
            jnp.arange(8.0),
        ),
    ),
    Row(
        "shard_map/axis-names-unknown",
        lambda: sm(lambda x: x, axis_names={"model"}),
        eqpar.MeshError,
        r"\['model'\].*\('data',\)",
    ),
    Row(
        "shard_map/check-vma-string",
        lambda: sm(lambda x: x, check_vma="no"),
        eqpar.SpecError,
        "check_vma='no'.*True.*False",
    ),
    Row(
        "shard_map/not-callable",
        lambda: sm(42),
        eqpar.SpecError,
        "not callable",
    ),
    Row(
        "shard_map/donate-true",
        lambda: sm(lambda x: x, donate=True),
        eqpar.SpecError,
        "donate",
    ),
    Row(
        "shard_map/indivisible",
        lambda: sm(lambda x: x)(jnp.ones((37, 2))),
        eqpar.AxisSizeError,
        "size 37.*8 devices.*pad_batch",
        lambda msg: (
            sm(lambda x: x)(eqpar.pad_batch(jnp.ones((37, 2)), N)[0])[:37],
            jnp.ones((37, 2)),
        ),
    ),
    Row(
        "shard_map/unknown-axis-in-spec",
        lambda: sm(lambda x: x, in_specs=P("batch"))(jnp.ones(8)),
        eqpar.MeshError,
        r"\['batch'\].*its axes are \('data',\)",
    ),
    Row(
        "shard_map/unknown-axis-in-out-spec",
        lambda: sm(lambda x: x, out_specs=P("model"))(jnp.ones(8)),
        eqpar.MeshError,
        "output.*'model'",
    ),
    Row(
        "shard_map/no-mesh",
        lambda: eqpar.filter_shard_map(
            lambda x: x, in_specs=P("data"), out_specs=P("data")
        )(jnp.ones(8)),
        eqpar.MeshError,
        r"mesh=None.*jax\.set_mesh",
    ),
    Row(
        "shard_map/tuple-spec-wrong-length",
        lambda: sm(lambda x, y: x, in_specs=(P("data"),))(jnp.ones(8), jnp.ones(8)),
        eqpar.SpecError,
        "1 entries.*2 positional",
    ),
    Row(
        "shard_map/spec-longer-than-rank",
        lambda: sm(lambda x: x, in_specs=P(None, "data"))(jnp.ones(8)),
        eqpar.SpecError,
        "longer than the array's rank",
    ),
    Row(
        "shard_map/spec-of-wrong-kind",
        lambda: sm(lambda x: x, in_specs=lambda leaf: 0)(jnp.ones(8)),
        eqpar.SpecError,
        "resolved to 0 for argument `x`.*PartitionSpec",
    ),
    Row(
        "shard_map/keyword-without-spec",
        lambda: sm(lambda x, *, w: x * w, in_specs=(P("data"),))(
            jnp.ones(8), w=jnp.ones(8)
        ),
        eqpar.SpecError,
        "`w` has no spec.*dict",
        lambda msg: (
            sm(lambda x, *, w: x * w, in_specs=dict(x=P("data"), w=P("data")))(
                jnp.ones(8), w=jnp.ones(8)
            ),
            jnp.ones(8),
        ),
    ),
    Row(
        "shard_map/star-args-without-spec",
        lambda: sm(lambda *a: a[0] + a[1], in_specs=dict())(jnp.ones(8), jnp.ones(8)),
        eqpar.SpecError,
        r"`args\[0\]`.*\*args.*tuple",
        lambda msg: (
            sm(
                lambda *a: a[0] + a[1],
                in_specs=eval(_advice(msg, "in_specs=(")[len("in_specs=") :]),
                out_specs=P(),
            )(jnp.ones(8), jnp.ones(8)),
            2 * jnp.ones(8),
        ),
    ),
    Row(
        "shard_map/replicated-out-spec-on-varying-output",
        lambda: sm(lambda x: {"a": x.sum()}, out_specs=P())(jnp.arange(8.0)),
        eqpar.ReplicationError,
        r"P\(\) for the output at \['a'\].*varies.*eqpar.psum\(x, 'data'\)",
        lambda msg: (
            sm(lambda x: {"a": eqpar.psum(x.sum(), "data")}, out_specs=P())(
                jnp.arange(8.0)
            )["a"],
            jnp.float32(28.0),
        ),
    ),
    Row(
        "shard_map/vmap-collective-inside",
        lambda: _vmap_collective_in("filter_shard_map"),
        eqpar.ReplicationError,
        r"\['b'\] of `eqpar.pmean`.*check_vma=False",
        lambda msg: (
            _vmap_collective_in("filter_shard_map", check_vma=False),
            _centred(jnp.arange(16.0).reshape(16, 1)),
        ),
    ),
    Row(
        "shard_map/lax-collective-over-vmap-axis-inside",
        lambda: _lax_collective_in_shard_map(),
        eqpar.ReplicationError,
        "BatchNorm.*check_vma=False",
        lambda msg: (
            _lax_collective_in_shard_map(check_vma=False),
            jnp.arange(16.0) - jnp.arange(16.0).mean(),
        ),
    ),
    Row(
        "shard_map/grad-outside-jit-on-explicit-mesh",
        lambda: _grad_explicit("filter_shard_map", context=False),
        eqpar.MeshError,
        r"Explicit.*jax\.set_mesh",
        lambda msg: (
            _grad_explicit("filter_shard_map", context=True),
            jnp.float32(120.0),
        ),
    ),
    Row(
        "shard_map/input-on-another-explicit-mesh",
        # Eagerly the input would simply be placed; inside a compiled function it
        # cannot be resharded from one Explicit mesh to another.
        lambda: eqpar.filter_jit(
            sm(
                lambda x: x,
                mesh=eqpar.data_mesh("data", jax.devices()[:4], explicit=True),
            )
        )(
            eqpar.filter_device_put(
                jnp.ones(8), P("data"), mesh=eqpar.data_mesh(explicit=True)
            )
        ),
        eqpar.MeshError,
        "Explicit axes.*filter_device_put",
    ),
    # ---------------------------------------------------------------- collectives
    Row(
        "collectives/unbound-axis",
        lambda: eqpar.psum(jnp.ones(3), "data"),
        eqpar.UnboundAxisError,
        "'data' is not bound.*filter_vmap",
    ),
    Row(
        "collectives/unbound-name-in-tuple",
        lambda: eqpar.filter_vmap(lambda x: eqpar.pmean(x, ("i", "j")), axis_name="i")(
            jnp.ones(3)
        ),
        eqpar.UnboundAxisError,
        r"'j' is not bound here \(of \('i', 'j'\)\)",
    ),
    Row(
        "collectives/psum-scatter-of-scalar",
        lambda: eqpar.filter_vmap(lambda x: eqpar.psum_scatter(x, "i"), axis_name="i")(
            jnp.ones(4)
        ),
        eqpar.SpecError,
        "shape \\(\\).*scalar.*eqpar.psum",
    ),
    Row(
        "collectives/psum-scatter-size",
        lambda: eqpar.filter_vmap(lambda x: eqpar.psum_scatter(x, "i"), axis_name="i")(
            jnp.ones((4, 3))
        ),
        eqpar.AxisSizeError,
        "size 3.*4 devices.*tiled",
    ),
    Row(
        "collectives/halo-wider-than-block",
        lambda: sm(lambda x: eqpar.halo_exchange(x, "data", width=3))(jnp.ones(16)),
        eqpar.AxisSizeError,
        "width=3.*only 2 entries",
    ),
    Row(
        "collectives/halo-negative-width",
        lambda: sm(lambda x: eqpar.halo_exchange(x, "data", width=-1))(jnp.ones(16)),
        eqpar.SpecError,
        "width.*non-negative",
    ),
    Row(
        "collectives/halo-axis-out-of-range",
        lambda: sm(lambda x: eqpar.halo_exchange(x, "data", width=1, axis=3))(
            jnp.ones(16)
        ),
        eqpar.SpecError,
        "axis=3.*rank 1",
    ),
    Row(
        "collectives/pmean-updates-unbound",
        _unbound_optax,
        eqpar.UnboundAxisError,
        "'data' is not bound",
    ),
    # ---------------------------------------------------------------- placement
    Row(
        "placement/data-mesh-no-devices",
        lambda: eqpar.data_mesh(devices=[]),
        eqpar.MeshError,
        "non-empty",
    ),
    Row(
        "placement/put-indivisible",
        lambda: eqpar.filter_device_put(jnp.ones(7), P("data"), mesh=eqpar.data_mesh()),
        eqpar.AxisSizeError,
        "size 7.*8 devices.*pad_batch",
    ),
    Row(
        "placement/put-unknown-axis",
        lambda: eqpar.filter_device_put(
            jnp.ones(8), P("model"), mesh=eqpar.data_mesh()
        ),
        eqpar.MeshError,
        "'model'",
    ),
    Row(
        "placement/put-spec-of-wrong-kind",
        lambda: eqpar.filter_device_put(jnp.ones(8), 0, mesh=eqpar.data_mesh()),
        eqpar.SpecError,
        "PartitionSpec",
    ),
    Row(
        "placement/put-without-mesh",
        lambda: eqpar.filter_device_put(jnp.ones(8), P("data")),
        eqpar.MeshError,
        r"mesh=None.*jax\.set_mesh",
    ),
    Row(
        "placement/replicate-without-mesh",
        lambda: eqpar.replicate(jnp.ones(3)),
        eqpar.MeshError,
        "replicate|filter_device_put",
    ),
    Row(
        "placement/unreplicate-scalar",
        lambda: eqpar.unreplicate({"loss": jnp.array(1.0)}),
        eqpar.SpecError,
        r"\['loss'\].*scalar.*no device axis",
    ),
    Row(
        "placement/unreplicate-never-replicated",
        lambda: eqpar.unreplicate(jnp.arange(5.0)),
        eqpar.SpecError,
        r"shape \(5,\).*not a device axis.*one device.*x\[0\]",
    ),
    Row(
        "placement/unreplicate-numpy",
        lambda: eqpar.unreplicate(np.arange(8.0)),
        eqpar.SpecError,
        "NumPy array.*no placement",
    ),
    Row(
        "placement/unreplicate-a-concatenated-output",
        lambda: eqpar.unreplicate(eqpar.Parallel(lambda x: x)(jnp.ones((32, 2)))),
        eqpar.SpecError,
        r"shape \(32, 2\).*not a device axis.*4 rows",
    ),
    Row(
        "placement/unreplicate-unknown-reduce",
        lambda: eqpar.unreplicate(jnp.ones((8, 2)), "median"),
        eqpar.SpecError,
        "reduce='median'.*first",
    ),
    Row(
        "placement/unreplicate-reduce-of-wrong-kind",
        lambda: eqpar.unreplicate(jnp.ones((8, 2)), 3),
        eqpar.SpecError,
        "string or callable",
    ),
    Row(
        "placement/pad-multiple-zero",
        lambda: eqpar.pad_batch(jnp.ones(3), 0),
        eqpar.SpecError,
        "positive int",
    ),
    Row(
        "placement/pad-empty-batch",
        lambda: eqpar.pad_batch(jnp.ones((0, 2)), 8),
        eqpar.AxisSizeError,
        "empty batch",
    ),
    Row(
        "placement/pad-sizes-disagree",
        lambda: eqpar.pad_batch({"a": jnp.ones(3), "b": jnp.ones(4)}, 2),
        eqpar.AxisSizeError,
        r"\['a'\]: 3.*\['b'\]: 4",
    ),
    Row(
        "placement/pad-no-arrays",
        lambda: eqpar.pad_batch({"a": 1}, 2),
        eqpar.SpecError,
        "no array leaves",
    ),
    Row(
        "placement/pad-axis-out-of-range",
        lambda: eqpar.pad_batch(jnp.ones(3), 2, axis=1),
        eqpar.SpecError,
        "no axis 1",
    ),
    # ---------------------------------------------------------------- Parallel
    Row(
        "Parallel/reduce-int",
        lambda: eqpar.Parallel(lambda x: x, reduce=123),
        eqpar.SpecError,
        "reduce=123.*'concat'",
    ),
    Row(
        "Parallel/reduce-unknown",
        lambda: eqpar.Parallel(lambda x: x, reduce="median"),
        eqpar.SpecError,
        "'median'",
    ),
    Row(
        "Parallel/not-callable",
        lambda: eqpar.Parallel(3),
        eqpar.SpecError,
        "not callable",
    ),
    Row(
        "Parallel/mesh-string",
        lambda: eqpar.Parallel(lambda x: x, mesh="data"),
        eqpar.MeshError,
        "mesh='data'.*data_mesh",
        lambda msg: (
            eqpar.Parallel(lambda x: 2 * x, mesh=eqpar.data_mesh())(jnp.arange(16.0)),
            2 * jnp.arange(16.0),
        ),
    ),
    Row(
        "Parallel/donate-true",
        lambda: eqpar.Parallel(lambda x: x, donate=True),
        eqpar.SpecError,
        "donate.*'all'",
    ),
    Row(
        "Parallel/check-vma-string",
        lambda: eqpar.Parallel(lambda x: x, check_vma="no"),
        eqpar.SpecError,
        "check_vma='no'",
    ),
    Row(
        "Parallel/axis-name-not-on-mesh",
        lambda: eqpar.Parallel(
            lambda x: x, mesh=eqpar.data_mesh(), axis_name="devices"
        ),
        eqpar.MeshError,
        r"'devices'.*\('data',\).*leave axis_name out",
        lambda msg: (
            eqpar.Parallel(lambda x: x + 1, mesh=eqpar.data_mesh())(jnp.arange(8.0)),
            jnp.arange(8.0) + 1,
        ),
    ),
    Row(
        "Parallel/two-axis-mesh-without-axis-name",
        lambda: eqpar.Parallel(lambda x: x, mesh=jax.make_mesh((2, 4), ("a", "b"))),
        eqpar.MeshError,
        r"\('a', 'b'\).*axis_name='a'",
        lambda msg: (
            eqpar.Parallel(
                lambda x: x + 1,
                mesh=jax.make_mesh((2, 4), ("a", "b")),
                **eval("dict(" + _advice(msg, "axis_name=") + ")"),
            )(jnp.arange(8.0)),
            jnp.arange(8.0) + 1,
        ),
    ),
    Row(
        "Parallel/mean-of-indivisible-batch",
        lambda: eqpar.Parallel(lambda x: x, reduce="mean")(jnp.ones((37, 2))),
        eqpar.AxisSizeError,
        "37 examples.*8 devices.*pad_batch",
    ),
    Row(
        "Parallel/concat-of-scalar",
        lambda: eqpar.Parallel(lambda x: x.sum())(jnp.ones((16, 2))),
        eqpar.SpecError,
        "concat.*a scalar.*reduce='mean'",
        lambda msg: (
            eqpar.Parallel(lambda x: x.sum(), reduce="mean")(jnp.ones((16, 2))),
            jnp.float32(4.0),
        ),
    ),
    Row(
        "Parallel/concat-not-per-example",
        lambda: eqpar.Parallel(lambda x: x.sum(0, keepdims=True))(jnp.ones((16, 2))),
        eqpar.SpecError,
        r"concat.*\(1, 2\).*1 rows.*2 examples",
    ),
    Row(
        "Parallel/concat-not-per-example-padded",
        lambda: eqpar.Parallel(lambda x: x.sum(0, keepdims=True))(jnp.ones((13, 2))),
        eqpar.SpecError,
        r"concat.*\(1, 2\).*1 rows.*2 examples",
    ),
    Row(
        "Parallel/nothing-mapped",
        lambda: eqpar.Parallel(lambda x: x, in_axes=None)(jnp.ones(8)),
        eqpar.SpecError,
        "no argument is mapped",
    ),
    Row(
        "Parallel/sizes-disagree",
        lambda: eqpar.Parallel(lambda b: b["x"])({"x": jnp.ones(8), "y": jnp.ones(5)}),
        eqpar.AxisSizeError,
        r"argument `b` at \['y'\].*size 5",
    ),
    Row(
        "Parallel/legacy-prng-key",
        lambda: eqpar.Parallel(lambda x, k: x + jax.random.normal(k[0]))(
            jnp.ones(16), jax.random.PRNGKey(0)
        ),
        eqpar.AxisSizeError,
        r"argument `k`.*PRNGKey.*typed keys.*jax\.random\.key\(seed\)",
        lambda msg: (
            eqpar.Parallel(lambda x, k: x + 0 * jax.vmap(jax.random.normal)(k))(
                jnp.ones(16), jax.random.key(0)
            ),
            jnp.ones(16),
        ),
    ),
    Row(
        "Parallel/vmap-collective-inside",
        lambda: _vmap_collective_in("Parallel"),
        eqpar.ReplicationError,
        r"\['b'\] of `eqpar.pmean`.*check_vma=False",
        lambda msg: (
            _vmap_collective_in("Parallel", check_vma=False),
            _centred(jnp.arange(16.0).reshape(16, 1)),
        ),
    ),
    Row(
        "Parallel/grad-outside-jit-on-explicit-mesh",
        lambda: _grad_explicit("Parallel", context=False),
        eqpar.MeshError,
        r"Explicit.*with jax\.set_mesh\(mesh\):",
        lambda msg: (_grad_explicit("Parallel", context=True), jnp.float32(120.0)),
    ),
    # ------------------------------------- CheckpointManager, initialize (issue 26)
    Row(
        "checkpoint/python-int-like-of-a-saved-float",
        lambda: _saved({"lr": 0.5}).restore({"lr": 0}),
        eqpar.CheckpointError,
        r"\['lr'\] was saved as float64\[\].*Python int 0.*`0\.0`",
        lambda msg: (
            _saved({"lr": 0.5}).restore({"lr": eval(_advice(msg, "0"))}),
            {"lr": 0.5},
        ),
    ),
    Row(
        "checkpoint/python-bool-like-of-a-saved-int",
        lambda: _saved({"n": 3}).restore({"n": False}),
        eqpar.CheckpointError,
        r"\['n'\] was saved as int64\[\].*Python bool False",
    ),
    Row(
        "checkpoint/numpy-scalar-like-of-another-dtype",
        lambda: _saved({"x": np.float64(0.1)}).restore({"x": np.float32(0)}),
        eqpar.CheckpointError,
        r"\['x'\] was saved as float64\[\] but `like` has float32\[\]",
    ),
    Row(
        "checkpoint/spec-splits-a-scalar",
        lambda: _restore_with_spec(P("data")),
        eqpar.SpecError,
        r"P\('data',\).*leaf at \['step'\].*rank 0.*P\(\)",
        lambda msg: (
            _restore_with_spec({"step": P(), "w": P("data")}),
            _scalars_and_vector(),
        ),
    ),
    Row(
        "checkpoint/directory-is-a-file",
        lambda: eqpar.CheckpointManager(_a_file()),
        eqpar.CheckpointError,
        r"eqpar-not-a-folder-\w+ is a file, not a folder",
    ),
    Row(
        "checkpoint/directory-inside-a-file",
        lambda: eqpar.CheckpointManager(os.path.join(_a_file(), "ckpt")),
        eqpar.CheckpointError,
        r"ckpt would be inside .*eqpar-not-a-folder-\w+, which is a file",
    ),
    Row(
        "checkpoint/numpy-string-array",
        lambda: _saved(None).save(
            1, {"w": jnp.ones(2), "names": np.array(["a", "bc"])}
        ),
        eqpar.CheckpointError,
        r"\['names'\] is an array of dtype <U2 \(shape \(2,\)\).*numbers and bools",
    ),
    Row(
        "checkpoint/numpy-object-array",
        lambda: _saved(None).save(1, {"o": np.array([None, 1])}),
        eqpar.CheckpointError,
        r"\['o'\] is an array of dtype object",
    ),
    Row(
        "checkpoint/save-onto-a-stray-folder",
        _save_onto_stray_folder,
        eqpar.CheckpointError,
        r"step 5 cannot be saved.*/5 already exists and is not a checkpoint",
    ),
    Row(
        "checkpoint/stray-folder-with-max-to-keep",
        _save_beside_a_stray_folder_keeping_two,
        eqpar.CheckpointError,
        r"/5 in the checkpoint directory.*max_to_keep=2.*delete a real one.*Remove",
    ),
    Row(
        "initialize/coordinator-address-int",
        lambda: eqpar.initialize(coordinator_address=12345),
        eqpar.MeshError,
        r"`coordinator_address` must be a string 'host:port'.*12345 \(int\).*"
        r"'127\.0\.0\.1:12345'",
    ),
    Row(
        "initialize/num-processes-zero",
        lambda: eqpar.initialize("127.0.0.1:1", 0, 0),
        eqpar.MeshError,
        r"`num_processes` must be an integer of at least 1.*got 0",
    ),
    Row(
        "initialize/process-id-out-of-range",
        lambda: eqpar.initialize("127.0.0.1:1", 2, 2),
        eqpar.MeshError,
        r"process_id=2 with num_processes=2 \(ids are 0 to 1\)",
    ),
    Row(
        "initialize/local-device-count-zero",
        lambda: eqpar.initialize(local_device_count=0),
        eqpar.MeshError,
        r"`local_device_count` must be an integer of at least 1",
    ),
    # ------------------------------------- unreplicate with a prefix of reductions
    Row(
        "placement/unreplicate-reduce-not-a-prefix",
        lambda: eqpar.unreplicate(
            eqpar.replicate(
                {"a": jnp.ones(2), "b": jnp.ones(2)}, mesh=eqpar.data_mesh()
            ),
            {"a": "mean", "c": "first"},
        ),
        eqpar.SpecError,
        r"neither a reduction.*nor a pytree prefix.*'stats': 'mean'",
    ),
    Row(
        "placement/unreplicate-unknown-reduce-in-prefix",
        lambda: eqpar.unreplicate(
            eqpar.replicate(
                {"a": jnp.ones(2), "b": jnp.ones(2)}, mesh=eqpar.data_mesh()
            ),
            {"a": "mean", "b": "median"},
        ),
        eqpar.SpecError,
        r"reduce='median' at \['b'\]; use one of",
    ),
    Row(
        "kernel/varying-misses-an-input-axis",
        lambda: _kernel_matmul(varying="data"),
        eqpar.ReplicationError,
        r"input argument `.*` at \(root\) varies over mesh axes \['model'\].*"
        r"leave `varying` out",
        lambda msg: (
            _kernel_matmul(),
            jnp.arange(8.0).reshape(4, 2) @ jnp.arange(8.0).reshape(2, 4),
        ),
    ),
    Row(
        "kernel/varying-names-an-unmapped-axis",
        lambda: _kernel_matmul(varying=("data", "rows")),
        eqpar.MeshError,
        r"\['rows'\].*\['data', 'model'\]",
        lambda msg: (
            _kernel_matmul(varying=("data", "model")),
            jnp.arange(8.0).reshape(4, 2) @ jnp.arange(8.0).reshape(2, 4),
        ),
    ),
    Row(
        "kernel/batched-from-outside",
        lambda: _kernel_batched(inside=False),
        eqpar.ReplicationError,
        r"argument `.*` at \(root\) \(varying over mesh axes \['data'\]\).*"
        r"eqpar\.kernel\(jax\.vmap\(fn",
        lambda msg: (
            _kernel_batched(inside=True),
            jnp.arange(16.0).reshape(8, 1, 2) @ jnp.arange(6.0).reshape(2, 3),
        ),
    ),
]


# ------------------------- partition_specs and Stacked: nothing silent (issues 23, 26)


class _Dense(eqx.Module):
    w: Float[Array, "embed hidden"]
    b: Float[Array, " hidden"]
    x: Float[Array, "*batch hidden"]


def _dense(w=(4, 8)):
    return _Dense(jnp.ones(w), jnp.ones(8), jnp.ones((2, 3, 8)))


def _suggested(msg: str) -> str:
    return re.search(r"Did you mean '(\w+)'", msg).group(1)


ROWS += [
    Row(
        "partition_specs/dims-name-matches-nothing",
        lambda: eqpar.partition_specs(_dense(), dims={"hiden": "model"}),
        eqpar.SpecError,
        r"`dims` names 'hiden'.*Did you mean 'hidden'\?.*'embed', 'hidden'",
        lambda msg: (
            eqpar.partition_specs(_dense(), dims={_suggested(msg): "model"}).w,
            P(None, "model"),
        ),
    ),
    Row(
        "partition_specs/paths-rule-matches-nothing",
        lambda: eqpar.partition_specs(_dense(), paths=[(r"\.weight", P("model"))]),
        eqpar.SpecError,
        r"rule \('.*weight', P\('model',\)\) matches no array leaf.*\.w, \.b, \.x",
    ),
    Row(
        "partition_specs/dims-names-a-variadic-dimension",
        lambda: eqpar.partition_specs(_dense(), dims={"batch": "data"}),
        eqpar.SpecError,
        r"'batch', a variadic dimension \(`\*batch`\)",
    ),
    Row(
        "partition_specs/rank-cannot-be-explained",
        lambda: eqpar.partition_specs(_dense(w=(8,)), dims={"hidden": "model"}),
        eqpar.SpecError,
        r"array at \.w has shape \(8,\).*'embed hidden'.*`paths=\[\('\.w', P\(\)\)\]`",
        lambda msg: (
            eqpar.partition_specs(
                _dense(w=(8,)), dims={"hidden": "model"}, paths=[(".w", P())]
            ).b,
            P("model"),
        ),
    ),
    Row(
        "Stacked/remat-not-a-policy",
        lambda: eqpar.Stacked(
            eqpar.Stacked.build(lambda k: _dense(), jnp.arange(2)), remat="yes"
        ),
        eqpar.SpecError,
        r"`remat` is 'yes'.*`jax.checkpoint_policies`",
    ),
    Row(
        "Stacked/gather-over-the-layer-axis",
        lambda: eqpar.Stacked(
            eqx.filter_vmap(lambda _: _dense(), axis_size=2)(jnp.arange(2))
        ).fold(jnp.ones((2, 3, 8)), gather=P("data")),
        eqpar.SpecError,
        r"`gather` gives P\('data',\).*shards the layer axis",
    ),
]

# Rows whose eqpar error belongs in files being rewritten (eqpar/_vmap.py, _pmap.py,
# _jit.py, _dispatch.py): strict xfails, so that each turns into a failure to remove
# from here once it passes. Today a runtime type checker (beartype, through the
# jaxtyping import hook the tests use) rejects these options before eqpar's own
# checks run; `Checked[...]` annotations (eqpar/_errors.py) let eqpar's checks speak.
LEAD: dict[str, str] = {}  # rows waiting on a change elsewhere (none now)


def _params(rows, fixing=False):
    return [
        pytest.param(
            r,
            id=r.id,
            marks=[pytest.mark.xfail(strict=True, reason="lead: " + LEAD[r.id])]
            if r.id in LEAD and (not fixing or r.id.startswith("shard_map/grad"))
            else [],
        )
        for r in rows
    ]


@pytest.mark.parametrize("row", _params(ROWS))
def test_bad_input_gets_an_eqpar_error(row):
    with pytest.raises(row.error, match=row.match) as info:
        row.bad()
    assert isinstance(info.value, eqpar.EqparError)


FIXABLE = [r for r in ROWS if r.fix is not None]


@pytest.mark.parametrize("row", _params(FIXABLE, fixing=True))
def test_following_the_advice_works(row):
    with pytest.raises(eqpar.EqparError) as info:
        row.bad()
    got, want = row.fix(str(info.value))
    assert_tree_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_there_are_enough_rows():
    assert len(ROWS) >= 60 and len({r.id for r in ROWS}) == len(ROWS)


# ------------------------------------------------- unusual input, right answer


def test_python_numbers_in_collectives_mean_what_they_mean_in_lax():
    def f(x):
        ours = (
            eqpar.psum(1, "i"),
            eqpar.pmean(2.5, "i"),
            eqpar.pmax(3, "i"),
            eqpar.pmin(-1.0, "i"),
            eqpar.all_gather(7, "i"),
            eqpar.psum((x, 2, None, "tag"), "i"),
        )
        theirs = (
            jax.lax.psum(1, "i"),
            jax.lax.pmean(2.5, "i"),
            jax.lax.pmax(3, "i"),
            jax.lax.pmin(-1.0, "i"),
            jax.lax.all_gather(7, "i"),
            (jax.lax.psum(x, "i"), jax.lax.psum(2, "i"), None, "tag"),
        )
        return ours, theirs

    ours, theirs = eqpar.filter_vmap(f, axis_name="i", out_axes=None)(jnp.ones(4))
    assert_tree_allclose(ours, theirs)
    assert ours[0] == 4 and isinstance(ours[0], int)  # static, usable in shapes


def test_broadcast_key_warns_once_per_compile():
    f = eqpar.Parallel(lambda x, k: x + jax.random.normal(k), in_axes=(0, None))
    with pytest.warns(eqpar.EqparWarning, match="argument `k`.*same numbers"):
        f(jnp.ones(16), jax.random.key(0))


def test_modules_broadcast_by_default_even_when_shapes_fit(getkey):
    """A square Linear (8 x 8) next to a batch of 8: its weights are not split."""
    model = eqx.nn.Linear(8, 8, key=getkey())
    x = jax.random.normal(getkey(), (8, 8))
    out = eqpar.Parallel(lambda m, x: jax.vmap(m)(x))(model, x)
    assert_tree_allclose(out, jax.vmap(model)(x), rtol=1e-5, atol=1e-6)


def test_empty_batch_is_the_same_everywhere():
    x = jnp.ones((0, 3))
    want = jnp.zeros((0, 3))
    assert_tree_allclose(eqpar.filter_vmap(lambda v: 2 * v)(x), want)
    assert_tree_allclose(sm(lambda v: 2 * v)(x), want)
    assert_tree_allclose(eqpar.Parallel(lambda v: 2 * v)(x), want)
    assert_tree_allclose(eqpar.filter_pmap(lambda v: 2 * v)(x), want)


def test_optax_chain_unaffected():  # pmean_updates under a binding still works
    opt = optax.chain(eqpar.pmean_updates("i"), optax.sgd(1.0))
    g = jnp.arange(4.0)
    upd = eqpar.filter_vmap(lambda g: opt.update(g, opt.init(g))[0], axis_name="i")(g)
    assert_tree_allclose(upd, -jnp.full(4, g.mean()))


# --------------------------- checkpoints, the launcher: right answers (issue 26)


def test_python_numbers_restore_as_saved_when_of_the_saved_kind():
    ckpt = _saved({"lr": 0.5, "step": 7, "flag": True, "z": 1 + 2j, "f32": 0.25})
    like = {"lr": 0.0, "step": 0, "flag": False, "z": 0j, "f32": 0.0}
    got = ckpt.restore(like)
    assert got == {"lr": 0.5, "step": 7, "flag": True, "z": 1 + 2j, "f32": 0.25}
    assert [type(got[k]) for k in like] == [float, int, bool, complex, float]
    # A float32 array scalar into a Python float: the same kind, held exactly.
    f32 = _saved({"x": np.float32(0.1)}).restore({"x": 0.0})
    assert f32["x"] == float(np.float32(0.1))


def test_a_stray_step_folder_is_skipped_with_a_warning():
    """An empty `5/` next to the checkpoint of step 1 is not reported, restored or
    counted; the warning names it, once per manager."""
    tree = {"w": jnp.arange(4.0), "n": 3}
    ckpt = _saved(tree, step=1, stray=5)
    with pytest.warns(eqpar.EqparWarning, match=r"/5 is named like the checkpoint"):
        assert ckpt.latest_step() == 1
    assert ckpt.all_steps() == [1]  # warned once already
    assert_tree_allclose(ckpt.restore(tree), tree)
    ckpt.save(2, {"w": jnp.ones(4), "n": 4})
    assert ckpt.all_steps() == [1, 2]
    fresh = eqpar.CheckpointManager(ckpt.directory)
    _managers.append(fresh)
    with pytest.warns(eqpar.EqparWarning, match="it is ignored. Remove it"):
        assert fresh.latest_step() == 2
    with pytest.raises(eqpar.CheckpointError, match="no checkpoint of step 5"):
        fresh.restore(tree, step=5)


@pytest.mark.parametrize(
    "args, match",
    [
        (["-n", "2", "--local-devices", "0"], "--local-devices must be at least 1"),
        (["-n", "2", "--local-devices", "-1"], "--local-devices must be at least 1"),
        (["-n", "2", "--timeout", "-1"], "--timeout must be a positive number"),
        (["-n", "2", "--timeout", "nan"], "--timeout must be a positive number"),
        (["-n", "0"], "-n must be at least 1"),
    ],
)
def test_launcher_options_out_of_range_are_argparse_errors(args, match, capsys):
    from eqpar import launch

    with pytest.raises(SystemExit) as info:
        launch.main([*args, __file__])
    assert info.value.code == 2
    assert re.search(match, capsys.readouterr().err)


@pytest.mark.programs
@pytest.mark.parametrize("imports_jax", [True, False])
def test_a_script_that_never_joins_fails_the_launch(tmp_path, imports_jax):
    """Under `python -m eqpar.launch -n 2`, a script that never calls
    `eqpar.initialize()` is not two independent runs that exit 0: the run fails,
    saying what to call. With `-n 1` the same script is a whole run."""
    from .test_launch import left_running, PROMPT, ROOT

    script = tmp_path / "alone.py"
    body = "import jax\nprint('sum', int(jax.numpy.arange(4).sum()))\n"
    script.write_text(body if imports_jax else "print('sum', 6)\n")
    pids: set[int] = set()
    try:
        for n, status in (("2", 1), ("1", 0)):
            cmd = [sys.executable, "-m", "eqpar.launch", "-n", n, "--local-devices"]
            run = subprocess.run(
                [*cmd, "2", "--grace", "1", str(script)],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=PROMPT,
            )
            out = run.stdout + run.stderr
            pids |= {int(p) for p in re.findall(r"process \d+: pid (\d+)", out)}
            assert run.returncode == status, out[-3000:]
            assert "sum 6" in out
            if n == "2":
                assert re.search(
                    r"run failed with status 1: process \d exited with status 1 after "
                    r"eqpar\.launch: process \d of 2 ran to the end without joining "
                    r"JAX's multi-process runtime: call `eqpar\.initialize\(\)`",
                    out,
                ), out[-3000:]
    finally:
        left = left_running(pids, wait=5.0)
    assert not left
