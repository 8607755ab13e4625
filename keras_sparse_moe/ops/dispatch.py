"""Top-k routing with a static expert capacity: plan, dispatch and combine in `keras.ops`.

Each token picks `top_k` experts. Expert `e` gets a fixed buffer of `capacity`
slots, so every shape is static and the computation compiles under XLA; an
expert computes only its slots, so the work grows with `top_k / num_experts`
instead of with the number of experts. A token's place in an expert's buffer
is its rank among the tokens that chose that expert, counted first over all
first choices, then over all second choices, ... (a cumulative sum over a
one-hot, which orders the assignments as a stable sort by expert would,
without sorting). Assignments past the capacity are dropped and counted.

Example:
>>> import numpy as np
>>> index = np.array([[0, 1], [0, 2], [0, 1]], dtype="int32")  # 3 tokens, top-2
>>> plan = dispatch_plan(index, num_experts=3, capacity=2)
>>> [int(v) for v in plan.token_of_slot]  # slots of expert 0, 1, 2 in turn
[0, 1, 0, 2, 1, -1]
>>> np.asarray(plan.kept).tolist()  # token 2 overflows expert 0
[[True, True], [True, True], [False, True]]
"""

from __future__ import annotations

import math
from typing import NamedTuple

from keras import ops

__all__ = [
    "DispatchPlan",
    "combine",
    "dispatch_plan",
    "expert_capacity",
    "gather_slots",
    "top_k",
    "top_k_weights",
]


class DispatchPlan(NamedTuple):
    """Where each (token, choice) assignment goes.

    Attributes:
        slot: `(tokens, k)` int32 flat slot `e * capacity + position`, or
            `num_experts * capacity` (the discard slot) when dropped.
        kept: `(tokens, k)` bool, False for assignments over capacity.
        token_of_slot: `(num_experts * capacity,)` int32 token in each slot,
            -1 for an empty slot.
        capacity: Slots per expert (a Python int when the token count is static).
    """

    slot: object
    kept: object
    token_of_slot: object
    capacity: object


def top_k(values, k: int):
    """`(values, indices)` of the `k` largest entries of the last axis, largest first.

    Ties go to the lower index, as `ops.top_k`. Written as `k` rounds of
    argmax over the (small) expert axis rather than `ops.top_k`: on JAX,
    `top_k` lowers to a StableHLO composite that TensorFlow cannot load from
    an exported SavedModel, while argmax exports everywhere.
    """
    n = values.shape[-1]
    picked_values, picked_index = [], []
    remaining = values
    for _ in range(k):
        index = ops.cast(ops.argmax(remaining, axis=-1), "int32")
        hit = ops.one_hot(index, n) > 0
        picked_values.append(ops.sum(ops.where(hit, values, ops.zeros_like(values)), axis=-1))
        picked_index.append(index)
        remaining = ops.where(hit, ops.full_like(remaining, float("-inf")), remaining)
    return ops.stack(picked_values, axis=-1), ops.stack(picked_index, axis=-1)


def top_k_weights(gates, k: int):
    """The `k` largest gate values per row, renormalised to sum to one.

    Returns `(weights, index)`, both `(tokens, k)`; `index` is int32. A row whose
    top-k values are all zero keeps zero weights.
    """
    values, index = top_k(gates, k)
    total = ops.sum(values, axis=-1, keepdims=True)
    weights = ops.where(total > 0, values / ops.where(total > 0, total, 1.0), 0.0)
    return weights, ops.cast(index, "int32")


def expert_capacity(num_tokens, num_experts: int, top_k: int, capacity_factor: float):
    """`ceil(capacity_factor * top_k * num_tokens / num_experts)`, at most `num_tokens`.

    `num_tokens` may be a Python int (static shapes: JAX, XLA) or a scalar
    tensor (TensorFlow graphs with an unknown batch size).
    """
    if isinstance(num_tokens, int):
        wanted = math.ceil(capacity_factor * top_k * num_tokens / num_experts)
        return max(1, min(num_tokens, wanted))
    tokens = ops.cast(num_tokens, "float32")
    wanted = ops.ceil(capacity_factor * top_k * tokens / num_experts)
    return ops.cast(ops.maximum(1.0, ops.minimum(tokens, wanted)), "int32")


def dispatch_plan(index, num_experts: int, capacity) -> DispatchPlan:
    """Assigns every (token, choice) of `index` (`(tokens, k)` int) to a slot."""
    index = ops.cast(index, "int32")
    num_tokens, k = ops.shape(index)[0], ops.shape(index)[1]
    # Choice-major order: every token's first choice outranks any second choice.
    flat = ops.reshape(ops.transpose(index), (-1,))
    one_hot = ops.one_hot(flat, num_experts, dtype="int32")
    position = ops.sum((ops.cumsum(one_hot, axis=0) - 1) * one_hot, axis=1)
    kept = position < capacity
    discard = num_experts * capacity
    slot = ops.where(kept, flat * capacity + position, discard)
    token = ops.tile(ops.arange(num_tokens, dtype="int32"), (k,))
    # Kept slots are distinct, so the scatter-add writes each once; dropped
    # assignments all land in the discard slot, which is cut off.
    filled = ops.scatter(ops.expand_dims(slot, -1), token + 1, (discard + 1,))
    token_of_slot = filled[:discard] - 1
    slot = ops.transpose(ops.reshape(slot, (k, num_tokens)))
    kept = ops.transpose(ops.reshape(kept, (k, num_tokens)))
    return DispatchPlan(slot, kept, token_of_slot, capacity)


def gather_slots(tokens, plan: DispatchPlan):
    """Each slot's token row (`(num_experts * capacity, ...)`); empty slots read token 0."""
    return ops.take(tokens, ops.maximum(plan.token_of_slot, 0), axis=0)


def combine(slot_outputs, plan: DispatchPlan, weights):
    """`sum_j weights[t, j] * slot_outputs[slot[t, j]]`; dropped choices add nothing.

    Args:
        slot_outputs: `(num_experts * capacity, ...)` expert outputs per slot.
        plan: The `DispatchPlan` the slots were filled from.
        weights: `(tokens, k)` gate weight of each choice.
    """
    zero = ops.zeros_like(slot_outputs[:1])
    padded = ops.concatenate([slot_outputs, zero], axis=0)
    picked = ops.take(padded, plan.slot, axis=0)  # (tokens, k, ...)
    weights = ops.cast(weights, picked.dtype)
    weights = ops.reshape(weights, tuple(ops.shape(weights)) + (1,) * (len(picked.shape) - 2))
    return ops.sum(weights * picked, axis=1)
