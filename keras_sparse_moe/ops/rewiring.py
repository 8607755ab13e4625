"""Drop-and-grow primitives for dynamic sparse training, in `keras.ops`.

All functions are pure and shape-static: counts that change from call to call
are tensors and every array has a size fixed per layer, so one compiled
function serves every call (XLA on TensorFlow, `jax.jit` on JAX) and nothing
leaves the device. Kernels and masks are handled flattened.

Connections are addressed through a compact list `indices` of the kept
positions (size nnz), so SET and RigL work on O(nnz) values instead of the
full `n_in * n_out` array: exact selection is a bisection on the float bits
of the values (an int32 key that orders non-negative floats), ties broken by
position, instead of a sort or a large `top_k`. Where a choice spans the
whole array (RigL's growth), a sampled threshold first narrows it to a few
candidates, compacted without a running count over the whole array.
"""

from __future__ import annotations

import math

import numpy as np
from keras import ops

from keras_sparse_moe._runtime import stateless_randint

__all__ = [
    "compact_positions",
    "largest_empty_positions",
    "magnitude_keys",
    "prefix_count",
    "compact_chosen",
    "empty_candidates",
    "random_empty_indices",
    "random_empty_positions",
    "random_indices",
    "membership_table_size",
    "acceptance",
    "remove",
    "remove_slots",
    "rewire_slots",
    "per_dropped_slot",
    "write_slots",
    "connection_list_is_current",
    "dropped_marker",
    "dropped_positions",
    "rewire",
    "select_smallest",
    "set_drop",
    "stateless_permutation",
    "stateless_randint",
]

INT_MAX = _INT_MAX = 2**31 - 1

_NEG = -3.0e38  # below any score: never selected while `count` allows


def stateless_permutation(seed, n: int):
    """A random permutation of `range(n)` (int32) from a `(2,)` int32 `seed` tensor."""
    return ops.cast(ops.argsort(stateless_randint(seed, (n,), _INT_MAX)), "int32")


def _count(x):
    return ops.sum(ops.cast(x, "int32"))


_BLOCK = 32  # 1.3-2x faster than 128 on CPU, for 20K to 1M entries


def prefix_count(flags):
    """int32 inclusive running count of the True entries of a 1-D boolean.

    The same as `cumsum(cast(flags, "int32"))`. XLA lowers `cumsum` to a
    reduce-window that is up to 2x slower on CPU than a matmul, so
    blocks of 32 are counted by a matmul with a 0/1 triangle (exact in any
    float precision: 0/1 inputs, sums up to 32) and only the block totals go
    through `cumsum`.
    """
    return _running_sum(ops.cast(flags, "int32"))


def _running_sum(values):
    """`cumsum` of a 1-D int32 of values in [0, 256], as `prefix_count` computes
    it. Exact even where matmul inputs are rounded to bfloat16 or TF32 (GPU
    and TPU defaults): every input and product is a small integer, and block
    sums stay far below 2**24."""
    n = values.shape[0]
    if n is None or n <= _BLOCK:
        return ops.cumsum(values)
    rows = -(-n // _BLOCK)
    blocks = ops.reshape(
        ops.pad(ops.cast(values, "float32"), [(0, rows * _BLOCK - n)]), (rows, _BLOCK)
    )
    inner = ops.cast(ops.matmul(blocks, ops.triu(ops.ones((_BLOCK, _BLOCK), "float32"))), "int32")
    offsets = ops.cumsum(inner[:, -1]) - inner[:, -1]
    return ops.reshape(inner + ops.expand_dims(offsets, -1), (-1,))[:n]


_BRACKET_MIN = 1 << 18  # `select_smallest` brackets from a sample from this many entries


def select_smallest(keys, valid, count):
    """Selects exactly `count` `valid` entries with the smallest int32 `keys`.

    Keys must be non-negative. Ties are broken by position (earlier first).
    A bisection over the key range (at most 31 counting passes; it stops as
    soon as a threshold admits exactly `count`, which distinct values reach
    in fewer), then a running count over the ties at the threshold only if
    some of them must be left out: O(n) work, no sort. `count` must not
    exceed the number of valid entries.

    From `2**18` entries a strided sample first brackets the threshold: the
    entries below the bracket are taken, the few inside it are compacted
    (`compact_positions`) and the bisection runs on them alone, so the whole
    array is read about five times instead of up to 31 (3-4x faster for 24 M
    entries). Same result: should the sample mislead (large ties), the full
    bisection runs instead.
    """
    n = keys.shape[0]
    if n is None or n < _BRACKET_MIN:
        return _bisect_smallest(keys, valid, count)
    count = ops.cast(count, "int32")
    keys = ops.where(valid, keys, _INT_MAX)
    stride = max(1, n // _SAMPLE) | 1
    at = np.arange(0, n, stride)
    sample = ops.sort(ops.take(keys, at))
    # Rank of the threshold in the sample, give or take four standard deviations.
    expected = ops.cast(count, "float32") * (len(at) / n)
    margin = 4 * ops.sqrt(expected) + 8
    low_rank = ops.cast(expected - margin, "int32")
    high_rank = ops.cast(expected + margin, "int32")
    low = ops.where(low_rank <= 0, 0, ops.take(sample, ops.clip(low_rank, 0, len(at) - 1)))
    high = ops.where(
        high_rank >= len(at), _INT_MAX, ops.take(sample, ops.clip(high_rank, 0, len(at) - 1))
    )
    below = ops.logical_and(valid, keys < low)
    inside = ops.logical_and(valid, ops.logical_and(keys >= low, keys <= high))
    # About 2 * margin * stride entries lie inside; room for three times the widest.
    capacity = min(n, int(3 * (8 * math.sqrt(len(at)) + 16) * stride))
    positions, found = compact_positions(inside, capacity)
    taken = _count(below)
    bracketed = ops.logical_and(
        ops.logical_and(taken <= count, count <= taken + found), found <= capacity
    )

    def from_bracket():
        slots = ops.arange(capacity, dtype="int32") < found
        chosen = _bisect_smallest(
            ops.take(keys, ops.minimum(positions, n - 1)), slots, count - taken
        )
        where = ops.expand_dims(ops.where(chosen, positions, n), -1)
        marks = ops.scatter(where, ops.ones((capacity,), "int32"), (n + 1,))[:n]
        return ops.logical_or(below, marks > 0)

    return ops.cond(bracketed, from_bracket, lambda: _bisect_smallest(keys, valid, count))


def _bisect_smallest(keys, valid, count):
    """`select_smallest` by bisection over the whole key range."""
    count = ops.cast(count, "int32")
    keys = ops.where(valid, keys, _INT_MAX)

    def searching(low, high, exact):
        return ops.logical_and(low < high, ops.logical_not(exact))

    def halve(low, high, exact):
        middle = low + (high - low) // 2
        admitted = _count(keys <= middle)
        enough = admitted >= count
        return (
            ops.where(enough, low, middle + 1),
            ops.where(enough, middle, high),
            admitted == count,
        )

    zero = ops.convert_to_tensor(0, "int32")
    low, high, exact = ops.while_loop(searching, halve, (zero, zero + _INT_MAX, count == 0))
    # `exact`: the keys <= high are the answer; else `low` is the smallest key
    # admitting `count`, and ties at it are ranked by position.
    low = ops.where(count == 0, 0, ops.where(exact, high + 1, low))
    below = ops.logical_and(valid, keys < low)
    need = count - _count(below)
    at = ops.logical_and(valid, keys == low)
    chosen = ops.cond(
        _count(at) <= need,
        lambda: at,
        lambda: ops.logical_and(at, prefix_count(at) <= need),
    )
    return ops.logical_or(below, chosen)


def magnitude_keys(values):
    """int32 keys ordering `|values|` (IEEE bits of a non-negative float are monotonic)."""
    return ops.view(ops.abs(ops.cast(values, "float32")), "int32")


def set_drop(values, zeta, valid=None):
    """SET's removal over the kept `values`: the fraction `zeta` of the positive
    ones closest to zero and of the negative ones closest to zero.

    Exact zeros count as positive. `valid` (optional boolean) leaves the other
    entries out (empty slots). Returns a boolean over the values.
    """
    keys = magnitude_keys(values)
    positive = values >= 0
    negative = ops.logical_not(positive)
    if valid is not None:
        positive = ops.logical_and(positive, valid)
        negative = ops.logical_and(negative, valid)
    n_pos = ops.floor(zeta * ops.cast(_count(positive), "float32"))
    n_neg = ops.floor(zeta * ops.cast(_count(negative), "float32"))
    return ops.logical_or(
        select_smallest(keys, positive, n_pos), select_smallest(keys, negative, n_neg)
    )


def dropped_positions(indices, drop, k_max: int, fill):
    """The positions `indices[drop]` in rank order, padded to `k_max` with `fill`.

    With `fill` out of range (the array size), the padding is skipped by the
    scatters of `random_empty_positions` and `rewire` under XLA.
    """
    rank = prefix_count(drop) - 1
    slot = ops.expand_dims(ops.where(drop, rank, k_max), -1)
    dropped = ops.scatter(slot, ops.where(drop, indices, 0), (k_max + 1,))[:k_max]
    return ops.where(ops.arange(k_max, dtype="int32") <= rank[-1], dropped, fill)


def dropped_marker(n_candidates: int) -> int:
    """The mark of a dropped position in `random_empty_positions`' hit counts:
    a power of two above any count of hits (`n_candidates`), so that hits and a
    mark add up in one int32 without ambiguity."""
    marker = 1 << max(1, int(n_candidates)).bit_length()
    if 2 * marker > _INT_MAX:
        raise ValueError(
            "Too many regrowth candidates for int32 hit counts. "
            f"Received: n_candidates={n_candidates}"
        )
    return marker


def random_empty_positions(mask, candidates, count, k_max: int, dropped=None, allowed=None):
    """`count` distinct empty positions from random `candidates`, in rank order.

    Candidates (uniform random ints in `[0, len(mask))`) that hit a kept
    position, or appear more than once, are rejected; the first `count` of the
    rest are taken, so the result is a uniform sample of empty positions.
    Positions in `dropped` (from `dropped_positions`), about to be removed,
    count as empty. `allowed` (optional, boolean like `candidates`) rejects
    the candidates where no connection may exist. Returns `(positions,
    enough)`: `positions` has `k_max` entries of which the first `count` are
    valid; `enough` is False if too few candidates survived (the caller then
    draws again).
    """
    # One int32 buffer counts candidate hits (units) and marks dropped
    # positions (+marker), so both tests cost a single scatter and gather. A
    # position is hit at most once per candidate: a marker above the number of
    # candidates can never be confused with hits.
    marker = dropped_marker(candidates.shape[0])
    marks = ops.ones(ops.shape(candidates), "int32")
    where, what = candidates, marks
    if dropped is not None:
        where = ops.concatenate([candidates, dropped])
        what = ops.concatenate([marks, ops.full(ops.shape(dropped), marker, "int32")])
    hits = ops.take(ops.scatter(ops.expand_dims(where, -1), what, ops.shape(mask)), candidates)
    empty = ops.logical_or(ops.take(mask, candidates) == 0, hits >= marker)
    valid = ops.logical_and(empty, hits % marker == 1)
    if allowed is not None:
        valid = ops.logical_and(valid, allowed)
    rank = prefix_count(valid)
    chosen = ops.logical_and(valid, rank <= ops.cast(count, "int32"))
    slot = ops.where(chosen, rank - 1, k_max)
    positions = ops.scatter(
        ops.expand_dims(slot, -1), ops.where(chosen, candidates, 0), (k_max + 1,)
    )
    return positions[:k_max], rank[-1] >= ops.cast(count, "int32")


_SAMPLE = 16384  # entries sampled to bracket the growth threshold
_GROUP = 16  # compaction groups: counted per group, then ranked inside one
# Each entry of a group adds its weight when True: the sum holds the group's
# count (low `_COUNT_BITS` bits: 0 to _GROUP) and its flags as bits (above
# them), in one int32 reduction. The flags are read as two bytes (`_SELECT8`),
# which is what fixes `_GROUP` at 16.
_COUNT_BITS = _GROUP.bit_length()
_PACK = np.array([1 + (1 << (_COUNT_BITS + j)) for j in range(_GROUP)], "int32")
# Byte tables: `_POP8[b]` set bits of b; `_SELECT8[8 * b + r]` the place of
# its (r + 1)-th set bit.
_POP8 = np.array([bin(b).count("1") for b in range(256)], "int32")
_SELECT8 = np.array(
    [([j for j in range(8) if b >> j & 1] + [0] * 8)[r] for b in range(256) for r in range(8)],
    "int32",
)


def compact_positions(flags, capacity: int):
    """Positions of the True entries of a 1-D boolean, in order, in `capacity` slots.

    Returns `(positions, total)`: `total` counts the True entries; slots past
    it hold `len(flags)`, and True entries past the first `capacity` are left
    out. Work is one pass over `flags` plus O(capacity), not a running count
    over every entry: each group of 16 entries is reduced to its count and
    its flags as bits, each slot finds its group from a histogram of the
    group starts, then its entry among the group's bits (byte tables).
    """
    n = flags.shape[0]
    groups = -(-n // _GROUP)
    table = ops.reshape(ops.pad(flags, [(0, groups * _GROUP - n)]), (groups, _GROUP))
    packed = ops.sum(ops.where(table, _PACK, 0), axis=1)
    counts, bits = packed % (1 << _COUNT_BITS), packed // (1 << _COUNT_BITS)
    ends = _running_sum(counts)
    starts = ends - counts
    # Slot s lies in the last group starting at or before s: the number of
    # group starts <= s, less one.
    histogram = ops.scatter(
        ops.expand_dims(ops.minimum(starts, capacity), -1), ops.ones_like(starts), (capacity + 1,)
    )
    group = ops.minimum(ops.cumsum(histogram[:capacity]) - 1, groups - 1)
    slots = ops.arange(capacity, dtype="int32")
    rank = slots - ops.take(starts, group)  # in [0, 16) for the slots before `total`
    word = ops.take(bits, group)
    low = ops.take(_POP8, word % 256)
    high = rank >= low
    byte = ops.where(high, word // 256, word % 256)
    rank = ops.clip(ops.where(high, rank - low, rank), 0, 7)
    inside = ops.take(_SELECT8, 8 * byte + rank) + ops.where(high, 8, 0)
    total = ends[-1]
    return ops.where(slots < total, group * _GROUP + inside, n), total


def largest_empty_positions(mask, scores, count, k_max: int, exact: bool = False):
    """The `count` empty positions of flat `mask` with the largest `scores` (>= 0).

    Exact, ties broken by position (earlier first). Returns
    `(positions, bracketed)`: `positions` is int32 `(k_max,)`, the chosen
    positions in increasing order, then `len(mask)` in the slots past `count`
    (`count <= k_max`, and at most the number of empty positions);
    `bracketed` is a boolean scalar, False when the result is not to be used
    and the call must be repeated with `exact=True`.

    A threshold bracketing the answer is read from a strided sample of the
    scores, the few empty positions above it are compacted
    (`compact_positions`) and the exact selection runs on them
    (`select_smallest`): about 4x faster than a `top_k` of the whole array on
    CPU. Should the sample mislead (heavily tied or adversarially ordered
    scores), `bracketed` is False. `exact=True` runs that `top_k` instead
    (`bracketed` is then always True). The choice is left to the caller, not
    made by an `ops.cond` here: a conditional would keep the whole-array
    branch's operands alive, which costs more than the rare second call.
    """
    n = scores.shape[0]
    count = ops.cast(count, "int32")
    scores = ops.cast(scores, "float32")
    empty = mask == 0
    if exact:
        _, best = ops.top_k(ops.where(empty, scores, _NEG), k_max, sorted=True)
        best = ops.where(ops.arange(k_max, dtype="int32") < count, ops.cast(best, "int32"), n)
        return ops.sort(best), ops.convert_to_tensor(True)
    stride = max(1, n // _SAMPLE) | 1
    at = np.arange(0, n, stride)
    sample = ops.where(ops.take(empty, at), ops.take(scores, at), _NEG)
    # Keep about count * len(at) / n sampled scores, plus four standard
    # deviations and a margin, above the threshold.
    expected = len(at) * k_max / n
    ranks = min(len(at), int(expected + 4 * math.sqrt(expected)) + 8)
    top = ops.top_k(sample, ranks, sorted=True)[0]
    share = ops.cast(count, "float32") * (len(at) / n)
    rank = ops.cast(share + 4 * ops.sqrt(share), "int32") + 8
    threshold = ops.take(top, ops.minimum(rank, ranks - 1))
    above = ops.logical_and(empty, scores >= threshold)
    # About count + (4 sqrt(count / stride) + 8) * stride entries lie above the
    # threshold, give or take sqrt(count * stride): room for three more of those.
    capacity = min(n, k_max + int(7 * math.sqrt(k_max * stride)) + 16 * stride)
    positions, found = compact_positions(above, capacity)
    valid = ops.arange(capacity, dtype="int32") < found
    # Unused slots hold `n`: read any score there, `valid` leaves them out.
    keys = _INT_MAX - magnitude_keys(ops.take(scores, ops.minimum(positions, n - 1)))
    chosen = select_smallest(keys, valid, ops.minimum(count, found))
    bracketed = ops.logical_and(found >= count, found <= capacity)
    return dropped_positions(positions, chosen, k_max, n), bracketed


def rewire(state, indices, drop, grown, grown_values=None, dropped=None):
    """Applies a drop-and-grow to flat `[kernel, mask, *slots]`.

    Args:
        state: Flat arrays: kernel, mask, then optimizer slots shaped like the
            kernel (momenta, Adam moments).
        indices: int32 (nnz,) kept positions before the change.
        drop: bool (nnz,), the connections removed.
        grown: int32 (k_max,) positions to connect, in rank order: the r-th
            dropped connection is replaced by `grown[r]`. They must be empty
            once the dropped ones are removed (a just-dropped position may be
            regrown). At least as many as dropped.
        grown_values: Optional initial values of grown weights, by rank
            (zeros when None).
        dropped: Optional `dropped_positions(indices, drop, k_max, size)`,
            if the caller has it already.

    Returns:
        `(new_state, new_indices)`. Dropped and grown positions get zero
        optimizer state; the number of connections is kept. Only the changed
        positions are written, as scatters on the inputs, so a donating or
        aliasing compiler updates the arrays in place in O(changes). Unused
        write slots carry an out-of-range position, which XLA's scatter skips:
        run it compiled (`_runtime.compile_function` / `compile_update`).
    """
    kernel, mask, *slots = state
    size = ops.shape(kernel)[0]
    k_max = ops.shape(grown)[0]
    rank = prefix_count(drop) - 1
    count = rank[-1] + 1
    new_indices = ops.where(drop, ops.take(grown, ops.maximum(rank, 0)), indices)
    # Write slots past `count` point out of range.
    if dropped is None:
        dropped = dropped_positions(indices, drop, k_max, size)
    dropped = ops.expand_dims(dropped, -1)
    grown = ops.expand_dims(ops.where(ops.arange(k_max, dtype="int32") < count, grown, size), -1)

    def write(array, grown_value):
        # Two writes in order: a regrown position may also be a dropped one.
        zeros = ops.zeros((k_max,), array.dtype)
        array = ops.scatter_update(array, dropped, zeros)
        if grown_value is None:
            return ops.scatter_update(array, grown, zeros)
        return ops.scatter_update(
            array, grown, ops.broadcast_to(ops.cast(grown_value, array.dtype), (k_max,))
        )

    start = 0.0 if grown_values is None else grown_values[:k_max]
    new_state = [write(kernel, start), write(mask, 1.0), *(write(s, None) for s in slots)]
    return new_state, new_indices


def random_indices(seed, count: int, shape):
    """`count` uniform random `(rows, cols)` of a `shape` matrix (int32; positions
    may repeat), from a `(2,)` int32 `seed` tensor."""
    rows = stateless_randint(seed, (count,), int(shape[0]))
    cols = stateless_randint(seed + np.array([0x2545F491, 0], "int32"), (count,), int(shape[1]))
    return rows, cols


TABLE_CAP = 1 << 30  # buckets of the largest membership table (int32: 4 GB)


def membership_table_size(shape, entries: int) -> int:
    """Buckets of `empty_candidates`' table for `entries` marks: the positions
    themselves (exact) when there are no more of them than a hash table would
    need, else the power of two >= 4 * entries (at most `TABLE_CAP`). A
    quarter full, a bucket is free of other entries with probability ~0.78."""
    size = int(shape[0]) * int(shape[1])
    hashed = min(TABLE_CAP, 1 << max(10, (4 * int(entries) - 1).bit_length()))
    return size if size <= hashed else hashed


def acceptance(shape, entries: int) -> float:
    """Expected share of random candidates that `empty_candidates` does not refuse
    for sharing a bucket (before the test for kept positions): 1 for an exact
    table, `exp(-entries / buckets)` for a hashed one."""
    table = membership_table_size(shape, entries)
    if table == int(shape[0]) * int(shape[1]):
        return 1.0
    return math.exp(-entries / table)


def _buckets(rows, cols, shape, table: int, salt):
    """Bucket of each `(rows, cols)`: its flat position when `table` holds every
    position, else a salted int32 hash (multiply-xorshift; wrap-around intended)."""
    n_out = int(shape[1])
    if table == int(shape[0]) * n_out:
        return rows * n_out + cols
    h = rows * np.int32(-1640531535) + cols  # 0x9E3779B1
    h = ops.bitwise_xor(h, salt)
    h = ops.bitwise_xor(h, ops.right_shift(h, 15)) * np.int32(-2048144789)  # 0x85EBCA6B
    h = ops.bitwise_xor(h, ops.right_shift(h, 13)) * np.int32(-1028477387)  # 0xC2B2AE35
    h = ops.bitwise_xor(h, ops.right_shift(h, 16))
    return ops.bitwise_and(h, table - 1)


def empty_candidates(rows, cols, kept, candidates, shape, salt):
    """Which random `candidates` may be grown, without a dense array.

    Args:
        rows, cols: int32 `(nnz,)` positions of the storage's slots.
        kept: Boolean `(nnz,)`: the slots counted as occupied (parked slots
            and, for SET, the dropped ones are not).
        candidates: `(rows, cols)` int32 positions (`random_indices`).
        shape: `(n_in, n_out)`.
        salt: int32 scalar varying the hash per call.

    Returns a boolean over the candidates: True where no kept slot and no
    other candidate holds its bucket. Candidates and kept positions are
    counted in one table of int32 buckets (`membership_table_size`). Where
    the table has a bucket per position the test is exact. For larger layers
    the buckets are a salted hash: a candidate sharing a bucket with a kept
    position or another candidate is refused too (never is a kept or repeated
    position accepted, so the connection list stays valid). Those refusals
    fall on a random fifth or so of the empty positions (more at the bucket
    cap, `TABLE_CAP`), redrawn with the salt at every call, so every empty position
    is equally likely to be accepted: uniform in distribution, not exactly
    per call.
    """
    cand_rows, cand_cols = candidates
    n = cand_rows.shape[0]
    table = membership_table_size(shape, rows.shape[0] + n)
    marker = dropped_marker(n)
    where = ops.concatenate(
        [
            _buckets(cand_rows, cand_cols, shape, table, salt),
            _buckets(rows, cols, shape, table, salt),
        ]
    )
    what = ops.concatenate([ops.ones((n,), "int32"), ops.where(kept, marker, 0)])
    counts = ops.scatter(ops.expand_dims(where, -1), what, (table,))
    return ops.take(counts, where[:n]) == 1


def compact_chosen(chosen, candidates, k_max: int):
    """The `(rows, cols)` of the True entries of `chosen` (at most `k_max`), in order,
    padded to `k_max` with zeros."""
    rank = prefix_count(chosen)
    slot = ops.expand_dims(ops.where(chosen, rank - 1, k_max), -1)
    return tuple(
        ops.scatter(slot, ops.where(chosen, c, 0), (k_max + 1,))[:k_max] for c in candidates
    )


def random_empty_indices(
    rows, cols, kept, candidates, count, k_max: int, shape, salt, allowed=None
):
    """The first `count` (at most `k_max`) acceptable random `candidates`
    (`empty_candidates`, and `allowed` where given), in rank order: the sparse
    storage's `random_empty_positions`. Returns `(grown_rows, grown_cols,
    enough)`; `enough` is False when too few candidates survived.
    """
    valid = empty_candidates(rows, cols, kept, candidates, shape, salt)
    if allowed is not None:
        valid = ops.logical_and(valid, allowed)
    rank = prefix_count(valid)
    chosen = ops.logical_and(valid, rank <= ops.cast(count, "int32"))
    grown_rows, grown_cols = compact_chosen(chosen, candidates, k_max)
    return grown_rows, grown_cols, rank[-1] >= ops.cast(count, "int32")


def rewire_slots(state, drop, grown_rows, grown_cols, grown_values=None):
    """Applies a drop-and-grow to the sparse storage `[values, rows, cols, *slots]`.

    The r-th dropped slot (in slot order) takes `(grown_rows[r], grown_cols[r])`,
    starting at `grown_values[r]` (zero when None) with zero optimizer state.
    O(nnz): every array is rewritten with one select.
    """
    rank = ops.maximum(prefix_count(drop) - 1, 0)
    start = None if grown_values is None else ops.take(grown_values, rank)
    return write_slots(state, drop, ops.take(grown_rows, rank), ops.take(grown_cols, rank), start)


def per_dropped_slot(grown_values, drop):
    """`grown_values[r]` at the r-th dropped slot (slot order), for every slot."""
    return ops.take(grown_values, ops.maximum(prefix_count(drop) - 1, 0))


def write_slots(state, drop, rows_at, cols_at, start_at=None):
    """`[values, rows, cols, *slots]` with every `drop` slot moved to `(rows_at,
    cols_at)` (per slot), starting at `start_at` (per slot; zero when None)
    with zero optimizer state."""
    values, rows, cols, *slots = state
    start = 0.0 if start_at is None else start_at
    return [
        ops.where(drop, ops.cast(start, values.dtype), values),
        ops.where(drop, ops.cast(rows_at, rows.dtype), rows),
        ops.where(drop, ops.cast(cols_at, cols.dtype), cols),
        *(ops.where(drop, ops.zeros_like(s), s) for s in slots),
    ]


def remove(state, drop):
    """Removes the connections `drop` (boolean over the flat kernel) from flat
    `[kernel, mask, *slots]`, without regrowth: their weight, mask and optimizer
    state become zero. Selects, not products: a removed entry is zero whatever
    it held (NaN included)."""
    kernel, mask, *slots = state
    keep = ops.where(drop, ops.zeros_like(mask), mask)
    new_state = [ops.where(keep > 0, x, ops.zeros_like(x)) for x in (kernel, *slots)]
    new_state.insert(1, keep)
    return new_state


def remove_slots(n_in: int, state, drop):
    """`remove` on the sparse storage `[values, rows, cols, *slots]`: the removed
    connections' slots are parked (row `n_in`, value and optimizer state zero)."""
    values, rows, cols, *slots = state
    return [
        ops.where(drop, ops.zeros_like(values), values),
        ops.where(drop, n_in, rows),
        ops.where(drop, ops.zeros_like(cols), cols),
        *(ops.where(drop, ops.zeros_like(s), s) for s in slots),
    ]


def connection_list_is_current(mask, indices):
    """True when `indices` are exactly the kept positions of flat `mask`."""
    nnz = ops.shape(indices)[0]
    return ops.logical_and(ops.sum(ops.take(mask, indices)) == nnz, ops.sum(mask) == nnz)
