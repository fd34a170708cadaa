"""Several processes on loopback, started by `python -m eqpar.launch` (2 x 4 CPU)."""

import pathlib
import subprocess
import sys

import numpy as np
import pytest


ROOT = pathlib.Path(__file__).parent.parent
WORKER = ROOT / "tests" / "_mp_worker.py"
TRAINING = ROOT / "examples" / "multiprocess_training.py"


def launch(*args: str, timeout: float = 150.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "eqpar.launch", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


@pytest.mark.programs
def test_collectives_across_processes():
    run = launch("-n", "2", "--local-devices", "4", "--timeout", "120", str(WORKER))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    for p in ("p0", "p1"):
        for check in ("psum", "grad_mean", "sensor_sum", "Parallel", "unreplicate"):
            assert f"[{p}] check {check}: ok" in run.stdout, run.stdout[-3000:]


@pytest.mark.programs
def test_training_equals_one_process_and_one_device(tmp_path):
    run = launch(
        "-n",
        "2",
        "--local-devices",
        "4",
        "--timeout",
        "120",
        str(TRAINING),
        "--steps",
        "5",
        "--out",
        str(tmp_path),
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "[ok] 8-device training over 2 process(es) equals one device" in run.stdout
    single = subprocess.run(
        [
            sys.executable,
            str(TRAINING),
            "--devices",
            "8",
            "--steps",
            "5",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-2000:]
    two = np.load(tmp_path / "params_2x4.npz")
    one = np.load(tmp_path / "params_1x8.npz")
    assert len(two.files) == len(one.files) > 0
    for k in one.files:
        np.testing.assert_allclose(two[k], one[k], rtol=1e-5, atol=1e-7)


def test_initialize_without_environment_is_single_process(monkeypatch):
    import eqpar

    for var in (
        "EQPAR_COORDINATOR_ADDRESS",
        "EQPAR_NUM_PROCESSES",
        "EQPAR_PROCESS_ID",
        "JAX_COORDINATOR_ADDRESS",
        "JAX_NUM_PROCESSES",
        "JAX_PROCESS_ID",
        "EQPAR_LOCAL_DEVICES",
    ):
        monkeypatch.delenv(var, raising=False)
    assert eqpar.initialize() is False


def test_initialize_with_partial_environment(monkeypatch):
    import eqpar

    monkeypatch.setenv("EQPAR_NUM_PROCESSES", "2")
    monkeypatch.delenv("EQPAR_COORDINATOR_ADDRESS", raising=False)
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    with pytest.raises(eqpar.MeshError, match="coordinator"):
        eqpar.initialize()


def test_global_batch_round_trip_in_one_process():

    import eqpar

    mesh = eqpar.data_mesh()
    x = np.arange(16.0, dtype=np.float32).reshape(8, 2)
    g = eqpar.global_batch({"x": x, "tag": "t"}, mesh=mesh)
    assert g["tag"] == "t" and g["x"].shape == (8, 2)
    np.testing.assert_array_equal(eqpar.local_batch(g)["x"], x)
    np.testing.assert_array_equal(eqpar.gather(g)["x"], x)
