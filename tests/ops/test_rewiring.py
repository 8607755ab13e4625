"""Drop/grow primitives against numpy references, compiled as the callbacks use them."""

import numpy as np
import pytest

from keras_sparse_moe import _runtime
from keras_sparse_moe.ops import rewiring
from tests.test_case import to_numpy

RNG = np.random.default_rng(0)


def _compiled(fn):
    return _runtime.compile_function(fn)


@pytest.mark.parametrize(
    "size, key_range, count",
    [
        (30, 10, 0),  # many ties, fewer than 32 entries (plain running count)
        (30, 10, 1),
        (60, 10, 7),  # blocked running count from here
        (60, 10, 30),
        (3001, 40, 500),  # ties ranked by the blocked prefix count
        (3001, 40, 1999),
        (3001, 10**6, 1),  # distinct keys: the bisection stops at an exact count
        (3001, 10**6, 500),
        # From 2**18 entries a sample brackets the threshold first.
        (300_000, 10**9, 0),
        (300_000, 10**9, 90_000),
        (300_000, 10**9, 209_000),
        (300_000, 50, 100_000),  # huge ties: the sample cannot bracket, bisection runs
        (300_000, 5000, 12_345),
    ],
)
def test_select_smallest_matches_stable_argsort(size, key_range, count):
    keys = RNG.integers(0, key_range, size).astype("int32")
    valid = RNG.random(size) < 0.7
    picked = to_numpy(
        _compiled(lambda k, v, c: rewiring.select_smallest(k, v, c))(keys, valid, count)
    )
    candidates = np.flatnonzero(valid)
    expected = np.zeros(size, bool)
    expected[candidates[np.argsort(keys[candidates], kind="stable")][:count]] = True
    np.testing.assert_array_equal(picked, expected)


@pytest.mark.parametrize("n", [1, 31, 32, 33, 1000, 40961, 2**20 + 3])
def test_prefix_count_matches_cumsum(n):
    flags = RNG.random(n) < 0.4
    counted = to_numpy(_compiled(rewiring.prefix_count)(flags))
    np.testing.assert_array_equal(counted, np.cumsum(flags))
    assert counted.dtype == np.int32


def test_magnitude_keys_order_like_absolute_values():
    values = np.array([0.0, -0.0, 1e-30, -2.5, 3.0, -1e-3, np.inf], "float32")
    keys = to_numpy(_compiled(rewiring.magnitude_keys)(values))
    np.testing.assert_array_equal(
        np.argsort(keys, kind="stable"), np.argsort(np.abs(values), kind="stable")
    )


def test_set_drop_removes_smallest_positive_and_largest_negative():
    values = RNG.standard_normal(400).astype("float32")
    values[:5] = 0.0  # exact zeros count as the smallest positives
    zeta = 0.3
    drop = to_numpy(_compiled(lambda v: rewiring.set_drop(v, zeta))(values))
    pos, neg = np.flatnonzero(values >= 0), np.flatnonzero(values < 0)
    expected = np.zeros(400, bool)
    expected[pos[np.argsort(values[pos], kind="stable")][: int(zeta * len(pos))]] = True
    expected[neg[np.argsort(-values[neg], kind="stable")][: int(zeta * len(neg))]] = True
    np.testing.assert_array_equal(drop, expected)


def test_random_empty_positions_are_distinct_empty_and_in_candidate_order():
    mask = (RNG.random(500) < 0.3).astype("float32")
    candidates = RNG.integers(0, 500, 200).astype("int32")
    positions, enough = _compiled(lambda m, c: rewiring.random_empty_positions(m, c, 40, 64))(
        mask, candidates
    )
    positions = to_numpy(positions)[:40]
    values, counts = np.unique(candidates, return_counts=True)
    unique = set(values[counts == 1])
    expected = [c for c in candidates if mask[c] == 0 and c in unique][:40]
    np.testing.assert_array_equal(positions, expected)
    assert bool(to_numpy(enough))
    _, enough = _compiled(lambda m, c: rewiring.random_empty_positions(m, c, 64, 64))(
        mask, candidates[:10]
    )
    assert not bool(to_numpy(enough))


def test_dropped_positions_count_as_empty_for_regrowth():
    mask = np.zeros(50, "float32")
    mask[:10] = 1
    indices = np.arange(10, dtype="int32")
    drop = np.zeros(10, bool)
    drop[[2, 3]] = True
    candidates = np.array([0, 2, 3, 40, 41], "int32")
    fn = _compiled(
        lambda m, c, i, d: rewiring.random_empty_positions(
            m, c, 4, 5, rewiring.dropped_positions(i, d, 5, 50)
        )
    )
    positions, enough = fn(mask, candidates, indices, drop)
    np.testing.assert_array_equal(to_numpy(positions)[:4], [2, 3, 40, 41])
    assert bool(to_numpy(enough))


def test_a_kept_position_hit_many_times_is_never_regrown():
    # 1,025 candidates on one kept position: a fixed +1024 marker for dropped
    # positions would read 1,025 hits as "dropped, hit once".
    mask = np.zeros(5000, "float32")
    mask[[9, 30]] = 1
    candidates = np.array([9] * 1025 + [40, 41], "int32")
    fn = _compiled(
        lambda m, c, i, d: rewiring.random_empty_positions(
            m, c, 2, 2, rewiring.dropped_positions(i, d, 2, 5000)
        )
    )
    positions, enough = fn(mask, candidates, np.array([9, 30], "int32"), np.array([False, True]))
    np.testing.assert_array_equal(to_numpy(positions), [40, 41])
    assert bool(to_numpy(enough))
    assert rewiring.dropped_marker(1027) > 1027


def test_bit_packing_constants_fit_together():
    # compact_positions packs a group's count (0.._GROUP) under its _GROUP flags
    # in one int32 and reads the flags as two bytes.
    assert rewiring._GROUP == 16
    assert (1 << rewiring._COUNT_BITS) > rewiring._GROUP
    assert rewiring._COUNT_BITS + rewiring._GROUP <= 31
    flags = np.ones(64, bool)  # full groups: the count reaches _GROUP
    listed, total = _compiled(lambda f: rewiring.compact_positions(f, 64))(flags)
    np.testing.assert_array_equal(to_numpy(listed), np.arange(64))
    assert int(to_numpy(total)) == 64


def test_rewire_moves_connections_and_resets_state():
    mask = (RNG.random(100) < 0.4).astype("float32")
    kernel = (RNG.standard_normal(100) * mask).astype("float32")
    slot = (RNG.random(100) * mask).astype("float32")
    indices = np.flatnonzero(mask).astype("int32")
    drop = np.zeros(len(indices), bool)
    drop[[1, 4, 6]] = True
    grown = np.array([indices[4], *np.flatnonzero(mask == 0)[:2]], "int32")  # one regrown at once
    start = np.full(3, 7.0, "float32")
    fn = _compiled(lambda k, m, s, i, d, g, v: rewiring.rewire([k, m, s], i, d, g, v))
    (new_kernel, new_mask, new_slot), new_indices = fn(
        kernel, mask, slot, indices, drop, grown, start
    )
    new_kernel, new_mask, new_slot, new_indices = map(
        to_numpy, (new_kernel, new_mask, new_slot, new_indices)
    )
    expected_indices = indices.copy()
    expected_indices[drop] = grown
    np.testing.assert_array_equal(new_indices, expected_indices)
    np.testing.assert_array_equal(np.flatnonzero(new_mask), np.sort(expected_indices))
    assert new_mask.sum() == mask.sum()
    np.testing.assert_array_equal(new_kernel[grown], [7.0, 7.0, 7.0])
    gone = np.setdiff1d(indices[drop], grown)
    assert np.all(new_kernel[gone] == 0) and np.all(new_slot[gone] == 0)
    assert np.all(new_slot[grown] == 0)
    stay = indices[~drop]
    np.testing.assert_array_equal(new_kernel[stay], kernel[stay])
    np.testing.assert_array_equal(new_slot[stay], slot[stay])


def test_compile_update_writes_variables_in_place():
    import keras

    variables = [
        keras.Variable(np.arange(6, dtype="float32").reshape(2, 3)),
        keras.Variable(np.ones(4)),
    ]
    run = _runtime.compile_update(lambda state, k: ([state[0] * k, state[1] + k], state[0][0]))
    first = run(variables, 2.0)
    assert float(to_numpy(first)) == 0.0
    np.testing.assert_array_equal(to_numpy(variables[0]), np.arange(6).reshape(2, 3) * 2)
    np.testing.assert_array_equal(to_numpy(variables[1]), np.full(4, 3.0))
    run(variables, 1.0)  # the variables stay usable after an in-place update
    np.testing.assert_array_equal(to_numpy(variables[1]), np.full(4, 4.0))
    # Other variables of the same shapes: the same program, these variables updated.
    others = [keras.Variable(np.ones((2, 3))), keras.Variable(np.zeros(4))]
    run(others, 3.0)
    np.testing.assert_array_equal(to_numpy(others[0]), np.full((2, 3), 3.0))
    np.testing.assert_array_equal(to_numpy(variables[1]), np.full(4, 4.0))  # untouched


@pytest.mark.parametrize("dropped", [[], [0, 5]])
def test_rewire_writes_only_the_changed_positions(dropped):
    # More grow slots than drops: the spare slots must write nothing.
    mask = np.zeros(64, "float32")
    mask[:10] = 1
    kernel = (np.arange(64, dtype="float32") + 1) * mask
    slot = mask * 3.0
    indices = np.arange(10, dtype="int32")
    drop = np.isin(indices, dropped)
    grown = np.array([40, 41, 42, 43, 44, 45], "int32")
    fn = _compiled(lambda k, m, s, i, d, g: rewiring.rewire([k, m, s], i, d, g))
    (new_kernel, new_mask, new_slot), new_indices = map(
        lambda x: [to_numpy(v) for v in x] if isinstance(x, list) else to_numpy(x),
        fn(kernel, mask, slot, indices, drop, grown),
    )
    expected_mask = mask.copy()
    expected_mask[dropped] = 0
    expected_mask[grown[: len(dropped)]] = 1
    np.testing.assert_array_equal(new_mask, expected_mask)
    np.testing.assert_array_equal(new_kernel, kernel * (expected_mask * (np.arange(64) < 10)))
    np.testing.assert_array_equal(new_slot, slot * (expected_mask * (np.arange(64) < 10)))
    assert sorted(new_indices.tolist()) == np.flatnonzero(expected_mask).tolist()


@pytest.mark.parametrize(
    "n, density, capacity",
    [(1, 1.0, 4), (17, 0.5, 17), (1000, 0.02, 64), (40961, 0.3, 20000), (40961, 0.9, 500)],
)
def test_compact_positions_lists_true_entries_in_order(n, density, capacity):
    flags = RNG.random(n) < density
    listed, total = _compiled(lambda f: rewiring.compact_positions(f, capacity))(flags)
    expected = np.full(capacity, n)
    kept = np.flatnonzero(flags)[:capacity]
    expected[: len(kept)] = kept
    np.testing.assert_array_equal(to_numpy(listed), expected)
    assert int(to_numpy(total)) == flags.sum()


def _largest_empty_reference(mask, scores, count, k_max):
    empty = np.flatnonzero(mask == 0)
    best = empty[np.argsort(-scores[empty], kind="stable")][:count]
    expected = np.full(k_max, mask.size)
    expected[:count] = np.sort(best)
    return expected


def _largest_empty(mask, scores, count, k_max, exact):
    grown, bracketed = _compiled(
        lambda m, s, c: rewiring.largest_empty_positions(m, s, c, k_max, exact)
    )(mask, scores, np.int32(count))
    return to_numpy(grown), bool(to_numpy(bracketed))


@pytest.mark.parametrize(
    "shape, levels, rows, count, k_max, bracketed",
    [
        ((30, 40), None, True, 0, 50, True),
        ((30, 40), None, True, 1, 50, True),
        ((30, 40), None, True, 50, 50, True),
        ((300, 400), None, True, 3500, 3600, True),  # sampled threshold, then compaction
        ((300, 400), None, True, 700, 3600, True),
        ((300, 400), 5, True, 2000, 3600, True),  # a fifth of the scores tie at zero
        ((300, 400), 1000, True, 3000, 3600, True),  # ties at the threshold ranked by position
        ((300, 400), 5, False, 2000, 3600, False),  # heavy ties: no threshold brackets
    ],
)
def test_largest_empty_positions_match_stable_sort(shape, levels, rows, count, k_max, bracketed):
    size = int(np.prod(shape))
    mask = (RNG.random(size) < 0.1).astype("float32")
    if levels is None:
        scores = np.abs(RNG.standard_normal(size)).astype("float32")
    else:
        scores = RNG.integers(0, levels, size).astype("float32")
    if rows:  # row-structured magnitudes, like |x_i * delta_j| of a dense gradient
        scores *= np.repeat(RNG.random(shape[0]), shape[1]).astype("float32")
    expected = _largest_empty_reference(mask, scores, count, k_max)
    grown, found = _largest_empty(mask, scores, count, k_max, exact=False)
    assert found == bracketed
    if bracketed:
        np.testing.assert_array_equal(grown, expected)
    grown, found = _largest_empty(mask, scores, count, k_max, exact=True)
    assert found
    np.testing.assert_array_equal(grown, expected)


def test_largest_empty_positions_when_the_sample_misleads():
    # Large scores only where the strided sample never looks: not bracketed,
    # and the exact selection finds them.
    size = 200 * 300
    mask = np.zeros(size, "float32")
    scores = np.zeros(size, "float32")
    stride = max(1, size // 16384) | 1
    unseen = np.setdiff1d(np.arange(size), np.arange(0, size, stride))[:500]
    scores[unseen] = RNG.random(500).astype("float32") + 1.0
    assert not _largest_empty(mask, scores, 400, 400, exact=False)[1]
    grown, bracketed = _largest_empty(mask, scores, 400, 400, exact=True)
    assert bracketed
    np.testing.assert_array_equal(grown, _largest_empty_reference(mask, scores, 400, 400))


def test_connection_list_is_current_notices_changes():
    mask = (RNG.random(500) < 0.2).astype("float32")
    indices = np.flatnonzero(mask).astype("int32")
    current = _compiled(rewiring.connection_list_is_current)
    assert bool(to_numpy(current(mask, indices)))
    added = mask.copy()
    added[np.flatnonzero(mask == 0)[0]] = 1  # a connection made elsewhere
    assert not bool(to_numpy(current(added, indices)))
    moved = added.copy()
    moved[indices[3]] = 0  # as many connections, but a listed position is now empty
    assert not bool(to_numpy(current(moved, indices)))
