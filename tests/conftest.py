import os


# Must happen before JAX initialises its backends: 8 simulated CPU devices.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)
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


@pytest.fixture
def mesh8():
    return jax.make_mesh((8,), ("data",))


@pytest.fixture
def getkey():
    counter = iter(range(10**9))
    return lambda: jax.random.key(next(counter))
