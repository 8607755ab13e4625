"""The t-SNE objective in `keras.ops`, computed per batch inside the graph.

van der Maaten & Hinton (2008), parametric form van der Maaten (2009). For a
batch `x` of `n` points and its embedding `y`:
- `p_{j|i} ∝ exp(-β_i ‖x_i − x_j‖²)` (self excluded), with `β_i` set so that
  row `i` has entropy `log(perplexity)`; `P = (P_cond + P_condᵀ) / (2n)`;
- `q_ij ∝ (1 + ‖y_i − y_j‖² / α)^(−(α + 1) / 2)`, a Student-t with `α`
  degrees of freedom;
- the loss is `KL(P ‖ Q)`.

`β_i` comes from a bisection on `log β` that runs a fixed number of steps on
all rows at once (`keras.ops.fori_loop`): no Python loop over points and no
data-dependent shapes, so the objective compiles under XLA on TensorFlow and
JAX and works with shuffled batches in any order. Each row's distances are
shifted by their smallest value and scaled by their mean first, so one fixed
bracket fits data of any scale. Everything is float32 inside.

Examples:

    >>> import numpy as np
    >>> from keras_sparse_moe.ops import tsne
    >>> x = np.random.default_rng(0).normal(size=(64, 5)).astype("float32")
    >>> p = np.asarray(tsne.joint_affinities(x, perplexity=10.0))
    >>> bool(np.allclose(p, p.T)), round(float(p.sum()), 5)
    (True, 1.0)
    >>> loss = tsne.tsne_kl(p, x[:, :2], dof=1.0)
    >>> float(loss) > 0
    True
"""

from __future__ import annotations

import math

from keras import ops

__all__ = [
    "BISECTION_STEPS",
    "P_FLOOR",
    "calibrate_rows",
    "check_dof",
    "check_perplexity",
    "conditional_affinities",
    "joint_affinities",
    "sampled_tsne_kl",
    "squared_distances",
    "student_t_kernel",
    "tsne_kl",
]

BISECTION_STEPS = 64
"""Default bisection steps on `log β` (the bracket shrinks 2^64-fold)."""

P_FLOOR = 1e-12
"""Smallest joint affinity between two different points."""

DIRECT_MAX_DIM = 8
"""Widest rows whose pairwise distances are taken from differences, not the Gram form."""

# Bracket of log β for distances scaled to a mean of 1 per row.
_LOG_BETA_LOW, _LOG_BETA_HIGH = -20.0, 30.0


def check_perplexity(perplexity, batch_size, owner="tsne"):
    """Raises a clear `ValueError` unless `0 < perplexity < batch_size - 1`.

    `batch_size` None (unknown until run time) only checks the sign.
    """
    if isinstance(perplexity, bool) or not isinstance(perplexity, (int, float)):
        raise TypeError(
            f"`{owner}` got an invalid `perplexity`. Expected a positive float. "
            f"Received: perplexity={perplexity!r}"
        )
    if not perplexity > 0:
        raise ValueError(
            f"`{owner}` got an invalid `perplexity`. Expected a float > 0. "
            f"Received: perplexity={perplexity!r}"
        )
    if batch_size is not None and not perplexity < batch_size - 1:
        raise ValueError(
            f"`{owner}`: the perplexity must be below the batch size - 1 (each point "
            f"has batch_size - 1 neighbours to spread over). Received: perplexity="
            f"{perplexity}, batch_size={batch_size}. Use a larger batch (a few times "
            "the perplexity or more) or a smaller perplexity."
        )
    return float(perplexity)


def check_dof(dof, n_components, owner):
    """`dof` as a positive float, `"auto"` (`max(1, n_components - 1)`) or `"trainable"`."""
    if dof == "auto":
        return float(max(1, n_components - 1))
    if dof == "trainable":
        return dof
    if isinstance(dof, bool) or not isinstance(dof, (int, float)) or not dof > 0:
        raise ValueError(
            f"`{owner}` got an invalid `dof`. Expected a float > 0, 'auto' (n_components - 1, "
            f"at least 1) or 'trainable'. Received: dof={dof!r}"
        )
    return float(dof)


def squared_distances(x):
    """`(n, n)` float32 squared Euclidean distances between the rows of `x`; zero diagonal.

    Rows of at most `DIRECT_MAX_DIM` features (embeddings) are differenced
    column by column, which is exact at any scale; wider rows go through the Gram
    form `‖a‖² + ‖b‖² − 2 a·b`, whose float32 rounding grows with the
    squared norms: on a 2-D map of spread 233 it zeroed 5% of the distances
    between points 0.35 apart (and their attraction with them). On 2-D rows
    the differences are also faster (8 ms against 13 ms for the distances and
    their gradient over 2,048 points, JAX, 2-core CPU).
    """
    x = ops.cast(x, "float32")
    features = x.shape[1:]  # static, before a reshape with a dynamic batch can hide it
    width = None if None in features else math.prod(features)
    x = ops.reshape(x, (ops.shape(x)[0], -1))
    off_diagonal = 1.0 - ops.eye(ops.shape(x)[0], dtype="float32")
    if width is not None and width <= DIRECT_MAX_DIM:
        d = 0.0
        for k in range(width):  # column by column: no (n, n, d) tensor
            column = x[:, k]
            d = d + ops.square(ops.expand_dims(column, 1) - ops.expand_dims(column, 0))
        return d * off_diagonal
    # Centred first: the Gram form loses what the norms' float32 rounding hides.
    x = x - ops.mean(x, axis=0, keepdims=True)
    sq = ops.sum(ops.square(x), axis=1)
    d = ops.expand_dims(sq, 1) + ops.expand_dims(sq, 0) - 2.0 * ops.matmul(x, ops.transpose(x))
    return ops.maximum(d, 0.0) * off_diagonal


def calibrate_rows(sq_distances, perplexity, valid=None, steps: int = BISECTION_STEPS):
    """Rows `p_{j|i} ∝ exp(-β_i d_ij)` over the `valid` entries, each of the given perplexity.

    The shared kernel of the per-batch affinities (a row per point over the
    whole batch) and the global ones (a row per point over its nearest
    neighbours).

    Args:
        sq_distances: `(n, m)` squared distances of each row's candidates.
        perplexity: Target perplexity of every row, below its number of
            valid entries.
        valid: Optional `(n, m)` 0/1 float mask of the candidates (e.g. off
            the diagonal); default all.
        steps: Bisection steps on `log β` (at least 50 for entropies within
            1e-5 of `log(perplexity)`).

    Returns:
        `(n, m)` float32 rows summing to 1, zero where not valid, no gradient.
    """
    d = ops.stop_gradient(ops.cast(sq_distances, "float32"))
    valid = ops.ones_like(d) if valid is None else ops.cast(valid, "float32")
    count = ops.sum(valid, axis=1, keepdims=True)
    big = ops.max(d) + 1.0
    nearest = ops.min(d * valid + big * (1.0 - valid), axis=1, keepdims=True)
    shifted = ops.maximum(d - nearest, 0.0) * valid
    scale = ops.sum(shifted, axis=1, keepdims=True) / ops.maximum(count - 1.0, 1.0)
    # An all-equal row has scale 0: any β gives the uniform row.
    u = shifted / ops.where(scale > 0, scale, 1.0)
    target = math.log(perplexity)

    def row_terms(log_beta):
        beta = ops.exp(log_beta)
        weights = ops.exp(-beta * u) * valid  # the nearest candidate has weight 1: Z >= 1
        total = ops.sum(weights, axis=1, keepdims=True)
        return beta, weights, total

    def body(_, bracket):
        low, high = bracket
        middle = 0.5 * (low + high)
        beta, weights, total = row_terms(middle)
        entropy = ops.log(total) + beta * ops.sum(weights * u, axis=1, keepdims=True) / total
        too_flat = entropy > target  # too many neighbours: sharpen (raise β)
        return ops.where(too_flat, middle, low), ops.where(too_flat, high, middle)

    n = ops.shape(d)[0]
    low = ops.full((n, 1), _LOG_BETA_LOW, dtype="float32")
    high = ops.full((n, 1), _LOG_BETA_HIGH, dtype="float32")
    low, high = ops.fori_loop(0, steps, body, (low, high))
    _, weights, total = row_terms(0.5 * (low + high))
    return ops.stop_gradient(weights / total)


def conditional_affinities(sq_distances, perplexity, steps: int = BISECTION_STEPS):
    """Rows `p_{j|i}` over the whole batch (self excluded) of the given perplexity.

    Args:
        sq_distances: `(n, n)` squared distances (diagonal ignored).
        perplexity: Target perplexity of every row, `0 < perplexity < n - 1`.
        steps: Bisection steps on `log β`.

    Returns:
        `(n, n)` float32, zero diagonal, rows summing to 1, no gradient.
    """
    off = 1.0 - ops.eye(ops.shape(sq_distances)[0], dtype="float32")
    return calibrate_rows(sq_distances, perplexity, off, steps)


def joint_affinities(x, perplexity, steps: int = BISECTION_STEPS):
    """Symmetric `P = (P_cond + P_condᵀ) / (2n)` of the rows of `x`, floored at `P_FLOOR`.

    The diagonal is zero; the matrix sums to 1 (up to the floor) and carries
    no gradient.
    """
    p = conditional_affinities(squared_distances(x), perplexity, steps)
    n = ops.cast(ops.shape(p)[0], "float32")
    p = (p + ops.transpose(p)) / (2.0 * n)
    off = 1.0 - ops.eye(ops.shape(p)[0], dtype="float32")
    return ops.stop_gradient(ops.maximum(p, P_FLOOR) * off)


def _log_kernel(sq_distances, dof):
    """`log w = −(α + 1) / 2 · log(1 + d / α)` of squared distances `d`."""
    dof = ops.cast(dof, "float32")
    return -0.5 * (dof + 1.0) * ops.log1p(sq_distances / dof)


def _kernel(sq_distances, dof):
    """`w = (1 + d / α)^(−(α + 1) / 2)` of squared distances `d`: `1 / (1 + d)` when `dof`
    is the number 1 (the Cauchy kernel, one division a pair instead of a log and an exp)."""
    if isinstance(dof, (int, float)) and float(dof) == 1.0:
        return 1.0 / (1.0 + sq_distances)
    return ops.exp(_log_kernel(sq_distances, dof))


def student_t_kernel(y, dof=1.0):
    """`w_ij = (1 + ‖y_i − y_j‖² / α)^(−(α + 1) / 2)`, zero diagonal, float32."""
    w = _kernel(squared_distances(y), dof)
    return w * (1.0 - ops.eye(ops.shape(w)[0], dtype="float32"))


def tsne_kl(p, y, dof=1.0, exaggeration=1.0):
    """`KL(P ‖ Q)` of an embedding `y` (`(n, d)`) against joint affinities `p` (`(n, n)`).

    With `exaggeration` `e != 1` the attractive term is multiplied by `e`
    (early exaggeration: the gradient becomes `4 Σ_j (e p_ij − q_ij) ...`);
    `e = 1` gives the plain KL divergence, >= 0.

    Args:
        p: Joint affinities, symmetric, summing to 1, zero diagonal.
        y: The embedding of the same points, any float dtype (computed in float32).
        dof: Degrees of freedom `α` of the Student-t (a float or a scalar tensor,
            e.g. a trainable variable).
        exaggeration: Factor on the attractive term.

    Returns:
        A float32 scalar.
    """
    p = ops.stop_gradient(ops.cast(p, "float32"))
    w = student_t_kernel(y, dof)
    off = 1.0 - ops.eye(ops.shape(p)[0], dtype="float32")
    safe_p = ops.where(p > 0, p, 1.0)
    entropy_term = ops.sum(p * ops.log(safe_p))
    attraction = -ops.sum(p * ops.log(ops.maximum(w, 1e-30)) * off)
    repulsion = ops.log(ops.sum(w))
    return entropy_term + exaggeration * attraction + repulsion


def sampled_tsne_kl(y, dof=1.0, exaggeration=1.0, n_points=None, entropy=0.0, ids=None):
    """A one-batch estimate of the whole set's `KL(P ‖ Q)`, from anchors and sampled neighbours.

    For a set of `N` points with joint affinities `P` (e.g. from
    `keras_sparse_moe.manifold.knn_affinities`),
    `KL = Σ P log P − Σ_ij P_ij log w_ij + log Z` with `Z = Σ_{i≠j} w_ij`.
    The batch `y` (`(2a, d)`) holds `a` different anchors drawn uniformly,
    then, in the same order, one neighbour `j` of each anchor `i` drawn with
    probability `p_{j|i}` (`P = (P_cond + P_condᵀ) / 2N`). Then:
    - the attraction `−Σ P_ij log w_ij` is estimated by the mean of
      `−log w` over the `a` sampled pairs (unbiased);
    - `Z` by `N (N − 1)` times the mean `w` over pairs that were not sampled
      as neighbours. The sampled pairs are near by construction: counting
      them in `Z` would inflate it and keep the map expanding.

    Without `ids`, `Z` averages the pairs of anchors: uniform pairs of
    different points, so with all `N` points as anchors `Z` is exact and the
    expected gradient is the full t-SNE gradient. With `ids` (each row's point
    index), it averages every pair of different points outside the sampled
    pairs: twice the points feel the repulsion in each batch, at the price of
    a slight lean towards points that are many others' neighbours (they are
    drawn more often as neighbours). `ParametricTSNE` passes `ids`: in three
    comparisons on MNIST it trained a better map per step.

    Args:
        y: `(2a, d)` embedding, `a >= 2`: anchors first, then their neighbours.
        dof: Degrees of freedom `α` of the Student-t.
        exaggeration: Factor on the attractive term.
        n_points: `N`; None leaves out the constant `log(N (N − 1))`.
        entropy: The constant `Σ P log P` (≤ 0); 0 leaves it out.
        ids: Optional `(2a,)` indices of the batch's points in the set.

    Returns:
        A float32 scalar: the estimate of `KL(P ‖ Q)` (up to the constants left out).

    Examples:

        >>> import numpy as np
        >>> y = np.random.default_rng(0).normal(size=(8, 2)).astype("float32")
        >>> float(sampled_tsne_kl(y, n_points=100)) > 0
        True
    """
    y = ops.cast(y, "float32")
    n = ops.shape(y)[0]
    a = n // 2
    # The sampled pairs' log-kernel from their own distances (a of them, not n^2).
    attraction = -ops.mean(_log_kernel(ops.sum(ops.square(y[:a] - y[a:]), axis=-1), dof))
    if ids is None:
        pairs = 1.0 - ops.eye(a, dtype="float32")
        w = _kernel(squared_distances(y[:a]), dof)
    else:
        ids = ops.reshape(ops.cast(ids, "int32"), (-1,))
        group = ops.arange(n) % a  # an anchor and its neighbour
        pairs = ops.logical_and(
            ops.expand_dims(group, 1) != ops.expand_dims(group, 0),
            ops.expand_dims(ids, 1) != ops.expand_dims(ids, 0),
        )
        pairs, w = ops.cast(pairs, "float32"), _kernel(squared_distances(y), dof)
    log_z = ops.log(ops.sum(w * pairs)) - ops.log(ops.sum(pairs))
    if n_points is not None:
        log_z = log_z + math.log(float(n_points) * (float(n_points) - 1.0))
    return float(entropy) + exaggeration * attraction + log_z
