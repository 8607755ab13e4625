"""N:M groups of a sparse kernel, in `keras.ops`: what keeps a pattern N:M
through pruning and drop-and-grow.

A kernel matrix `(fan_in, n_out)` is cut into groups of `m` consecutive rows
of one column (`m` consecutive inputs of one output); flat position
`p = row * n_out + col` lies in group `(row // m) * n_out + col`. Every
function works on the flat, row-major kernel (`fan_in * n_out` entries) seen
as `(fan_in // m, m, n_out)`: the group's members are its middle axis. They
are shape-static and run inside compiled rewiring steps.
"""

from __future__ import annotations

from keras import ops

from keras_sparse_moe.ops import rewiring

__all__ = [
    "cap_drops",
    "group_count",
    "group_rank",
    "grow_in_groups",
    "keep_largest",
    "per_position",
    "scatter_flags",
    "scatter_values",
]


def _grouped(flat, shape, m):
    fan_in, n_out = shape
    return ops.reshape(flat, (fan_in // m, m, n_out))


def group_rank(scores, eligible, shape, m: int):
    """Each eligible entry's rank (0 = largest score) among the eligible entries of
    its group, ties broken by position (earlier first); `m` where not eligible.

    `scores` and `eligible` are flat over the kernel. `m` passes over the
    kernel, each comparing every member with one other: O(m * fan_in * n_out).
    """
    scores = _grouped(ops.cast(scores, "float32"), shape, m)
    eligible = _grouped(eligible, shape, m)
    member = ops.reshape(ops.arange(m, dtype="int32"), (1, m, 1))
    rank = ops.zeros(ops.shape(scores), "int32")
    for j in range(m):
        other, counted = scores[:, j : j + 1, :], eligible[:, j : j + 1, :]
        ahead = ops.logical_or(other > scores, ops.logical_and(other == scores, j < member))
        rank = rank + ops.cast(ops.logical_and(counted, ahead), "int32")
    return ops.reshape(ops.where(eligible, rank, m), (-1,))


def scatter_flags(positions, flags, size: int):
    """A flat boolean of `size` entries, True at the `positions` whose flag is set
    (positions at or past `size`, such as parked slots, are ignored)."""
    where = ops.where(ops.logical_and(flags, positions < size), positions, size)
    marks = ops.scatter(ops.expand_dims(where, -1), ops.ones_like(where), (size + 1,))
    return marks[:size] > 0


def group_count(flags, shape, m: int):
    """int32 `(fan_in // m, 1, n_out)`: the True entries of flat `flags` in each group."""
    return ops.sum(ops.cast(_grouped(flags, shape, m), "int32"), axis=1, keepdims=True)


def per_position(per_group, shape, m: int):
    """A per-group array `(fan_in // m, 1, n_out)` read at every flat position."""
    fan_in, n_out = shape
    return ops.reshape(ops.broadcast_to(per_group, (fan_in // m, m, n_out)), (-1,))


def scatter_values(positions, values, flags, size: int):
    """A flat float32 array of `size` entries: `values` at the `positions` whose
    flag is set, zero elsewhere."""
    where = ops.where(ops.logical_and(flags, positions < size), positions, size)
    dense = ops.scatter(ops.expand_dims(where, -1), ops.cast(values, "float32"), (size + 1,))
    return dense[:size]


def _at(flat_array, positions, size):
    """`flat_array` read at `positions` (False/0 past the end: parked slots)."""
    return ops.logical_and(positions < size, ops.take(flat_array, ops.minimum(positions, size - 1)))


def keep_largest(values, active, positions, occupied, shape, m: int, keep: int):
    """The entries to remove so that each group keeps its `keep` largest `|values|`
    (fewer where it holds fewer): a boolean over the entries."""
    size = int(shape[0]) * int(shape[1])
    magnitudes = scatter_values(positions, ops.abs(values), active, size)
    surplus = group_rank(magnitudes, occupied, shape, m) >= keep
    return ops.logical_and(active, _at(ops.logical_and(occupied, surplus), positions, size))


def cap_drops(drop, values, positions, occupied, shape, m: int):
    """`drop` (a boolean over the entries) without the drops a group cannot regrow
    from the positions empty before it: each group keeps dropping its
    smallest magnitudes, at most as many as it has empty positions."""
    size = int(shape[0]) * int(shape[1])
    dropped = scatter_flags(positions, drop, size)
    room = per_position(group_count(ops.logical_not(occupied), shape, m), shape, m)
    smallness = -scatter_values(positions, ops.abs(values), drop, size)
    kept = group_rank(smallness, dropped, shape, m) < room
    return ops.logical_and(drop, _at(ops.logical_and(dropped, kept), positions, size))


def grow_in_groups(drop, positions, occupied, scores, shape, m: int, k_max: int, regrow_dropped):
    """Flat positions to grow, as many in each group as `drop` empties there: the
    group's empty positions with the largest `scores` (the dropped ones count as
    empty with `regrow_dropped`). int32 `(k_max,)`, increasing, padded with the
    kernel's size; `drop` must leave each group enough of them (`cap_drops`)."""
    size = int(shape[0]) * int(shape[1])
    dropped = scatter_flags(positions, drop, size)
    eligible = ops.logical_not(occupied)
    if regrow_dropped:
        eligible = ops.logical_or(eligible, dropped)
    wanted = per_position(group_count(dropped, shape, m), shape, m)
    grow = ops.logical_and(eligible, group_rank(scores, eligible, shape, m) < wanted)
    return rewiring.compact_positions(grow, k_max)[0]
