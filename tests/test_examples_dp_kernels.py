"""examples/data_parallel.py and examples/shard_map_kernels.py: their self-checks and
the figures they quote (Objax's shapes and values on 8 devices)."""

import jax
import pytest

from ._repo import leaves_repository_alone
from .test_examples import load


def _main(name: str, tmp_path, *flags: str) -> dict:
    with leaves_repository_alone():
        results = load(name).main(["--out", str(tmp_path), *flags])
    failed = [k for k, ok in results["checks"].items() if not ok]
    assert not failed, f"{name}: self-checks failed: {failed}"
    assert results["checks"]
    return results


def test_data_parallel_on_8_devices(tmp_path):
    # 3 steps of batch 16: two full batches, then a short one of 7 (padded to 8).
    r = _main(
        "data_parallel", tmp_path, "--devices", "8", "--steps", "3", "--batch", "16"
    )
    assert r["short_batch"] == 7 and len(r["losses"]) == 3
    assert r["param_rel_diff"] < 1e-5
    assert r["reduction_shapes"] == {
        "None": (8, 12, 4),
        "first": (12, 4),
        "mean": (12, 4),
        "concat": (96, 4),
    }
    u = r["unreplicate"]
    assert u["sum"] == [0, 8, 16, 24, 32]
    assert u["first"] == [0, 1, 2, 3, 4]
    assert u["mean"] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert len(u["stack"]) == 8
    assert r["per_example_shapes"] == {"weight": (10, 4, 3), "bias": (10, 4)}


def test_data_parallel_on_5_devices(tmp_path):
    """96 examples do not divide over 5 devices: (b) pads them to 100."""
    r = _main(
        "data_parallel", tmp_path, "--devices", "5", "--steps", "3", "--batch", "16"
    )
    assert r["reduction_shapes"]["None"] == (5, 20, 4)
    assert r["reduction_shapes"]["concat"] == (96, 4)
    assert r["unreplicate"]["sum"] == [0, 5, 10, 15, 20]


@pytest.mark.parametrize("devices, mesh", [(8, (4, 2)), (4, (2, 2)), (3, (3, 1))])
def test_shard_map_kernels(tmp_path, devices, mesh):
    r = _main("shard_map_kernels", tmp_path, "--devices", str(devices), "--size", "96")
    assert r["devices"] == devices and r["mesh"] == mesh
    first = [d.id for d in jax.devices()[:devices]]
    assert r["device_ids"] == first
    assert r["matmul"]["devices_used"] == sorted(first)
    assert r["stencil_zero"]["devices_used"] == sorted(first)
    assert r["matmul"]["rel_err"] < 1e-4
    for name in ("stencil_zero", "stencil_periodic"):
        assert r[name]["rel_err"] < 1e-5 and r[name]["rel_err_edges_seams"] < 1e-5
