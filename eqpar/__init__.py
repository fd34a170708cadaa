"""eqpar: filtered parallel transforms and pytree-aware collectives for Equinox."""

from . import fft as fft
from ._checkpoint import CheckpointManager as CheckpointManager
from ._collectives import (
    all_gather as all_gather,
    all_to_all as all_to_all,
    axis_index as axis_index,
    axis_size as axis_size,
    halo_exchange as halo_exchange,
    mark_varying as mark_varying,
    pmax as pmax,
    pmean as pmean,
    pmin as pmin,
    psum as psum,
    psum_scatter as psum_scatter,
    ring_shift as ring_shift,
    sensor_sum as sensor_sum,
    varying_axes as varying_axes,
)
from ._distributed import (
    gather as gather,
    global_batch as global_batch,
    initialize as initialize,
    local_batch as local_batch,
)
from ._errors import (
    AxisSizeError as AxisSizeError,
    CheckpointError as CheckpointError,
    DeletedArrayError as DeletedArrayError,
    EqparError as EqparError,
    EqparWarning as EqparWarning,
    MeshError as MeshError,
    ReplicationError as ReplicationError,
    SpecError as SpecError,
    UnboundAxisError as UnboundAxisError,
)
from ._grad import (
    filter_grad_mean as filter_grad_mean,
    filter_value_and_grad_mean as filter_value_and_grad_mean,
    grad_mean as grad_mean,
)
from ._jit import filter_jit as filter_jit
from ._kernel import kernel as kernel
from ._keys import split_key as split_key
from ._model_sharding import partition_specs as partition_specs
from ._optax import pmean_updates as pmean_updates
from ._parallel import Parallel as Parallel
from ._pipeline import pipeline as pipeline
from ._placement import (
    data_mesh as data_mesh,
    filter_device_put as filter_device_put,
    pad_batch as pad_batch,
    replicate as replicate,
    unreplicate as unreplicate,
)
from ._placement_cache import (
    placement_cache as placement_cache,
    PlacementCacheInfo as PlacementCacheInfo,
)
from ._pmap import filter_pmap as filter_pmap
from ._scan import filter_scan as filter_scan
from ._shard_map import filter_shard_map as filter_shard_map
from ._stacked import PerLayer as PerLayer, Stacked as Stacked
from ._vmap import (
    chosen_chunk_size as chosen_chunk_size,
    filter_vmap as filter_vmap,
)


__version__ = "0.1.0"
