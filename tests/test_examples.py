"""Every example program runs at a small size and its self-checks pass, writing only
into the folder it is given; its `--help` shows every default."""

import importlib.util
import os
import pathlib
import sys

import pytest

from ._repo import leaves_repository_alone, ROOT


EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"
SMALL = {  # the flags that make each example small enough for CI
    "microscope": ["--size", "64", "--planes", "16", "--z-psf", "16"],
    "data_parallel": ["--steps", "3"],
    "grid": ["--n", "300", "--loop-n", "20", "--chunk", "64"],
    "ensembles": [],
    "shard_map_kernels": [],
    "multiprocess_training": ["--steps", "3"],  # one process here; see test_distributed
    "model_parallel": ["--steps", "3"],
    "pallas_kernels": ["--steps", "2", "--batch", "16", "--width", "8"],
    "distributed_field": ["--size", "64", "--planes", "3"],
    "deep_transformer": ["--steps", "2", "--batch", "8", "--layers", "3"],
}
WRITES = {  # what each example writes into --out (and nothing anywhere else)
    "microscope": ["microscope.png"],
    "data_parallel": [],
    "grid": ["grid.png"],
    "ensembles": ["ensemble.png"],
    "shard_map_kernels": [],
    "multiprocess_training": ["params_1x8.npz"],
    "model_parallel": [],
    "pallas_kernels": [],
    "distributed_field": ["distributed_field.png"],
    "deep_transformer": ["checkpoints"],
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
    with leaves_repository_alone():
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
    assert sorted(p.name for p in tmp_path.iterdir()) == WRITES[name]
    for p in tmp_path.iterdir():
        assert p.stat().st_size > 1_000, p


def test_every_example_is_listed():
    programs = {p.stem for p in EXAMPLES.glob("*.py") if not p.stem.startswith("_")}
    assert programs <= set(SMALL), programs - set(SMALL)


def test_default_output_folder_is_outside_the_repository():
    common = load("_common")
    default = pathlib.Path(common.parser("x").parse_args([]).out).resolve()
    assert not default.is_relative_to(ROOT.resolve()), default


@pytest.mark.parametrize("name", sorted(SMALL))
def test_help_shows_every_default(name, capsys):
    with pytest.raises(SystemExit) as raised:
        load(name).main(["--help"])
    assert raised.value.code == 0
    text = capsys.readouterr().out
    options = text.split("options:", 1)[1]
    # One entry per flag: "  --flag VALUE  help text (default: ...)".
    entries = [e for e in options.split("\n  -") if e.strip()]
    flags = [e.split()[0].lstrip("-") for e in entries]
    assert "devices" in flags and "out" in flags, flags
    for entry in entries:
        if entry.lstrip("-").startswith("h,"):
            continue  # -h, --help
        assert "(default: " in " ".join(entry.split()), entry


def test_the_repository_check_sees_writes(tmp_path):
    # Attempts count (these fail: the paths are folders), writes elsewhere do not.
    for attempt in (
        lambda: open(ROOT / "examples", "w"),
        lambda: os.mkdir(ROOT / "examples"),
        lambda: os.open(ROOT / "examples", os.O_WRONLY | os.O_CREAT),
    ):
        with pytest.raises(AssertionError, match="wrote into the repository"):
            with leaves_repository_alone():
                with pytest.raises(OSError):
                    attempt()
    with leaves_repository_alone():
        (tmp_path / "elsewhere.txt").write_text("fine")
        (ROOT / "README.md").read_text()
