"""eqpar: filtered parallel transforms and pytree-aware collectives for Equinox."""

from ._errors import (
    AxisSizeError as AxisSizeError,
    EqparError as EqparError,
    MeshError as MeshError,
    SpecError as SpecError,
    UnboundAxisError as UnboundAxisError,
)
from ._jit import filter_jit as filter_jit
from ._pmap import filter_pmap as filter_pmap
from ._shard_map import filter_shard_map as filter_shard_map
from ._vmap import filter_vmap as filter_vmap


__version__ = "0.1.0"
