"""Shared benchmark plumbing: simulated devices, interleaved timing, reporting."""

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable


def setup_devices(n: int = 8) -> None:
    """Simulated CPU devices; must run before JAX initialises."""
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
    )
    import jax

    jax.config.update("jax_num_cpu_devices", n)  # affects the CPU backend only


def interleaved(
    fns: dict[str, Callable[[], object]], *, calls: int, rounds: int, block: Callable
) -> dict[str, list[float]]:
    """Per-call times (seconds) of each function, measured in alternating rounds so
    that machine noise hits every contender alike. Each round times `calls` calls
    back to back and records the median per-call time of that round."""
    for fn in fns.values():  # compile and warm up
        for _ in range(20):
            block(fn())
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times = []
            for _ in range(calls):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            block(fn())
            samples[name].append(statistics.median(times))
    return samples


def summary(samples: list[float]) -> tuple[float, float, float]:
    return statistics.median(samples), min(samples), max(samples)


def machine() -> str:
    import equinox
    import jax

    devices = jax.devices()
    return (
        f"{platform.node() or 'host'} ({platform.machine()}, {os.cpu_count()} cores), "
        f"{len(devices)} x {devices[0].device_kind} ({jax.default_backend()}), "
        f"Python {sys.version.split()[0]}, jax {jax.__version__}, "
        f"equinox {equinox.__version__}"
    )
