"""Spectral metrics of a mask's bipartite graph (inputs and outputs as nodes)."""

from __future__ import annotations

import numpy as np
import scipy.linalg

__all__ = ["algebraic_connectivity", "spectral_gap"]


def _check_mask(mask) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"Expected a 2-D mask of shape (n_in, n_out). Received shape {mask.shape}")
    return (mask != 0).astype(np.float64)


def algebraic_connectivity(mask) -> float:
    """Second-smallest eigenvalue of the Laplacian of the bipartite graph.

    The graph has `n_in + n_out` nodes and an edge per nonzero of `mask`. The
    value is 0 for a disconnected graph and grows with how well connected it
    is (Fiedler 1973).

    Examples:
        >>> round(algebraic_connectivity([[1, 1], [1, 1]]), 6)
        2.0
    """
    m = _check_mask(mask)
    n_in, n_out = m.shape
    laplacian = np.zeros((n_in + n_out, n_in + n_out))
    laplacian[:n_in, n_in:] = -m
    laplacian[n_in:, :n_in] = -m.T
    laplacian[np.diag_indices_from(laplacian)] = np.concatenate([m.sum(axis=1), m.sum(axis=0)])
    values = scipy.linalg.eigh(laplacian, eigvals_only=True, subset_by_index=[0, 1])
    return float(max(values[1], 0.0))


def spectral_gap(mask) -> float:
    """Gap between the two largest adjacency eigenvalues of the bipartite graph.

    For a bipartite graph the adjacency eigenvalues are `±` the singular
    values of `mask`, so the gap is `s_1 - s_2`. A large gap means a good
    expander (fast mixing).

    Examples:
        >>> round(spectral_gap([[1, 1], [1, 1]]), 6)
        2.0
    """
    s = scipy.linalg.svdvals(_check_mask(mask))
    second = s[1] if s.size > 1 else 0.0
    return float(s[0] - second)
