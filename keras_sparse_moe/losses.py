"""Gate-balancing losses for mixtures of experts: pure float32 functions of tensors.

Every function takes gate values `G` of shape `(batch, num_experts)` (rows on
the simplex) or router logits, computes in float32 whatever the inputs' dtype
(router math must not run in float16), and is NaN-free at the edges (one-hot
gates, perfectly balanced gates), where `log` and `std` are not. Those that
average over tokens take an optional `mask` `(tokens,)`: only the tokens it
keeps count (padding of a sequence batch), as if the others were not there.
"""

from __future__ import annotations

import numpy as np
from keras import ops

__all__ = [
    "batch_entropy",
    "batch_variance",
    "coefficient_of_variation_squared",
    "importance_cv2",
    "load_cv2",
    "router_z_loss",
    "sample_entropy",
    "sample_variance",
    "switch_load_balancing",
    "tsne_kl",
]

EPSILON = 1e-10


def _f32(x):
    return ops.cast(x, "float32")


def _checked(x, name, owner, ranks, what):
    """`x` as a float32 tensor, after checking its rank (static: no in-graph assert)."""
    x = _f32(x)
    if len(x.shape) not in ranks:
        raise ValueError(
            f"`{owner}` got an invalid `{name}`. Expected {what}. "
            f"Received: {name} of shape {tuple(x.shape)}"
        )
    return x


def _gates(gates, owner, name="gates"):
    return _checked(gates, name, owner, (2,), "a rank-2 tensor (tokens, num_experts)")


def _token_sum(x, mask):
    """Sum over the tokens (axis 0) of `x`, of the tokens `mask` keeps (None: all)."""
    if mask is None:
        return ops.sum(x, axis=0)
    mask = _checked(mask, "mask", "balancing loss", (1,), "a rank-1 tensor (tokens,)")
    keep = ops.reshape(mask > 0, (-1,) + (1,) * (len(x.shape) - 1))
    return ops.sum(ops.where(keep, x, ops.zeros_like(x)), axis=0)


def _token_mean(x, mask):
    """Mean over the tokens (axis 0) of `x`, of the tokens `mask` keeps (None: all)."""
    if mask is None:
        return ops.mean(x, axis=0)
    count = ops.sum(ops.cast(_f32(mask) > 0, "float32"))
    return _token_sum(x, mask) / ops.maximum(count, 1.0)


def _entropy(p, axis=-1):
    """H(p) = -sum p ln p, with 0 ln 0 = 0 (and a zero gradient there)."""
    safe = ops.where(p > 0, p, ops.ones_like(p))
    return -ops.sum(ops.where(p > 0, p * ops.log(safe), ops.zeros_like(p)), axis=axis)


def batch_entropy(gates, mask=None):
    """`ln E - H(mean_x G(x))`: minimising it spreads usage over all `E` experts.

    The batch term of the `"entropy"` preset (weight 0.1 there). The offset
    `ln E` (the entropy of perfectly balanced usage) makes it non-negative, as
    the other balancing losses are, without changing its gradient: it ranges
    from 0 (balanced usage) to `ln E` (one expert takes everything).

    Examples:
        >>> import numpy as np
        >>> round(float(batch_entropy(np.full((4, 2), 0.5))), 4)
        0.0
        >>> round(float(batch_entropy(np.array([[1.0, 0.0], [1.0, 0.0]]))), 4)  # ln 2
        0.6931
    """
    gates = _gates(gates, "batch_entropy")
    balanced = float(np.log(gates.shape[-1]))
    return balanced - _entropy(_token_mean(gates, mask))


def sample_entropy(gates, mask=None):
    """`mean_x H(G(x))`: minimising it makes each sample pick one expert.

    The sample term of the `"entropy"` preset (weight 0.01 there).
    """
    return _token_mean(_entropy(_gates(gates, "sample_entropy")), mask)


def batch_variance(gates, mask=None):
    """`Var_e(mean_x G(x)_e)`: the variance form of `batch_entropy`.

    Zero when every expert has the same mean gate value; minimising it
    balances usage, as minimising `batch_entropy` does. On the simplex the
    variance falls where the entropy rises (both are set by `sum p^2` and
    `sum p ln p` pulling the same way: uniform has the highest entropy and
    zero variance), so using variance instead of entropy needs the
    opposite sign: a literal `-Var` would reward putting
    all the traffic on one expert. The library keeps each term's purpose
    (batch: balanced use; sample: confident gates) and flips the sign.
    """
    return ops.var(_token_mean(_gates(gates, "batch_variance"), mask))


def sample_variance(gates, mask=None):
    """`(E - 1) / E^2 - mean_x Var_e(G(x)_e)`: the variance form of `sample_entropy`.

    Minimising it pushes each sample's gate vector towards one-hot, as
    minimising `sample_entropy` does; hence the minus sign (a literal
    `+mean Var` would reward uniform, undecided gates; see `batch_variance`).
    The offset `(E - 1) / E^2`, the variance of a one-hot gate vector over `E`
    experts (the largest on the simplex), makes it non-negative without
    changing its gradient: 0 for one-hot gates, `(E - 1) / E^2` for uniform ones.

    Examples:
        >>> import numpy as np
        >>> round(float(sample_variance(np.array([[1.0, 0.0, 0.0, 0.0]]))), 4)
        0.0
        >>> round(float(sample_variance(np.full((2, 4), 0.25))), 4)  # 3 / 16
        0.1875
    """
    gates = _gates(gates, "sample_variance")
    experts = gates.shape[-1]
    return (experts - 1) / experts**2 - _token_mean(ops.var(gates, axis=-1), mask)


def coefficient_of_variation_squared(values):
    """`Var(v) / (Mean(v)^2 + eps)` over the last axis.

    Computed from the variance, never from `std`: the gradient of `std` is
    NaN when all values are equal, which is exactly the balanced optimum.
    """
    values = _f32(values)
    mean = ops.mean(values, axis=-1)
    return ops.var(values, axis=-1) / (ops.square(mean) + EPSILON)


def importance_cv2(gates, mask=None):
    """CV² of the experts' importance `sum_x G(x)` (Shazeer et al. 2017)."""
    return coefficient_of_variation_squared(_token_sum(_gates(gates, "importance_cv2"), mask))


def load_cv2(load):
    """CV² of the experts' (smooth) load, as returned by `NoisyTopKGate`."""
    load = _checked(load, "load", "load_cv2", (1,), "a rank-1 tensor (num_experts,)")
    return coefficient_of_variation_squared(load)


def switch_load_balancing(router_probs, expert_index, alpha=0.01, mask=None):
    """Switch Transformer balance loss `alpha * E * sum_e f_e * P_e`.

    Args:
        router_probs: `(tokens, E)` router softmax probabilities.
        expert_index: `(tokens,)` int expert each token was sent to (top-1),
            or `(tokens, E)` 0/1 dispatch mask (top-k).
        alpha: Loss weight (0.01 in Fedus et al. 2021).
        mask: Optional `(tokens,)`: the tokens that count (the rest is padding).

    `f_e` is the fraction of tokens dispatched to expert `e` and `P_e` the mean
    router probability of `e`; the loss is `alpha` at perfect balance.
    """
    owner = "switch_load_balancing"
    probs = _gates(router_probs, owner, "router_probs")
    expert_index = ops.convert_to_tensor(expert_index)
    index_rank = len(expert_index.shape)  # static shapes: no in-graph assert
    tokens, index_tokens = probs.shape[0], expert_index.shape[0] if index_rank else None
    mismatch = tokens is not None and index_tokens is not None and tokens != index_tokens
    if index_rank not in (1, 2) or mismatch:
        raise ValueError(
            f"`{owner}` got an invalid `expert_index`. Expected shape (tokens,) or "
            f"(tokens, num_experts) with the tokens of `router_probs` {tuple(probs.shape)}. "
            f"Received: expert_index of shape {tuple(expert_index.shape)}"
        )
    num_experts = ops.shape(probs)[-1]
    if index_rank == 2:
        dispatch = _f32(expert_index)
    else:
        dispatch = ops.one_hot(ops.cast(expert_index, "int32"), num_experts, dtype="float32")
    fraction = _token_mean(dispatch, mask)
    mean_prob = _token_mean(probs, mask)
    return alpha * ops.cast(num_experts, "float32") * ops.sum(fraction * mean_prob)


def router_z_loss(logits, mask=None):
    """`mean_x logsumexp(logits_x)^2` (ST-MoE): keeps router logits small."""
    logits = _gates(logits, "router_z_loss", "logits")
    return _token_mean(ops.square(ops.logsumexp(logits, axis=-1)), mask)


def tsne_kl(x, y, perplexity=30.0, dof=1.0, exaggeration=1.0):
    """The parametric t-SNE loss of a batch: `KL(P(x) ‖ Q(y))`.

    `P` are the joint affinities of the batch's inputs `x` at the given
    perplexity, computed in the graph (`keras_sparse_moe.ops.tsne`), so the
    batches may be shuffled; `Q` the Student-t similarities of the embedding
    `y`. In the order of a Keras loss (`y_true=x`, `y_pred=y`), so
    `functools.partial(tsne_kl, perplexity=30.0)` trains an embedding network
    with `model.compile(loss=...)` and `fit(x, x)`.

    Args:
        x: `(n, ...)` inputs; rows are flattened.
        y: `(n, d)` embedding.
        perplexity: Effective number of neighbours, `0 < perplexity < n - 1`.
        dof: Degrees of freedom `α` of the Student-t.
        exaggeration: Factor on the attractive term (early exaggeration).
    """
    from keras_sparse_moe.ops import tsne

    y = _checked(y, "y", "tsne_kl", (2,), "a rank-2 embedding (n, d)")
    n = x.shape[0]
    if n is not None and y.shape[0] is not None and n != y.shape[0]:
        raise ValueError(
            "`tsne_kl` needs one embedding row per input. "
            f"Received: x of shape {tuple(x.shape)} and y of shape {tuple(y.shape)}"
        )
    tsne.check_perplexity(perplexity, n, "tsne_kl")
    p = tsne.joint_affinities(x, perplexity)
    return tsne.tsne_kl(p, y, dof=dof, exaggeration=exaggeration)
