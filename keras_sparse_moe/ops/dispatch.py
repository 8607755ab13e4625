"""Top-k routing with a static expert capacity: plan, dispatch and combine in `keras.ops`.

Each token picks `top_k` experts. Expert `e` gets a fixed buffer of `capacity`
slots, so every shape is static and the computation compiles under XLA; an
expert computes only its slots, so the work grows with `top_k / num_experts`
instead of with the number of experts. A token's place in an expert's buffer
is its rank among the tokens that chose that expert, counted first over all
first choices, then over all second choices, ... (a cumulative sum over a
one-hot, which orders the assignments as a stable sort by expert would,
without sorting). Assignments past the capacity are dropped and counted.

Examples:
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

import keras
import numpy as np
from keras import ops

__all__ = [
    "DispatchPlan",
    "GroupPlan",
    "combine",
    "combine_expert_choice",
    "combine_rows",
    "dispatch_plan",
    "expert_capacity",
    "expert_choice",
    "expert_choice_weights",
    "expert_of_row",
    "gather_slots",
    "group_block",
    "group_plan",
    "grouped_form",
    "grouped_matmul",
    "tiled_matmul",
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
    an exported SavedModel. Where the row count is unknown when traced (an
    export's free batch size), each round is a max, an equality and an
    integer argmax instead: a float `ops.argmax` carries a sign-bit test
    (bitcast, bitwise and) that neither ONNX nor LiteRT's builtins nor
    OpenVINO have, and a picked entry is set below the row's minimum, not to
    -inf (tf2onnx writes a select as `c * a + (1 - c) * b`, where an infinity
    makes NaN). Static shapes keep the float argmax: the portable rounds
    compiled 4 s slower under TensorFlow's XLA at 4,096 tokens.
    """
    n = values.shape[-1]
    portable = not isinstance(values.shape[0], (int, np.integer))
    picked_values, picked_index = [], []
    remaining = values
    if portable:
        replacement = ops.min(values, axis=-1, keepdims=True) - 1.0
    else:
        replacement = ops.full_like(values, float("-inf"))
    for _ in range(k):
        if portable:
            largest = ops.max(remaining, axis=-1, keepdims=True)
            index = ops.argmax(ops.cast(remaining == largest, "int32"), axis=-1)
        else:
            index = ops.argmax(remaining, axis=-1)
        index = ops.cast(index, "int32")
        hit = ops.one_hot(index, n) > 0
        picked_values.append(ops.sum(ops.where(hit, values, ops.zeros_like(values)), axis=-1))
        picked_index.append(index)
        remaining = ops.where(hit, replacement, remaining)
    return ops.stack(picked_values, axis=-1), ops.stack(picked_index, axis=-1)


def top_k_weights(gates, k: int, normalize: bool = True, scores=None):
    """The `k` largest gate values per row, renormalised to sum to one (or, with
    `normalize=False`, as they are: Switch's weighting).

    With `scores` (`(tokens, E)`, e.g. the gates plus a per-expert bias), the
    `k` experts are the ones with the largest scores, and they are weighted by
    their gate values: the scores choose, the gates weigh.

    Returns `(weights, index)`, both `(tokens, k)`; `index` is int32. A row whose
    top-k values are all zero keeps zero weights.
    """
    if scores is None:
        values, index = top_k(gates, k)
    else:
        index = top_k(scores, k)[1]
        values = ops.take_along_axis(gates, index, axis=-1)
    if not normalize:
        return values, ops.cast(index, "int32")
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


def expert_choice(gates, top_k: int, capacity_factor: float = 1.0, valid=None):
    """Expert-choice routing (Zhou et al., 2022): each expert picks its own tokens.

    Expert `e` takes the `capacity = ceil(capacity_factor * top_k * tokens / E)`
    tokens with the largest gate values `gates[:, e]`, so every expert
    computes exactly `capacity` tokens (perfect balance by construction) and a
    token is visited by `capacity_factor * top_k` experts on average: by none,
    one, or several. Which tokens an expert takes depends on the whole batch.

    Args:
        gates: `(tokens, E)` gate values.
        top_k: Mean experts per token.
        capacity_factor: Slack on the mean (1.0: exactly `top_k`).
        valid: Optional `(tokens,)` bool: the tokens that count (the rest is
            padding). Experts pick only those, and the capacity follows their
            number: slots past it, sized for every token, hold value zero.

    Returns:
        `(values, token_of_slot)`, both `(E, capacity)`: each slot's gate value
        and its token (int32), each expert's slots in decreasing gate value.

    Examples:
        >>> import numpy as np
        >>> gates = np.array([[.9, .1], [.6, .4], [.2, .8], [.7, .3]], "float32")
        >>> values, tokens = expert_choice(gates, top_k=1)  # 2 tokens an expert
        >>> np.asarray(tokens).tolist()  # expert 0 takes tokens 0, 3; expert 1: 2, 1
        [[0, 3], [2, 1]]
    """
    num_tokens = gates.shape[0]
    if not isinstance(num_tokens, (int, np.integer)):
        if keras.backend.backend() == "jax":
            raise ValueError(
                "Expert-choice routing needs a token count known when traced on JAX (its "
                "top-k over the tokens has a static size): call or export the model with a "
                f"fixed batch size. Received: gates of shape {tuple(gates.shape)}"
            )
        num_tokens = ops.shape(gates)[0]
    capacity = expert_capacity(num_tokens, gates.shape[-1], top_k, capacity_factor)
    if valid is None:
        values, token_of_slot = ops.top_k(ops.transpose(gates), capacity)
        return values, ops.cast(token_of_slot, "int32")
    # Padding below any gate value: picked last, and then weighed zero.
    scores = ops.where(ops.expand_dims(valid, -1), gates, -1.0)
    values, token_of_slot = ops.top_k(ops.transpose(scores), capacity)
    real = ops.sum(ops.cast(valid, "int32"))
    limit = expert_capacity(real, gates.shape[-1], top_k, capacity_factor)
    used = ops.expand_dims(ops.arange(ops.shape(values)[1], dtype="int32") < limit, 0)
    used = ops.logical_and(used, values >= 0.0)
    return ops.where(used, values, 0.0), ops.cast(token_of_slot, "int32")


def _token_sum(rows, token_of_slot, num_tokens):
    """`(tokens, ...)`: each token's sum of the `rows` (`(E * capacity, ...)`) of its slots."""
    return ops.segment_sum(rows, ops.reshape(token_of_slot, (-1,)), num_segments=num_tokens)


def expert_choice_weights(values, token_of_slot, num_tokens):
    """The `(tokens, E)` mixing weights of an expert-choice selection: a token's gate
    value for each expert that took it, zero elsewhere."""
    num_experts, capacity = values.shape[0], ops.shape(values)[1]
    expert_of_slot = ops.repeat(ops.arange(num_experts, dtype="int32"), capacity)
    picked = ops.one_hot(expert_of_slot, num_experts, dtype=values.dtype)
    rows = picked * ops.reshape(values, (-1, 1))
    return _token_sum(rows, token_of_slot, num_tokens)


def combine_expert_choice(slot_outputs, values, token_of_slot, num_tokens):
    """`(tokens, ...)`: each token's sum over its slots of gate value times the
    slot's output (`(E, capacity, ...)`); a token no expert took gets zeros."""
    flat = ops.reshape(slot_outputs, (-1,) + tuple(slot_outputs.shape[2:]))
    weights = ops.cast(ops.reshape(values, (-1,) + (1,) * (len(flat.shape) - 1)), flat.dtype)
    return _token_sum(flat * weights, token_of_slot, num_tokens)


def dispatch_plan(index, num_experts: int, capacity, valid=None, limit=None) -> DispatchPlan:
    """Assigns every (token, choice) of `index` (`(tokens, k)` int) to a slot.

    Sorts and gathers only: a scatter or a cumulative sum over the assignments
    here made TensorFlow's XLA compile time grow with the token count.
    `valid` (optional `(tokens,)` bool) leaves the other tokens (padding) out:
    they take no slot. `limit` (optional scalar, at most `capacity`) caps each
    expert's slots below the buffer's `capacity`, e.g. the capacity of the
    valid tokens alone.
    """
    index = ops.cast(index, "int32")
    num_tokens, k = ops.shape(index)[0], ops.shape(index)[1]
    if valid is not None:  # padding goes to a last group of its own, past every expert's
        index = ops.where(ops.expand_dims(valid, -1), index, num_experts)
    # Choice-major order: every token's first choice outranks any second choice.
    flat = ops.reshape(ops.transpose(index), (-1,))
    order, rank, sizes, start = _sort_by_expert(flat, num_experts)
    position = rank - ops.take(start, ops.minimum(flat, num_experts - 1))
    limit = capacity if limit is None else limit
    kept = ops.logical_and(position < limit, flat < num_experts)
    discard = num_experts * capacity
    slot = ops.where(kept, flat * capacity + position, discard)
    # Slot s holds the (s % capacity)-th assignment of expert s // capacity, if any.
    slot_index = ops.arange(discard, dtype="int32")
    expert = slot_index // capacity
    position = slot_index - expert * capacity
    filled = position < ops.minimum(ops.take(sizes, expert), limit)
    count = ops.shape(flat)[0]
    assignment = ops.take(order, ops.minimum(ops.take(start, expert) + position, count - 1))
    token_of_slot = ops.where(filled, assignment % num_tokens, -1)
    slot = ops.transpose(ops.reshape(slot, (k, num_tokens)))
    kept = ops.transpose(ops.reshape(kept, (k, num_tokens)))
    return DispatchPlan(slot, kept, token_of_slot, capacity)


def _sort_by_expert(flat, num_experts: int):
    """A stable sort of the assignments `flat` (`(n,)` expert ids) by expert.

    Returns `(order, rank, sizes, start)`: the assignments in sorted order, each
    assignment's place in it, and each expert's group size and first place.
    """
    count = ops.shape(flat)[0]
    # One sort of the unique keys (expert, assignment) is a stable sort by expert.
    keys = flat * count + ops.arange(count, dtype="int32")
    if isinstance(count, int):
        # Sorted keys carry their assignment (key % count): sorts of plain keys
        # instead of argsorts, whose key-value sort XLA runs 1.3x (TensorFlow) to
        # 2.5x (JAX) slower on CPUs. The inverse permutation likewise sorts the
        # keys (assignment, place) while they fit in int32. (A binary search of
        # every key compiled to a compare-all under TensorFlow's XLA: 0.4 s a plan
        # at 16,384 tokens.)
        arange = ops.arange(count, dtype="int32")
        sorted_keys = ops.sort(keys)
        order = sorted_keys % count
        if count * count < 2**31:
            rank = ops.sort(order * count + arange) % count
        else:
            rank = ops.cast(ops.argsort(order), "int32")
        # Group bounds by binary search in the sorted ids: no scatter, no E-wide
        # one-hot (the one-hot count compiled 4 s slower under TensorFlow's XLA
        # at 4,096 tokens).
        experts = ops.arange(num_experts, dtype="int32")
        sorted_ids = sorted_keys // count
        start = ops.cast(ops.searchsorted(sorted_ids, experts, side="left"), "int32")
        sizes = ops.cast(ops.searchsorted(sorted_ids, experts, side="right"), "int32") - start
    else:
        order = ops.cast(ops.argsort(keys), "int32")
        rank = ops.cast(ops.argsort(order), "int32")  # the inverse permutation
        # A length unknown when traced (an export's free batch size): a one-hot
        # count, since searchsorted needs a static length on JAX and ONNX,
        # LiteRT's builtins and OpenVINO have no binary search.
        sizes = ops.sum(ops.one_hot(flat, num_experts, dtype="int32"), axis=0)
        start = ops.cumsum(sizes) - sizes
    return order, rank, sizes, start


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


# ---------------------------------------------------------------------------- #
# Dropless grouped dispatch: every (token, choice) pair is one row, rows sorted
# by expert, each expert computes exactly its rows.


class GroupPlan(NamedTuple):
    """Where each (token, choice) assignment sits in the expert-sorted row layout.

    Rows are grouped by expert; each expert's group is padded to a whole number
    of blocks of `block` rows, so the layout has the static length
    `rows = blocks * block <= tokens * k + num_experts * (block - 1)`, and every
    block belongs to one expert.

    Attributes:
        row_of_choice: `(tokens, k)` int32 row of each assignment.
        choice_of_row: `(rows,)` int32 assignment `token * k + choice` of each
            row, `tokens * k` for a padding row.
        token_of_row: `(rows,)` int32 token of each row; padding rows read token 0
            (their outputs are never combined).
        expert_of_block: `(blocks,)` int32 expert of each block.
        block: Rows per block (a Python int).
    """

    row_of_choice: object
    choice_of_row: object
    token_of_row: object
    expert_of_block: object
    block: int


MAX_BLOCK = 128  # rows per block at most, in the loop form
MAX_BATCHED_BLOCK = 512  # ... in the other forms, where every block's matrix is gathered
UNKNOWN_BATCH_BLOCK = 8  # where the token count is unknown when traced
BLOCK_WORK = 1 << 22  # multiply-adds a block should reach to pay for its loop step


def group_block(num_tokens, top_k: int, num_experts: int, matrix_size=None) -> int:
    """Rows per block of the grouped layout for `num_tokens` tokens: a power of two.

    At least a quarter of the mean group (`tokens * k / E`), so padding stays
    under about a quarter of the rows. With `matrix_size` (`n_in * n_out` of the
    experts' matrices), small matrices get blocks of up to `BLOCK_WORK /
    matrix_size` rows, as long as the padding stays under the real rows: a
    loop step costs about as much as a 64 x 784 x 64 matmul on a CPU, so few
    big blocks beat many small ones there (measured: 784 -> 64 experts run 1.3x
    faster in blocks of 128 than of 32). At most `MAX_BLOCK` in the loop form
    and `MAX_BATCHED_BLOCK` in the others (where each block's matrix is copied:
    fewer blocks, fewer copies), the form being `grouped_form(matrix_size)`; an
    unknown (None or symbolic) count gives `UNKNOWN_BATCH_BLOCK`.
    """
    if not isinstance(num_tokens, (int, np.integer)):
        return UNKNOWN_BATCH_BLOCK
    rows = int(num_tokens) * top_k
    block = _floor_pow2(max(1, rows // (4 * num_experts)))
    if matrix_size:
        wanted = 1 << max(0, math.ceil(math.log2(max(1, BLOCK_WORK / matrix_size))))
        block = max(block, min(wanted, _floor_pow2(max(1, rows // num_experts))))
    cap = MAX_BLOCK if grouped_form(matrix_size) == "loop" else MAX_BATCHED_BLOCK
    return int(min(cap, block))


def _floor_pow2(n: int) -> int:
    return 1 << (int(n).bit_length() - 1)


def group_plan(index, num_experts: int, block: int) -> GroupPlan:
    """Sorts the assignments of `index` (`(tokens, k)` int) by expert into blocks.

    Gathers and sorts only (no scatter), so the plan exports to every runtime.
    A token's row depends on the other tokens of the batch, but what the row
    computes does not: each row meets only its own expert's weights.
    """
    index = ops.cast(index, "int32")
    num_tokens, k = ops.shape(index)[0], ops.shape(index)[1]
    flat = ops.reshape(index, (-1,))  # assignment a = token * k + choice
    count = ops.shape(flat)[0]
    order, rank_in_order, sizes, start = _sort_by_expert(flat, num_experts)
    padded = (sizes + (block - 1)) // block * block
    padded_end = ops.cumsum(padded)
    padded_start = padded_end - padded
    row_of_choice = ops.take(padded_start - start, flat) + rank_in_order

    num_rows = _num_rows(count, num_experts, block)
    block_start = ops.arange(num_rows // block, dtype="int32") * block
    # Trailing unused blocks (past the last group) count as the last expert's.
    if isinstance(count, int):
        expert_of_block = ops.searchsorted(padded_end, block_start, side="right")
    else:  # no binary search in the export formats (see `_sort_by_expert`)
        expert_of_block = _count_at_most(padded_end, block_start)
    expert_of_block = ops.cast(expert_of_block, "int32")
    expert_of_block = ops.minimum(expert_of_block, num_experts - 1)
    row_expert = ops.repeat(expert_of_block, block)
    rank = ops.arange(num_rows, dtype="int32") - ops.take(padded_start, row_expert)
    real = rank < ops.take(sizes, row_expert)
    position = ops.minimum(ops.take(start, row_expert) + rank, count - 1)
    choice_of_row = ops.where(real, ops.take(order, position), count)
    token_of_row = ops.where(real, choice_of_row // k, 0)
    return GroupPlan(
        ops.reshape(row_of_choice, (num_tokens, k)),
        choice_of_row,
        token_of_row,
        expert_of_block,
        block,
    )


def _count_at_most(sorted_values, queries):
    """`searchsorted(sorted_values, queries, side="right")` for short `sorted_values`:
    a comparison count, which every export target has."""
    below = ops.expand_dims(sorted_values, 0) <= ops.expand_dims(queries, -1)
    return ops.sum(ops.cast(below, "int32"), axis=-1)


def _num_rows(count, num_experts: int, block: int):
    """Static bound on the padded layout's length (a tensor when `count` is one)."""
    return (count + num_experts * (block - 1)) // block * block


def grouped_matmul(rows, kernel, plan: GroupPlan, expert_axis: int = 0):
    """`rows[r] @ kernel[expert of r]` for the expert-sorted `(rows, n_in)` rows.

    `kernel` holds one `(n_in, n_out)` matrix per expert, stacked on
    `expert_axis`: `(E, n_in, n_out)` (axis 0) or `(n_in, E, n_out)` (axis 1,
    the column blocks of a `(n_in, E * n_out)` kernel, read without a copy).
    The work is `rows * n_in * n_out`, not `E` times it, in one of the forms
    of `GROUPED_FORMS` (see `grouped_form`).
    """
    if expert_axis not in (0, 1):
        raise ValueError(f"`expert_axis` must be 0 or 1. Received: expert_axis={expert_axis!r}")
    experts = ops.cast(plan.expert_of_block, "int32")
    form = _form_for(rows, _layout(tuple(kernel.shape), (expert_axis, None))[1])
    if form == "ragged_dot":
        import jax

        num_experts = kernel.shape[expert_axis]
        sizes = ops.sum(ops.one_hot(experts, num_experts, dtype="int32"), axis=0) * plan.block
        stacked = kernel if expert_axis == 0 else ops.transpose(kernel, (1, 0, 2))
        return jax.lax.ragged_dot(rows, stacked, sizes)
    blocks = _batched_blocks if form == "batched" else _blocks
    return blocks(rows, kernel, experts, plan.block, (expert_axis, None))


def tiled_matmul(rows, matrix, plan: GroupPlan, tile: int):
    """`rows[r] @ matrix[i*tile:(i+1)*tile, j*tile:(j+1)*tile]` for the group
    `g = i * (n / tile) + j` of row `r`: each row meets one `(tile, tile)` tile of
    the square `(n, n)` `matrix`, the tiles being the groups of `plan`.

    Never `jax.lax.ragged_dot`: its gradient materialises `groups x rows x tile`
    (64 GiB for 64 experts' 4,096 tiles at 16,384 tokens on an H200)."""
    groups = ops.cast(plan.expert_of_block, "int32")
    blocks = _batched_blocks if _form_for(rows, (tile, tile)) == "batched" else _blocks
    return blocks(rows, matrix, groups, plan.block, ("tiles", int(tile)))


GROUPED_FORMS = ("loop", "batched", "ragged_dot")
GROUPED_FORM = None  # one of GROUPED_FORMS, or None: chosen by backend, device and matrix size
SMALL_MATRIX = 1 << 16  # entries of an expert's matrix up to which CPUs batch the blocks too


def grouped_form(matrix_size=None) -> str:
    """How `grouped_matmul` runs the blocks of rows (`GROUPED_FORM`, else by device
    and by the `n_in * n_out` entries of the experts' matrices, `matrix_size`).

    - `"loop"`: one matmul a block in a compiled loop, with a custom gradient
      that sums each expert's `x_b^T @ dy_b`. The fastest form on CPUs (both
      backends) for matrices of more than `SMALL_MATRIX` entries; the default
      there.
    - `"batched"`: each block's matrix gathered, then one batched matmul over
      all blocks (autodiff's gradient scatters into the kernel). Reads
      `blocks * n_in * n_out` weights, which accelerators do at full bandwidth;
      the default on JAX GPUs and TPUs, and on CPUs for small matrices (up to
      `SMALL_MATRIX` entries, e.g. 784 -> 64 experts or 64 x 64 route tiles),
      where a loop step costs more than copying the block's matrix: measured
      0.45-0.5x the loop's time for 784 -> 64 experts at 1,024 tokens on both
      backends, but 1.3-2.2x for 1024 -> 256 experts on JAX.
    - `"ragged_dot"`: `jax.lax.ragged_dot` (JAX only).

    Where the rows' count is unknown when traced (an exported model's free
    batch size) and `GROUPED_FORM` is None, `"batched"` is used: it has no
    loop, so it runs in every export format.
    """
    if GROUPED_FORM is not None:
        if GROUPED_FORM not in GROUPED_FORMS:
            raise ValueError(
                f"`GROUPED_FORM` must be one of {GROUPED_FORMS} or None. "
                f"Received: GROUPED_FORM={GROUPED_FORM!r}"
            )
        if GROUPED_FORM == "ragged_dot" and keras.backend.backend() != "jax":
            raise ValueError(
                "`GROUPED_FORM='ragged_dot'` needs the JAX backend. Received: backend="
                f"{keras.backend.backend()!r}"
            )
        return GROUPED_FORM
    if keras.backend.backend() == "jax":
        import jax

        if jax.default_backend() != "cpu":
            return "batched"
    return "batched" if matrix_size and matrix_size <= SMALL_MATRIX else "loop"


def _form_for(rows, matrix_shape):
    """`grouped_form()` for `(n_in, n_out)` matrices, except that rows of unknown
    count (a serving signature's free batch size) take the loop-free
    `"batched"` form unless `GROUPED_FORM` says otherwise: a loop over a
    symbolic number of blocks becomes a TensorList loop that LiteRT's builtins
    and OpenVINO cannot run, while a gather and a batched matmul export
    everywhere."""
    if GROUPED_FORM is None and not isinstance(rows.shape[0], (int, np.integer)):
        return "batched"
    return grouped_form(int(matrix_shape[0]) * int(matrix_shape[1]))


def _stacked_matrices(kernel, layout):
    """The kernel as `(G, n_in, n_out)` matrices (a view for layout `(0, None)`)."""
    kind, tile = layout
    if kind == 0:
        return kernel
    if kind == 1:
        return ops.transpose(kernel, (1, 0, 2))
    per_side = kernel.shape[0] // tile
    tiles = ops.reshape(kernel, (per_side, tile, per_side, tile))
    return ops.reshape(ops.transpose(tiles, (0, 2, 1, 3)), (per_side * per_side, tile, tile))


def _batched_blocks(rows, kernel, groups, block, layout):
    """`rows_b @ M_{groups[b]}` for every block at once: a gather of the blocks'
    matrices and one batched matmul."""
    matrices = ops.take(_stacked_matrices(kernel, layout), groups, axis=0)
    blocks = ops.reshape(rows, (-1, block, rows.shape[-1]))
    out = ops.einsum("bri,bio->bro", blocks, matrices)
    return ops.reshape(out, (-1, out.shape[-1]))


def _layout(kernel_shape, layout):
    """`(number of matrices, (n_in, n_out), slice shape)` of a kernel layout:
    `(0, None)` `(G, n_in, n_out)`, `(1, None)` `(n_in, G, n_out)`, or
    `("tiles", t)` the `(t, t)` tiles of an `(n, n)` matrix, row-major."""
    kind, tile = layout
    if kind == "tiles":
        per_side = kernel_shape[0] // tile
        return per_side * per_side, (tile, tile), (tile, tile)
    if kind == 0:
        return kernel_shape[0], tuple(kernel_shape[1:]), (1,) + tuple(kernel_shape[1:])
    return (
        kernel_shape[1],
        (kernel_shape[0], kernel_shape[2]),
        (kernel_shape[0], 1, kernel_shape[2]),
    )


def _starts(groups, kernel_shape, layout):
    """`(blocks, kernel rank)` origin of each block's matrix in the kernel."""
    kind, tile = layout
    zeros = ops.zeros_like(groups)
    if kind == "tiles":
        per_side = kernel_shape[0] // tile
        return ops.stack([groups // per_side * tile, groups % per_side * tile], axis=-1)
    return ops.stack([groups, zeros, zeros] if kind == 0 else [zeros, groups, zeros], axis=-1)


def _blocks(rows, kernel, groups, block, layout):
    """`rows_b @ M_{groups[b]}` for each block `b` of `block` rows; `groups` is
    non-decreasing (the plan's blocks are sorted by group)."""

    # The group ids are an argument, not closed over (see `sparse_matmul`).
    @ops.custom_gradient
    def product(rows, kernel, groups):
        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            upstream = ops.cast(upstream, rows.dtype)
            d_rows = _block_products(upstream, kernel, groups, block, layout, transpose=True)
            return d_rows, _kernel_gradient(rows, upstream, kernel, groups, block, layout), None

        return _block_products(rows, kernel, groups, block, layout), grad

    return product(rows, kernel, groups)


def _matrix(kernel, group, layout):
    """Group `group`'s `(n_in, n_out)` matrix, gathered from the kernel without a copy
    of the rest (a gather, which TensorFlow's XLA runs faster than a dynamic slice)."""
    kind, tile = layout
    if kind != "tiles":
        return ops.take(kernel, group, axis=kind)
    per_side = kernel.shape[0] // tile
    tiles = ops.reshape(kernel, (per_side, tile, per_side, tile))
    return ops.take(ops.take(tiles, group // per_side, axis=0), group % per_side, axis=1)


def _block_products(rows, kernel, groups, block, layout, transpose=False):
    """`rows_b @ M_b` (or `rows_b @ M_b^T`) for each block `b`, one matmul a block
    in a compiled loop (`keras.ops.map`)."""
    blocks = ops.reshape(rows, (-1, block, rows.shape[-1]))

    def one_block(args):
        x, group = args
        matrix = _matrix(kernel, group, layout)
        return ops.matmul(x, ops.transpose(matrix) if transpose else matrix)

    out = ops.map(one_block, (blocks, groups))
    return ops.reshape(out, (-1, out.shape[-1]))


def _kernel_gradient(rows, upstream, kernel, groups, block, layout):
    """`dL/dkernel`: each block's `x_b^T @ dy_b` added into its own group's matrix.

    JAX: one loop over the blocks whose carry is the whole gradient, updated
    in place (the fastest form measured there). TensorFlow: XLA copied such a
    carry when the optimizer's update followed in the same step (10 s a step at
    64 experts), so there one loop over the groups sums each group's contiguous
    blocks into a matrix of its own, and the matrices are stacked.
    """
    count, (n_in, n_out), shape = _layout(tuple(kernel.shape), layout)
    x_blocks = ops.reshape(rows, (-1, block, n_in))
    dy_blocks = ops.reshape(upstream, (-1, block, n_out))

    def block_product(i):
        return ops.matmul(ops.transpose(x_blocks[i]), dy_blocks[i])

    if keras.backend.backend() == "tensorflow":
        ids = ops.arange(count, dtype="int32")
        first = ops.cast(ops.searchsorted(groups, ids, side="left"), "int32")
        last = ops.cast(ops.searchsorted(groups, ids, side="right"), "int32")

        def one_group(bounds):
            total = ops.zeros((n_in, n_out), rows.dtype)
            return ops.fori_loop(bounds[0], bounds[1], lambda i, t: t + block_product(i), total)

        matrices = ops.map(one_group, ops.stack([first, last], axis=-1))
        return _from_matrices(matrices, tuple(kernel.shape), layout)

    starts = _starts(groups, tuple(kernel.shape), layout)

    def body(i, grad):
        total = ops.slice(grad, starts[i], shape) + ops.reshape(block_product(i), shape)
        return ops.slice_update(grad, starts[i], total)

    return ops.fori_loop(0, ops.shape(groups)[0], body, ops.zeros(ops.shape(kernel), rows.dtype))


def _from_matrices(matrices, kernel_shape, layout):
    """`(G, n_in, n_out)` matrices laid out as the kernel."""
    kind, tile = layout
    if kind == 0:
        return matrices
    if kind == 1:
        return ops.transpose(matrices, (1, 0, 2))
    per_side = kernel_shape[0] // tile
    tiles = ops.reshape(matrices, (per_side, per_side, tile, tile))
    return ops.reshape(ops.transpose(tiles, (0, 2, 1, 3)), tuple(kernel_shape))


def expert_of_row(plan: GroupPlan):
    """`(rows,)` int32 expert of each row of the layout."""
    return ops.repeat(plan.expert_of_block, plan.block)


def combine_rows(row_outputs, plan: GroupPlan, weights):
    """`sum_j weights[t, j] * row_outputs[row_of_choice[t, j]]`, a `(tokens, ...)` tensor."""
    picked = ops.take(row_outputs, plan.row_of_choice, axis=0)  # (tokens, k, ...)
    weights = ops.cast(weights, picked.dtype)
    weights = ops.reshape(weights, tuple(ops.shape(weights)) + (1,) * (len(picked.shape) - 2))
    return ops.sum(weights * picked, axis=1)
