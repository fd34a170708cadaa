"""Every example program runs at a small size and its self-checks pass."""

import importlib.util
import pathlib
import sys

import pytest


EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"
SMALL = {  # the flags that make each example small enough for CI
    "microscope": ["--size", "64", "--planes", "16", "--z-psf", "16"],
    "data_parallel": ["--steps", "3"],
    "grid": ["--n", "300", "--loop-n", "20", "--chunk", "64"],
    "ensembles": [],
    "shard_map_kernels": [],
    "multiprocess_training": ["--steps", "3"],  # one process here; see test_distributed
}


def load(name: str):
    sys.path.insert(0, str(EXAMPLES))
    try:
        spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(EXAMPLES))


def run(name: str, tmp_path, *extra: str) -> dict:
    module = load(name)
    results = module.main(
        ["--devices", "8", "--out", str(tmp_path), *SMALL[name], *extra]
    )
    failed = [k for k, ok in results["checks"].items() if not ok]
    assert not failed, f"{name}: self-checks failed: {failed}"
    assert results["checks"], f"{name} checked nothing"
    return results


@pytest.mark.parametrize("name", sorted(SMALL))
def test_example_runs_and_checks_itself(name, tmp_path):
    if not (EXAMPLES / f"{name}.py").exists():
        pytest.fail(f"examples/{name}.py is missing")
    run(name, tmp_path)


def test_every_example_is_listed():
    programs = {p.stem for p in EXAMPLES.glob("*.py") if not p.stem.startswith("_")}
    assert programs <= set(SMALL), programs - set(SMALL)
