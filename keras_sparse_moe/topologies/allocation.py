"""How many connections a layer gets: SET's epsilon rule and RigL's ERK allocation."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from keras_sparse_moe.validation import check_density, check_epsilon

__all__ = ["density_from_epsilon", "erk_counts", "erk_densities"]


def density_from_epsilon(epsilon: float, n_in: int, n_out: int, kernel_dims=()) -> float:
    """SET's density `p = epsilon * (n_in + n_out) / (n_in * n_out)`.

    For a convolution kernel `(*kernel_dims, n_in, n_out)` the kernel
    dimensions count as in ERK (Evci et al. 2020): `p = epsilon *
    sum(shape) / prod(shape)`. Raises a `ValueError` when `epsilon` is not
    positive or gives `p > 1`.

    Examples:
        >>> round(density_from_epsilon(20, 784, 1000), 4)
        0.0455
        >>> round(density_from_epsilon(2, 64, 64, kernel_dims=(3, 3)), 4)
        0.0073
    """
    epsilon = check_epsilon(epsilon, "density_from_epsilon")
    shape = (*kernel_dims, n_in, n_out)
    density = float(epsilon) * sum(shape) / math.prod(shape)
    if density > 1.0:
        max_epsilon = math.prod(shape) / sum(shape)
        raise ValueError(
            f"`epsilon={epsilon}` gives a density of {density:.3g} > 1 for a "
            f"{'x'.join(str(d) for d in shape)} kernel. Use epsilon <= {max_epsilon:.4g} or "
            "pass `density` instead."
        )
    return density


def erk_densities(shapes: Sequence[Sequence[int]], density: float) -> list[float]:
    """RigL's Erdős–Rényi-Kernel allocation of a global density over layers.

    A layer of shape `(..., n_in, n_out)` (kernel dimensions first for convs)
    gets a density proportional to `sum(shape) / prod(shape)`, scaled so the
    total number of weights kept is `density * sum(prod(shape))`. Layers whose
    density would exceed 1 are made dense and the scale re-solved for the rest
    (Evci et al. 2020).

    Examples:
        >>> [round(d, 3) for d in erk_densities([(784, 300), (300, 100), (100, 10)], 0.1)]
        [0.08, 0.23, 1.0]
    """
    density = check_density(density, "erk_densities")
    shapes = [tuple(int(d) for d in s) for s in shapes]
    if not shapes or any(len(s) < 2 or min(s) <= 0 for s in shapes):
        raise ValueError(
            "`erk_densities` needs a non-empty list of shapes with at least two "
            f"positive dimensions each. Received: shapes={shapes}"
        )
    sizes = np.array([math.prod(s) for s in shapes], dtype=np.float64)
    scores = np.array([sum(s) / math.prod(s) for s in shapes], dtype=np.float64)
    budget = density * sizes.sum()
    dense = np.zeros(len(shapes), dtype=bool)
    while True:
        free_budget = budget - sizes[dense].sum()
        scale = free_budget / np.sum(scores[~dense] * sizes[~dense])
        result = np.where(dense, 1.0, scale * scores)
        newly_dense = (~dense) & (result > 1.0)
        if not newly_dense.any():
            return [float(d) for d in result]
        dense |= newly_dense


def erk_counts(shapes: Sequence[Sequence[int]], density: float) -> list[int]:
    """`erk_densities` as whole connection counts that add up to the global target.

    Each layer gets the whole part of its ERK share (at least one connection,
    at most its size); the connections left over go one each to the layers
    with the largest fractional parts (largest-remainder rounding), so the
    total is `round(density * sum(prod(shape)))` exactly, capped layers and
    all. (Rounding each layer on its own misses by up to half a connection a
    layer.) Only when the target is below one connection a layer is the total
    larger: every layer keeps at least one.

    Examples:
        A small first layer, capped at dense; rounding each layer would give 595:

        >>> shapes = [(2, 19), (19, 30), (30, 21)]
        >>> counts = erk_counts(shapes, 0.48)
        >>> counts, sum(counts), round(0.48 * (38 + 570 + 630))
        ([38, 272, 284], 594, 594)
    """
    densities = erk_densities(shapes, density)
    sizes = [math.prod(int(d) for d in s) for s in shapes]
    shares = [d * n for d, n in zip(densities, sizes)]
    counts = [min(n, max(1, math.floor(share))) for share, n in zip(shares, sizes)]
    left = round(density * sum(sizes)) - sum(counts)
    by_remainder = sorted(range(len(sizes)), key=lambda i: shares[i] - counts[i], reverse=True)
    while left != 0:
        step = 1 if left > 0 else -1
        # Give to the largest remainders below their size; take (only after a floor
        # of one raised some layer) from the smallest remainders above one.
        order = by_remainder if step > 0 else by_remainder[::-1]
        movable = [i for i in order if (counts[i] < sizes[i] if step > 0 else counts[i] > 1)]
        if not movable:
            break
        for i in movable[: abs(left)]:
            counts[i] += step
        left -= step * min(abs(left), len(movable))
    return counts
