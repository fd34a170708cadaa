"""Shared plumbing for the example programs (not part of eqpar's API).

Every example is a program: `python examples/NAME.py --devices N [...]`. Its
`main(argv)` returns a dict with the figures it printed and `"checks"`, a dict of
named self-checks (bool) that the tests assert.
"""

import argparse
import os
import pathlib
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any


# Outside any checkout, so that running an example never adds files to the repository.
DEFAULT_OUT = str(pathlib.Path(tempfile.gettempdir()) / "eqpar-examples")


def parser(description: str, *, devices: int = 8) -> argparse.ArgumentParser:
    """The flags every example has; `--help` shows each flag's default."""
    p = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--devices", type=int, default=devices, help="devices to use")
    p.add_argument(
        "--out", default=DEFAULT_OUT, help="folder for the files it writes (created)"
    )
    return p


def setup_devices(n: int) -> list[Any]:
    """Asks for `n` simulated CPU devices if JAX has not started yet, and returns the
    first `n` devices (so the examples also run inside an already-started process,
    such as the test suite, with whatever devices it has)."""
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
    )
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", max(n, 1))
    except RuntimeError:  # backends already initialised (e.g. under pytest)
        pass
    devices = jax.devices()
    if len(devices) < n:
        raise SystemExit(f"asked for {n} devices but only {len(devices)} are available")
    return devices[:n]


def timed(fn: Callable[[], Any], repeat: int = 5) -> tuple[Any, float]:
    """(result, median wall time in seconds over `repeat` runs after a warm-up call
    that compiles): the steady state, robust to a run or two disturbed by the
    machine's other work."""
    import jax

    out = jax.block_until_ready(fn())
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


TIMING_NOTE = (
    "(times: medians of 5 runs after compiling. Simulated CPU devices share this "
    "machine's cores: they show that the results equal one device's, not a speedup; "
    "measure scaling on several GPUs or TPUs.)"
)


def rel_diff(a: Any, b: Any) -> float:
    """Largest difference relative to the reference's largest magnitude."""
    import numpy as np

    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def arrays(tree: Any) -> list[Any]:
    """The array leaves of `tree`."""
    import equinox as eqx
    import jax

    return [a for a in jax.tree.leaves(tree) if eqx.is_array(a)]


def per_device_bytes(tree: Any) -> int:
    """Bytes of `tree` on one device (the first)."""
    return sum(a.addressable_shards[0].data.nbytes for a in arrays(tree))


def as_placed(tree: Any, specs: Any) -> bool:
    """Whether every array of `tree` is sharded as its `PartitionSpec` in `specs`
    says (trailing `None`s aside)."""
    import jax
    from jax.sharding import PartitionSpec as P

    def padded(spec: P, ndim: int) -> tuple:
        return tuple(spec) + (None,) * (ndim - len(spec))

    placed = arrays(tree)
    wanted = [s for s in jax.tree.leaves(specs) if isinstance(s, P)]
    return len(placed) == len(wanted) and all(
        padded(a.sharding.spec, a.ndim) == padded(s, a.ndim)
        for a, s in zip(placed, wanted)
    )


def out_dir(path: str) -> pathlib.Path:
    p = pathlib.Path(path)
    p.mkdir(parents=True, exist_ok=True)
    return p


def report(checks: dict[str, bool]) -> None:
    print()
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAILED'}] {name}")


def finish(results: dict[str, Any], checks: dict[str, bool], t0: float) -> dict:
    """Prints the total time and the checks; `results` with the checks added."""
    print(f"\n(total {time.perf_counter() - t0:.1f} s)")
    report(checks)
    results["checks"] = checks
    return results


def save_figure(fig: Any, path: pathlib.Path, dpi: int = 100) -> pathlib.Path:
    """Saves a matplotlib figure and closes it."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
