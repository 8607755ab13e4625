"""Connectivity topologies: mask builders, block patterns bounding them, density
allocation and spectral metrics.

- `builders`: `erdos_renyi`, `random_regular`, `structured_regular`,
  `fibonacci`, `pseudo_random_regular`, `small_world`, `n_m` (N:M structured), and `get(name)`.
- `blocks`: `BlockPattern`, where connections may exist.
- `allocation`: `density_from_epsilon` (SET), `erk_densities` and `erk_counts` (RigL's ERK).
- `spectra`: `algebraic_connectivity`, `spectral_gap`.

Every name is also importable from `keras_sparse_moe.topologies` itself.
"""

from keras_sparse_moe.topologies.allocation import density_from_epsilon, erk_counts, erk_densities
from keras_sparse_moe.topologies.blocks import BlockPattern, cluster_ids
from keras_sparse_moe.topologies.builders import (
    TOPOLOGIES,
    erdos_renyi,
    erdos_renyi_positions,
    fibonacci,
    get,
    n_m,
    pseudo_random_regular,
    random_regular,
    small_world,
    structured_regular,
)
from keras_sparse_moe.topologies.spectra import algebraic_connectivity, spectral_gap

__all__ = [
    "TOPOLOGIES",
    "BlockPattern",
    "algebraic_connectivity",
    "cluster_ids",
    "density_from_epsilon",
    "erdos_renyi",
    "erdos_renyi_positions",
    "erk_counts",
    "erk_densities",
    "fibonacci",
    "get",
    "n_m",
    "pseudo_random_regular",
    "random_regular",
    "small_world",
    "spectral_gap",
    "structured_regular",
]
