"""Drop-and-grow primitives for dynamic sparse training, in `keras.ops`.

All functions are pure and shape-static: counts that change from call to call
are tensors, and every selection is a `top_k` of a fixed size `k_max` whose
first `count` entries are kept. So one compiled function serves every call
(XLA on TensorFlow, `jax.jit` on JAX) and nothing leaves the device.
Masks and kernels are handled flattened; callers reshape.
"""

from __future__ import annotations

import keras
from keras import ops

__all__ = [
    "compile_function",
    "magnitude_drop",
    "select_top",
    "set_drop",
    "grow",
]

_NEG = -3.0e38  # below any score: never selected while `count` allows


def compile_function(fn):
    """Compiles a pure tensor function with the backend's XLA compiler."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=True, reduce_retracing=True)
    if backend == "jax":
        import jax

        return jax.jit(fn)
    return fn


def select_top(scores, count, k_max: int):
    """A 0/1 vector marking the `count` highest `scores` (`count <= k_max`).

    Args:
        scores: 1-D float tensor.
        count: Scalar int tensor, the number of entries to select.
        k_max: Static upper bound on `count`; at most `len(scores)`.
    """
    _, indices = ops.top_k(scores, k_max, sorted=True)
    take = ops.cast(ops.arange(k_max) < ops.cast(count, "int32"), scores.dtype)
    return ops.scatter(ops.expand_dims(indices, -1), take, ops.shape(scores))


def set_drop(kernel, mask, zeta: float, k_max: int):
    """SET's removal: the fraction `zeta` of the smallest positive weights and
    of the largest negative weights (those closest to zero).

    Kept weights that are exactly zero count as the smallest positives. Returns
    a 0/1 vector of the connections to remove.
    """
    kept = mask > 0
    positive = ops.logical_and(kept, kernel >= 0)
    negative = ops.logical_and(kept, kernel < 0)
    n_pos = ops.floor(zeta * ops.sum(ops.cast(positive, "float32")))
    n_neg = ops.floor(zeta * ops.sum(ops.cast(negative, "float32")))
    drop_pos = select_top(ops.where(positive, -kernel, _NEG), n_pos, k_max)
    drop_neg = select_top(ops.where(negative, kernel, _NEG), n_neg, k_max)
    return drop_pos + drop_neg


def magnitude_drop(kernel, mask, count, k_max: int):
    """The `count` kept connections of smallest magnitude, as a 0/1 vector."""
    return select_top(ops.where(mask > 0, -ops.abs(kernel), _NEG), count, k_max)


def grow(mask, scores, count, k_max: int):
    """The `count` empty positions (mask 0) with the highest `scores`, as 0/1.

    Pass uniform noise as `scores` for SET's random regrowth, or the dense
    gradient magnitude for RigL. Scores must be non-negative.
    """
    return select_top(ops.where(mask > 0, _NEG, scores), count, k_max)
