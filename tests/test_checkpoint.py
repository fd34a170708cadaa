"""Checkpoints of sharded state (`eqpar.CheckpointManager`, on orbax-checkpoint):
restored bit-equal onto the same shardings, another mesh or one device, statics from
`like`; an unfinished checkpoint is never restored; a 2-process run killed mid-way
resumes to the parameters of an uninterrupted run, bit for bit."""

import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

import eqpar


ROOT = pathlib.Path(__file__).parent.parent
TRAINING = ROOT / "examples" / "multiprocess_training.py"


# ----------------------------------------------------------------------------------
# One process, 8 devices


def build(key, mesh=None, *, activation=jax.nn.tanh, width=16):
    """A training state: a Module, a chained optax state (with an `EmptyState`),
    typed keys, a Python int, a NumPy array, a NumPy scalar and a string. With a
    mesh, the first layer and the keys are sharded over it, the rest replicated."""
    k1, k2 = jax.random.split(key)
    model = eqx.nn.MLP(8, 8, width, 1, activation=activation, key=k1)
    optimiser = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
    params = eqx.filter(model, eqx.is_array)
    state = optimiser.init(params)
    for _ in range(2):  # non-zero moments and count
        with jax.numpy_dtype_promotion("standard"):  # as optax needs
            updates, state = optimiser.update(params, state, params)
        model = eqx.apply_updates(model, updates)
    tree = {
        "model": model,
        "opt": state,
        "keys": jax.random.split(k2, 8),
        "key": jax.random.fold_in(k2, 1),
        "step": 7,
        "table": np.arange(6.0, dtype=np.float32).reshape(2, 3),
        "scale": np.float32(0.5),
        "tag": "run-a",
    }
    if mesh is None:
        return tree

    def place(path, x):
        if not isinstance(x, jax.Array):  # NumPy leaves stay NumPy
            return x
        name = jax.tree_util.keystr(path)
        spec = P("data") if name.startswith("['keys']") or "[0].weight" in name else P()
        return jax.device_put(x, NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(place, tree)


def arrays(tree):
    return jax.tree.leaves(eqx.filter(tree, eqx.is_array))


def jax_arrays(tree):
    return [x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)]


def same_values(a, b):
    """Every array leaf bit-equal, typed keys by their data."""

    def data(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return np.asarray(jax.random.key_data(x))
        return np.asarray(x)

    la, lb = arrays(a), arrays(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(data(x), data(y)), (x, y)
    return True


def test_restore_onto_the_same_shardings(tmp_path, mesh8, getkey):
    train = build(getkey(), mesh8)
    with eqpar.CheckpointManager(tmp_path / "ckpt") as ckpt:
        assert ckpt.latest_step() is None
        ckpt.save(10, train)
        assert ckpt.latest_step() == 10 and ckpt.all_steps() == [10]
        like = build(getkey(), mesh8, activation=jax.nn.relu)
        like["step"], like["tag"] = 0, "run-b"
        out = ckpt.restore(like)

    assert same_values(out, train)
    assert len(jax_arrays(out)) == len(jax_arrays(like)) > 10
    for x, y in zip(jax_arrays(out), jax_arrays(like)):
        assert x.sharding == y.sharding
    assert out["model"].layers[0].weight.sharding.spec == P("data")
    assert out["keys"].sharding.spec == P("data")
    assert jnp.issubdtype(out["key"].dtype, jax.dtypes.prng_key)
    # Statics and non-array leaves come from `like`; numbers and NumPy from disk.
    assert out["model"].activation is jax.nn.relu
    assert out["tag"] == "run-b"
    assert out["step"] == 7 and type(out["step"]) is int
    assert isinstance(out["table"], np.ndarray)
    assert type(out["scale"]) is np.float32 and out["scale"] == 0.5
    assert isinstance(out["opt"][0], optax.EmptyState)
    assert jax.tree.structure(out) == jax.tree.structure(like)
    # The restored state trains on: one more update runs.
    grads = eqx.filter(out["model"], eqx.is_array)
    optimiser = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
    with jax.numpy_dtype_promotion("standard"):
        eqx.filter_jit(optimiser.update)(grads, out["opt"], grads)


def test_restore_onto_four_devices_and_onto_one(tmp_path, mesh8, getkey):
    train = build(getkey(), mesh8)
    directory = tmp_path / "ckpt"
    with eqpar.CheckpointManager(directory) as ckpt:
        ckpt.save(3, train)

    mesh4 = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
    with eqpar.CheckpointManager(directory) as ckpt:
        # Given specs (a prefix of `like`) on another mesh.
        spec = {k: P() for k in train}
        spec["keys"] = P("data")
        out4 = ckpt.restore(build(getkey()), spec=spec, mesh=mesh4)
        # Onto the shardings of a `like` placed on the 4-device mesh.
        placed = build(getkey())
        for k in ("model", "opt", "keys", "key"):
            placed[k] = eqpar.replicate(placed[k], mesh=mesh4)
        out4b = ckpt.restore(placed)
        # Onto one device: a `like` that was never placed.
        out1 = ckpt.restore(build(getkey()))
    assert same_values(out4, train) and same_values(out4b, train)
    assert same_values(out1, train)
    assert out4["keys"].sharding == NamedSharding(mesh4, P("data"))
    for x in jax_arrays(out4b):
        assert x.sharding.device_set == set(mesh4.devices.flat)
    for x in jax_arrays(out1):
        assert x.sharding == SingleDeviceSharding(jax.devices()[0])


def test_restore_from_shapes_only(tmp_path, mesh8, getkey):
    train = build(getkey(), mesh8)
    with eqpar.CheckpointManager(tmp_path) as ckpt:
        ckpt.save(1, train)
        abstract = eqx.filter_eval_shape(build, jax.random.key(0))
        assert isinstance(abstract["model"].layers[0].weight, jax.ShapeDtypeStruct)
        out = ckpt.restore(abstract, spec=P(), mesh=mesh8)
        out1 = ckpt.restore(abstract)  # no sharding: this process's first device
    assert same_values(out, train) and same_values(out1, train)
    assert out["model"].layers[0].weight.sharding == NamedSharding(mesh8, P())
    assert out1["key"].sharding == SingleDeviceSharding(jax.local_devices()[0])


def test_steps_kept_and_chosen(tmp_path, getkey):
    tree = {"w": jnp.zeros(3), "n": 0}
    with eqpar.CheckpointManager(tmp_path, max_to_keep=2, async_save=False) as ckpt:
        for step in (1, 2, 5):
            ckpt.save(step, {"w": jnp.full(3, float(step)), "n": step})
        assert ckpt.all_steps() == [2, 5]
        assert ckpt.restore(tree)["n"] == 5
        old = ckpt.restore(tree, step=2)
        assert old["n"] == 2 and np.array_equal(old["w"], np.full(3, 2.0))
        with pytest.raises(eqpar.CheckpointError, match=r"no checkpoint of step 1\b"):
            ckpt.restore(tree, step=1)
        with pytest.raises(eqpar.CheckpointError, match="not after the latest"):
            ckpt.save(5, tree)
    # A new manager sees what the first one wrote.
    with eqpar.CheckpointManager(tmp_path) as again:
        assert again.all_steps() == [2, 5]


def test_errors_say_what_to_do(tmp_path, getkey):
    with eqpar.CheckpointManager(tmp_path / "empty") as ckpt:
        assert ckpt.latest_step() is None
        with pytest.raises(
            eqpar.CheckpointError, match="no checkpoint in .*latest_step"
        ):
            ckpt.restore(build(getkey()))

    train = build(getkey())
    ckpt = eqpar.CheckpointManager(tmp_path / "ckpt")
    ckpt.save(1, train)
    # Another structure: a deeper MLP has leaves the checkpoint lacks.
    deeper = dict(train, model=eqx.nn.MLP(8, 8, 16, 2, key=getkey()))
    with pytest.raises(eqpar.CheckpointError, match=r"layers\[2\].*built the way"):
        ckpt.restore(deeper)
    fewer = {k: v for k, v in train.items() if k != "table"}
    with pytest.raises(eqpar.CheckpointError, match=r"lacks: \['table'\]"):
        ckpt.restore(fewer)
    # Another shape, another dtype.
    with pytest.raises(eqpar.CheckpointError, match=r"saved as float32\[16, 8\]"):
        ckpt.restore(build(getkey(), width=12))
    cast = dict(train, table=train["table"].astype(np.float64))
    with pytest.raises(
        eqpar.CheckpointError, match=r"\['table'\] was saved as float32"
    ):
        ckpt.restore(cast)
    # Specs that do not fit.
    with pytest.raises(eqpar.SpecError, match="not a pytree prefix"):
        ckpt.restore(train, spec={"model": P()})
    mesh3 = jax.make_mesh((3,), ("data",), devices=jax.devices()[:3])
    spec = dict({k: P() for k in train}, keys=P("data"))
    with pytest.raises(eqpar.SpecError, match=r"\['keys'\], of shape \(8,\)"):
        ckpt.restore(train, spec=spec, mesh=mesh3)
    with pytest.raises(eqpar.MeshError, match="no mesh"):
        ckpt.restore(train, spec=P())
    with pytest.raises(eqpar.CheckpointError, match="nothing to save"):
        ckpt.save(2, {"tag": "no arrays"})
    with pytest.raises(eqpar.CheckpointError, match="non-negative integer"):
        ckpt.save(-1, train)
    ckpt.close()
    ckpt.close()  # again: nothing
    with pytest.raises(eqpar.CheckpointError, match="closed"):
        ckpt.save(3, train)
    with pytest.raises(eqpar.CheckpointError, match="max_to_keep"):
        eqpar.CheckpointManager(tmp_path, max_to_keep=0)


# ----------------------------------------------------------------------------------
# Processes: killed while saving


def alive(pid: int) -> bool:
    """Whether the process runs (a zombie, dead but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def stop(procs: list[subprocess.Popen]) -> None:
    """Kills what the test started and is still running, by its own process id."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


# Saves step 1, then starts saving step 2 (a large array, written in the background)
# and kills itself with SIGKILL before that save can finish.
_DIES_WHILE_SAVING = textwrap.dedent(
    """
    import os, signal, sys
    import jax, jax.numpy as jnp
    import eqpar

    ckpt = eqpar.CheckpointManager(sys.argv[1])
    ckpt.save(1, {"w": jnp.full(4_000_000, 1.0), "n": 1})
    ckpt.wait()
    ckpt.save(2, {"w": jnp.full(4_000_000, 2.0), "n": 2})
    print("saving step 2", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


@pytest.mark.programs
def test_a_checkpoint_being_written_when_the_process_dies_is_never_restored(
    tmp_path,
):
    directory = tmp_path / "ckpt"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.Popen(
        [sys.executable, "-c", _DIES_WHILE_SAVING, str(directory)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    try:
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, out[-3000:]
        assert "saving step 2" in out
        # Step 2 is at most an unfinished temporary folder.
        left = {p.name for p in directory.iterdir()}
        assert left - {"2.orbax-checkpoint-tmp"} == {"1"}, left

        like = {"w": jnp.zeros(4_000_000), "n": 0}
        with eqpar.CheckpointManager(directory) as ckpt:
            assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
            back = ckpt.restore(like)
            assert back["n"] == 1 and bool(jnp.all(back["w"] == 1.0))
            # Saving that step again works: the unfinished one is cleared away.
            ckpt.save(2, {"w": jnp.full(4_000_000, 3.0), "n": 2})
            assert ckpt.latest_step() == 2
            assert ckpt.restore(like)["n"] == 2
        assert sorted(p.name for p in directory.iterdir()) == ["1", "2"]
    finally:
        stop([proc])
    assert proc.poll() is not None and not alive(proc.pid)


# ----------------------------------------------------------------------------------
# 2 processes x 4 devices: the example, killed and resumed

STEPS, EVERY, KILL = 8, 3, 6  # checkpoints at 3, 6, 8; process 1 dies at step 6


def launch(*args: str, timeout: float = 120.0) -> tuple[int, str]:
    """Runs the example under `python -m eqpar.launch -n 2 --local-devices 4`;
    returns its status and output, after checking that none of its processes
    is left running."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "eqpar.launch",
            "-n",
            "2",
            "--local-devices",
            "4",
            "--timeout",
            str(int(timeout) - 10),
            str(TRAINING),
            "--steps",
            str(STEPS),
            "--checkpoint-every",
            str(EVERY),
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    timed_out = False
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.kill()
        out, _ = proc.communicate()
    finally:
        stop([proc])
    workers = [int(p) for p in re.findall(r"\[launch\] process \d+: pid (\d+)", out)]
    deadline = time.monotonic() + 10
    while any(alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [p for p in workers if alive(p)]
    for pid in left:  # only the workers this launch started
        os.kill(pid, signal.SIGKILL)
    assert not timed_out, f"timed out after {timeout} s: {out[-3000:]}"
    assert len(workers) == 2, out[-3000:]
    assert not left, f"left running: {left}"
    return proc.returncode, out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """An uninterrupted 2-process run: its checkpoints and final parameters."""
    base = tmp_path_factory.mktemp("uninterrupted")
    code, out = launch("--checkpoint-dir", str(base / "ckpt"), "--out", str(base))
    assert code == 0, out[-3000:]
    assert "[ok] 8-device training over 2 process(es) equals one device" in out
    return base


@pytest.mark.programs
def test_killed_run_resumes_to_the_same_parameters(uninterrupted, tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    code, out = launch(
        "--checkpoint-dir", str(ckpt_dir), "--out", str(tmp_path),
        "--kill-at-step", str(KILL),
    )  # fmt: skip
    assert code != 0, out[-3000:]
    assert f"[p1] killing this process (SIGKILL) after step {KILL}" in out
    assert not (tmp_path / "params_2x4.npz").exists()
    # Process 1 died as soon as step 6's save had started: that checkpoint never
    # finished (its folder is still temporary) and step 3 is the latest one.
    on_disk = sorted(p.name for p in ckpt_dir.iterdir())
    finished = sorted(int(n) for n in on_disk if n.isdigit())
    assert finished in ([EVERY], [EVERY, KILL]), on_disk
    if f"{KILL}.orbax-checkpoint-tmp" in on_disk:
        assert finished == [EVERY]
    latest = finished[-1]

    code, out = launch(
        "--checkpoint-dir", str(ckpt_dir), "--out", str(tmp_path), "--resume"
    )
    assert code == 0, out[-3000:]
    assert f"[p0] resumed from step {latest}" in out
    assert "[ok] 8-device training over 2 process(es) equals one device" in out
    resumed = np.load(tmp_path / "params_2x4.npz")
    straight = np.load(uninterrupted / "params_2x4.npz")
    assert len(resumed.files) == len(straight.files) == 6
    for k in straight.files:
        assert np.array_equal(resumed[k], straight[k]), k  # bit-equal
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [str(KILL), str(STEPS)]


def example_state(key):
    """The example's checkpointed state, built afresh: the `like` tree."""
    model = eqx.nn.MLP(4, 2, 32, 2, key=key)
    state = optax.sgd(0.05, momentum=0.9).init(eqx.filter(model, eqx.is_array))
    return {"model": model, "opt_state": state, "key": jax.random.key(0)}


@pytest.mark.programs
def test_two_process_checkpoint_restores_in_one_process(uninterrupted, getkey):
    params = np.load(uninterrupted / "params_2x4.npz")
    final = [params[f"arr_{i}"] for i in range(len(params.files))]
    mesh4 = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
    with eqpar.CheckpointManager(uninterrupted / "ckpt") as ckpt:
        assert ckpt.all_steps() == [6, STEPS]
        one = ckpt.restore(example_state(getkey()))  # onto one device
        four = ckpt.restore(example_state(getkey()), spec=P(), mesh=mesh4)
    for out, devices in ((one, {jax.devices()[0]}), (four, set(mesh4.devices.flat))):
        leaves = jax.tree.leaves(eqx.filter(out["model"], eqx.is_array))
        assert len(leaves) == len(final)
        for a, b in zip(leaves, final):
            assert a.sharding.device_set == devices
            assert np.array_equal(np.asarray(a), b)  # bit-equal
        assert jnp.issubdtype(out["key"].dtype, jax.dtypes.prng_key)
