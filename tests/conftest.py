import contextlib
import os
import pathlib


# Must happen before JAX initialises its backends: 8 simulated CPU devices. Under
# pytest-xdist each worker is a fresh Python that imports this file before any test
# (and inherits the controller's environment, hence the check before appending).
_DEVICES = "--xla_force_host_platform_device_count=8"
if _DEVICES not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " " + _DEVICES
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402


jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

# Every hypothesis example compiles; keep the count small and drop the deadline.
settings.register_profile(
    "eqpar",
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("eqpar")


# ---------------------------------------------------------------- tests that launch
# Tests marked `programs` launch separate programs, several of them busy at once for
# a multi-process run: two such tests at a time would overload a small machine. They
# are collected first, in their order, and pytest-xdist's `--dist load` (the default
# in pyproject.toml) starts each worker on a run of consecutive tests, so they all
# go to one worker, one after another, while the others run the in-process tests.
# A lock shared by the workers makes sure of it whatever the scheduler does.
# (`--dist loadgroup` with `xdist_group` would say this directly, but pytest-xdist
# 3.8 ignores the groups under pytest 9.2: pytest-dev/pytest-xdist#1386.)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.get_closest_marker("programs") is None)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """A `programs` test runs, fixtures and all, holding the workers' lock."""
    if item.get_closest_marker("programs") is None:
        return (yield)
    with _programs_lock(item.config):
        return (yield)


@contextlib.contextmanager
def _programs_lock(config):
    try:
        import fcntl
    except ImportError:  # not on Unix: no lock
        fcntl = None
    if fcntl is None or not hasattr(config, "workerinput"):  # not an xdist worker
        yield
        return
    # Each worker's basetemp is a folder of the controller's, made for this run.
    path = pathlib.Path(config.option.basetemp).parent / "programs.lock"
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def mesh8():
    return jax.make_mesh((8,), ("data",))


@pytest.fixture
def getkey():
    counter = iter(range(10**9))
    return lambda: jax.random.key(next(counter))
