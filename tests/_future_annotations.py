"""A Module whose annotations are strings (`from __future__ import annotations`),
for tests/test_model_sharding.py."""

from __future__ import annotations

import equinox as eqx
from jaxtyping import Array, Float


class Later(eqx.Module):
    w: Float[Array, "embed hidden"]
    v: Float[Array, "*batch hidden"]
