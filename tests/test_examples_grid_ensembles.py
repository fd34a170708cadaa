"""examples/grid.py and examples/ensembles.py: self-checks and the quoted figures."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ._repo import leaves_repository_alone
from .test_examples import load, SMALL


@pytest.fixture(scope="module")
def grid():
    return load("grid")


@pytest.fixture(scope="module")
def ensembles():
    return load("ensembles")


def _main(module, name, out, *extra):
    with leaves_repository_alone():
        results = module.main(
            ["--devices", "8", "--out", str(out), *SMALL[name], *extra]
        )
    failed = [k for k, ok in results["checks"].items() if not ok]
    assert not failed, f"{name}: self-checks failed: {failed}"
    assert results["checks"]
    return results


@pytest.fixture(scope="module")
def grid_results(grid, tmp_path_factory):
    out = tmp_path_factory.mktemp("grid")
    return _main(grid, "grid", out), out


@pytest.fixture(scope="module")
def ensembles_results(ensembles, tmp_path_factory):
    out = tmp_path_factory.mktemp("ensembles")
    return _main(ensembles, "ensembles", out), out


# --- grid --------------------------------------------------------------------------


def test_grid_quoted_input_bytes(grid):
    # The figures quoted for n = 6000, without running n = 6000.
    mesh, flat = grid.input_bytes(6000)
    assert (mesh, flat) == (288_000_000, 48_000)
    assert (grid.fmt_bytes(mesh), grid.fmt_bytes(flat)) == ("288 MB", "48 KB")
    assert grid.fmt_bytes(6000 * 6000 * 4) == "144 MB"  # the grid itself
    assert grid.input_bytes(300) == (720_000, 2_400)
    assert grid.input_bytes(10, itemsize=8) == (1_600, 160)


def test_grid_runs_and_checks_itself(grid_results):
    results, out = grid_results
    assert (results["n"], results["loop_n"], results["chunk"]) == (300, 20, 64)
    assert all(all(v.values()) for v in results["agree"].values())
    assert (out / "grid.png").exists()


def test_grid_memory_table(grid_results):
    results, _ = grid_results
    n, chunk, memory = results["n"], results["chunk"], results["memory"]
    mesh, flat = results["input_bytes"]["meshgrid"], results["input_bytes"]["flat"]
    assert (mesh, flat) == (2 * n * n * 4, 2 * n * 4)
    assert memory["(b) meshgrid, grids built first"]["argument"] == mesh
    for name, row in memory.items():
        assert row["peak"] == row["argument"] + row["temp"] + row["output"], name
        if name != "(b) meshgrid, grids built first":
            assert row["argument"] == flat, name
    for name in ("(b) meshgrid inside jit", "(c) nested filter_vmap"):
        assert memory[name]["output"] == n * n * 4
    # The reduction: unchunked holds the whole grid, chunked only `chunk` rows of it.
    full = memory["(e) max_y, filter_vmap"]["temp"]
    chunked = memory[f"(e) max_y, filter_vmap chunk={chunk}"]["temp"]
    assert chunked < full
    assert chunked < n * n * 4 <= full
    assert memory[f"(e) max_y, filter_vmap chunk={chunk}"]["output"] == n * 4
    assert set(results["times"]) == {"(a) Python loops", *memory}


def test_grid_auto_chunk_fits_the_stated_budget(grid_results):
    # (f): the reduction exceeds the budget unchunked and fits it with "auto".
    results, _ = grid_results
    auto, n = results["auto"], results["n"]
    assert auto["budget"] == n * n * 4 // 4  # the default: a quarter of the grid
    assert results["memory"]["(e) max_y, filter_vmap"]["temp"] > auto["budget"]
    assert auto["memory"]["temp"] <= auto["budget"]
    assert 1 <= auto["chunk"] < n


def test_grid_check_catches_a_transpose(grid):
    # The non-symmetric grid of the self-check: numpy's default "xy" meshgrid gives
    # the transpose, which must not pass.
    x = jnp.linspace(-3.0, 2.0, 5, dtype=jnp.float32)
    y = jnp.linspace(-1.0, 4.0, 7, dtype=jnp.float32)
    z_loop = grid.grid_loops(np.asarray(x), np.asarray(y))
    assert grid._close(grid.grid_vmap(x, y), z_loop)
    assert grid._close(grid.grid_chunked(2)(x, y), z_loop)
    xm, ym = jnp.meshgrid(x, y)  # indexing="xy": shape (7, 5)
    assert not grid._close(grid.f(xm, ym), z_loop)
    assert not grid._close(
        grid.f(xm, ym).T, grid.grid_loops(np.asarray(y), np.asarray(x))
    )


# --- ensembles ---------------------------------------------------------------------


def test_ensembles_quoted_figures(ensembles_results):
    results, out = ensembles_results
    assert results["ensemble_shape"] == (5, 100)
    assert results["dropout_shape"] == (50, 20, 1)
    assert results["pairwise_dots"] == [[1, 1], [1, -1], [2, 0]]
    assert results["pmean_vmap"] == [-1.5, -0.5, 0.5, 1.5]
    assert results["pmean_pmap"] == [-1.5, -0.5, 0.5, 1.5]
    assert results["pmap_devices"] == 4
    assert results["in_axes"] == {
        "columns_shape": (4, 3),
        "same_matrix_in_axes_0": [3.0, 7.0],
        "same_matrix_in_axes_1": [4.0, 6.0],
    }
    assert results["ensemble_std"]["gap"] > results["ensemble_std"]["data"]
    assert (out / "ensemble.png").exists()


@pytest.mark.parametrize("n_devices", [1, 2, 3])
def test_ensembles_pmean_on_fewer_devices(ensembles, n_devices):
    # Fewer devices than elements: rows on devices, filter_vmap within, pmean over
    # both names.
    v = jnp.array([1.0, 2.0, 3.0, 4.0])
    out = ensembles.centre_on_devices(v, jax.devices()[:n_devices])
    assert np.asarray(out).tolist() == [-1.5, -0.5, 0.5, 1.5]


def test_ensembles_member_is_one_model(ensembles):
    keys = jax.random.split(jax.random.key(1), 3)
    ens = ensembles.eqpar.filter_vmap(ensembles.make_mlp)(keys)
    one = ensembles.member(ens, 2)
    alone = ensembles.make_mlp(keys[2])
    xs = jnp.linspace(-1.0, 1.0, 4, dtype=jnp.float32)
    np.testing.assert_allclose(
        ensembles.predict(one, xs), ensembles.predict(alone, xs), rtol=1e-6, atol=1e-6
    )
