"""Topology builders and spectral metrics against exact counts and hand-computed graphs."""

import functools
import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from keras import ops

from keras_sparse_moe import topologies as T

sizes = st.integers(min_value=1, max_value=60)
seeds = st.integers(min_value=0, max_value=2**31 - 1)
FAST = settings(max_examples=40, deadline=None)


def _binary(mask, shape):
    assert mask.shape == shape
    assert mask.dtype == np.float32
    assert set(np.unique(mask)) <= {0.0, 1.0}


@FAST
@given(n_in=sizes, n_out=sizes, density=st.floats(0.01, 1.0), seed=seeds)
def test_erdos_renyi_exact_count_and_determinism(n_in, n_out, density, seed):
    mask = T.erdos_renyi(n_in, n_out, density=density, seed=seed)
    _binary(mask, (n_in, n_out))
    assert mask.sum() == max(1, round(density * n_in * n_out))
    np.testing.assert_array_equal(mask, T.erdos_renyi(n_in, n_out, density=density, seed=seed))


def test_erdos_renyi_epsilon_matches_set_formula():
    mask = T.erdos_renyi(784, 1000, epsilon=20, seed=3)
    expected = 20 * (784 + 1000) / (784 * 1000)
    assert mask.sum() == round(expected * 784 * 1000)
    assert not np.array_equal(mask, T.erdos_renyi(784, 1000, epsilon=20, seed=4))


@FAST
@given(n_in=sizes, n_out=st.integers(2, 60), data=st.data(), seed=seeds)
def test_random_regular_degrees_are_exact(n_in, n_out, data, seed):
    degree = data.draw(st.integers(1, n_out))
    mask = T.random_regular(n_in, n_out, degree=degree, seed=seed)
    _binary(mask, (n_in, n_out))
    assert np.all(mask.sum(axis=1) == degree)
    col = mask.sum(axis=0)
    assert col.max() - col.min() <= 1  # outputs balanced too: biregular
    assert col.sum() == n_in * degree
    np.testing.assert_array_equal(mask, T.random_regular(n_in, n_out, degree=degree, seed=seed))


def test_random_regular_is_random_not_circulant():
    a = T.random_regular(50, 50, degree=5, seed=0)
    b = T.random_regular(50, 50, degree=5, seed=1)
    assert not np.array_equal(a, b)
    rows = a.nonzero()[1].reshape(50, 5)
    offsets = {tuple(sorted((r - i) % 50)) for i, r in enumerate(rows)}
    assert len(offsets) > 1


@FAST
@given(n_in=sizes, n_out=st.integers(2, 60), data=st.data())
def test_circulant_topologies(n_in, n_out, data):
    degree = data.draw(st.integers(1, n_out))
    seed = data.draw(seeds)
    builders = (
        T.structured_regular,
        T.fibonacci,
        functools.partial(T.fibonacci, rescale="always"),
        functools.partial(T.pseudo_random_regular, seed=seed),
    )
    for builder in builders:
        mask = builder(n_in, n_out, degree=degree)
        _binary(mask, (n_in, n_out))
        assert np.all(mask.sum(axis=1) == degree)
        for i in range(n_in):  # row i is row 0 rotated by i
            np.testing.assert_array_equal(mask[i], np.roll(mask[0], i))
        if n_in == n_out:  # square circulant: every output has the same in-degree
            assert np.all(mask.sum(axis=0) == degree)


def test_structured_regular_spacing_and_fibonacci_offsets():
    row = T.structured_regular(1, 12, degree=4)[0]
    assert row.nonzero()[0].tolist() == [0, 3, 6, 9]
    # First 8 distinct Fibonacci numbers 0,1,2,3,5,8,13,21: below 100, seed 002
    # uses them as they are; `rescale="always"` stretches them by 100/22.
    fib = [0, 1, 2, 3, 5, 8, 13, 21]
    assert T.fibonacci(1, 100, degree=8)[0].nonzero()[0].tolist() == fib
    expected = [math.floor(f * 100 / 22) for f in fib]
    assert T.fibonacci(1, 100, degree=8, rescale="always")[0].nonzero()[0].tolist() == expected
    # They do not fit in a row of 20 (21 >= 20): rescaled, as "always" does.
    np.testing.assert_array_equal(
        T.fibonacci(1, 20, degree=8), T.fibonacci(1, 20, degree=8, rescale="always")
    )
    assert T.fibonacci(1, 22, degree=8)[0].nonzero()[0].tolist() == fib


def test_pseudo_random_regular_is_one_random_row_rotated():
    a = T.pseudo_random_regular(30, 40, degree=6, seed=4)
    np.testing.assert_array_equal(a, T.pseudo_random_regular(30, 40, degree=6, seed=4))
    assert not np.array_equal(a, T.pseudo_random_regular(30, 40, degree=6, seed=5))
    # Row 0 is a uniform draw: over many seeds every column is used about equally.
    counts = sum(T.pseudo_random_regular(1, 40, degree=6, seed=s)[0] for s in range(400))
    assert counts.min() > 30 and counts.max() < 90  # expected 60 each
    square = T.pseudo_random_regular(25, 25, density=0.2, seed=1)
    assert set(square.sum(axis=0).tolist()) == set(square.sum(axis=1).tolist()) == {5.0}


def test_degree_from_density():
    mask = T.random_regular(10, 20, density=0.25, seed=0)
    assert np.all(mask.sum(axis=1) == 5)


@FAST
@given(
    n=st.integers(8, 60),
    clusters=st.integers(1, 8),
    density=st.floats(0.05, 0.5),
    rewire=st.floats(0.0, 0.5),
    seed=seeds,
)
def test_small_world_split_between_and_inside_clusters(n, clusters, density, rewire, seed):
    mask = T.small_world(n, n, density=density, num_clusters=clusters, rewire=rewire, seed=seed)
    _binary(mask, (n, n))
    total = max(1, round(density * n * n))
    assert mask.sum() == total
    ids = T.cluster_ids(n, clusters)
    across = mask[ids[:, None] != ids[None, :]].sum()
    inside_capacity = int(np.sum(ids[:, None] == ids[None, :]))
    # The fraction `rewire` goes between clusters, plus whatever does not fit inside.
    expected = max(min(round(rewire * total), n * n - inside_capacity), total - inside_capacity)
    assert across == expected


def test_erk_densities_budget_and_saturation():
    shapes = [(784, 300), (300, 100), (100, 10)]
    densities = T.erk_densities(shapes, 0.1)
    sizes = np.array([np.prod(s) for s in shapes])
    assert np.isclose(np.dot(densities, sizes), 0.1 * sizes.sum())
    assert densities[-1] == 1.0  # the small output layer saturates
    # Unsaturated layers keep the ERK proportion (n_in + n_out) / (n_in * n_out).
    ratio = densities[0] / densities[1]
    assert np.isclose(ratio, (1084 / (784 * 300)) / (400 / (300 * 100)))
    conv = T.erk_densities([(3, 3, 64, 64), (1024, 1024)], 0.2)
    assert conv[0] > conv[1]


@example(dims=[14, 1, 1, 1], kernel=(), density=0.25)  # the floor of one decides
@settings(max_examples=200, deadline=None)
@given(
    dims=st.lists(st.integers(min_value=1, max_value=60), min_size=3, max_size=6),
    kernel=st.sampled_from([(), (3, 3)]),
    density=st.floats(min_value=0.01, max_value=1.0),
)
def test_erk_counts_hit_the_global_target_exactly(dims, kernel, density):
    shapes = [(*kernel, a, b) for a, b in zip(dims, dims[1:])]
    sizes = [int(np.prod(s)) for s in shapes]
    counts = T.erk_counts(shapes, density)
    target = round(density * sum(sizes))
    if target >= len(shapes):  # below one connection a layer, each still keeps one
        assert sum(counts) == target
    assert all(1 <= c <= n for c, n in zip(counts, sizes))
    # Each count is within one connection of its ERK share, give or take what the
    # floor of one connection added to layers whose share is below one (the other
    # layers pay for it: shapes [(14, 1), (1, 1), (1, 1)] at 0.25 can only be 2, 1, 1).
    shares = [d * n for d, n in zip(T.erk_densities(shapes, density), sizes)]
    raised = sum(1 - share for share in shares if share < 1)
    for count, share in zip(counts, shares):
        assert abs(count - share) < 1 + raised + 1e-9 or (count == 1 and share < 1)


def test_algebraic_connectivity_reference_graphs():
    # Complete bipartite K_{a,b}: Laplacian spectrum {0, a, b, a+b}: lambda_2 = min(a, b).
    assert T.algebraic_connectivity(np.ones((3, 5))) == pytest.approx(3.0)
    disconnected = np.zeros((4, 4))
    disconnected[:2, :2] = 1
    disconnected[2:, 2:] = 1
    assert T.algebraic_connectivity(disconnected) == pytest.approx(0.0, abs=1e-9)
    mask = T.erdos_renyi(20, 30, density=0.3, seed=0)
    full = np.block([[np.zeros((20, 20)), mask], [mask.T, np.zeros((30, 30))]])
    lap = np.diag(full.sum(1)) - full
    assert T.algebraic_connectivity(mask) == pytest.approx(np.sort(np.linalg.eigvalsh(lap))[1])


def test_spectral_gap_reference_graphs():
    assert T.spectral_gap(np.ones((3, 5))) == pytest.approx(math.sqrt(15))
    mask = T.random_regular(30, 30, degree=4, seed=1)
    full = np.block([[np.zeros((30, 30)), mask], [mask.T, np.zeros((30, 30))]])
    eig = np.sort(np.linalg.eigvalsh(full))[::-1]
    assert T.spectral_gap(mask) == pytest.approx(eig[0] - eig[1])
    # An expander beats a circulant of the same degree on the spectral gap.
    assert T.spectral_gap(T.random_regular(64, 64, degree=4, seed=0)) > T.spectral_gap(
        T.structured_regular(64, 64, degree=4)
    )


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: T.erdos_renyi(10, 10, density=1.5), ValueError, "density=1.5"),
        (lambda: T.erdos_renyi(10, 10, density=0.0), ValueError, "density=0.0"),
        (lambda: T.erdos_renyi(10, 10, density=0.1, epsilon=2), ValueError, "not both"),
        (lambda: T.erdos_renyi(10, 10, epsilon=20), ValueError, "epsilon <= 5"),
        (lambda: T.erdos_renyi(0, 10, density=0.1), ValueError, "n_in=0"),
        (lambda: T.erdos_renyi(10, 10, density=0.1, seed="a"), TypeError, "seed='a'"),
        (lambda: T.random_regular(10, 5, degree=6), ValueError, "degree=6"),
        (lambda: T.random_regular(10, 5), ValueError, "exactly one"),
        (lambda: T.structured_regular(10, 5, degree=1.5), TypeError, "degree=1.5"),
        (lambda: T.fibonacci(10, 5, degree=2, rescale="never"), ValueError, "rescale='never'"),
        (lambda: T.pseudo_random_regular(10, 5, degree=7, seed=0), ValueError, "degree=7"),
        (lambda: T.small_world(10, 10, 0.2, num_clusters=11), ValueError, "num_clusters=11"),
        (lambda: T.small_world(10, 10, 0.2, rewire=2.0), ValueError, "rewire=2.0"),
        (lambda: T.get("ring"), ValueError, "erdos_renyi"),
        (lambda: T.erk_densities([], 0.5), ValueError, "shapes"),
        (lambda: T.algebraic_connectivity(np.ones(3)), ValueError, "2-D"),
    ],
)
def test_invalid_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


# --------------------------------------------------------------------------- #
# BlockPattern: where connections may exist
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "blocks_shape, shape", [((3, 4), (7, 9)), ((3, 4), (3, 4)), ((2, 2), (10, 6))]
)
def test_block_pattern_dense_count_and_contains_agree(blocks_shape, shape):
    blocks = np.random.default_rng(1).random(blocks_shape) < 0.5
    blocks[0, 0] = True
    pattern = T.BlockPattern(blocks)
    dense = pattern.dense(shape)
    # The reference: each row and column belongs to the same near-equal group as small_world's.
    rows = T.cluster_ids(shape[0], blocks_shape[0])
    cols = T.cluster_ids(shape[1], blocks_shape[1])
    expected = np.array([[blocks[r, c] for c in cols] for r in rows])
    np.testing.assert_array_equal(dense, expected)
    assert pattern.count(shape) == expected.sum()
    inside = ops.convert_to_numpy(pattern.contains(np.arange(dense.size, dtype="int32"), shape))
    np.testing.assert_array_equal(inside, expected.ravel())
    clone = T.BlockPattern.from_config(pattern.get_config())
    assert clone == pattern


def test_block_pattern_between_and_within_clusters():
    routes = T.BlockPattern.between_clusters(4).dense((8, 8))
    same = T.cluster_ids(8, 4)[:, None] == T.cluster_ids(8, 4)[None, :]
    np.testing.assert_array_equal(routes, ~same)
    np.testing.assert_array_equal(T.BlockPattern.within_clusters(4).dense((8, 8)), same)
    # small_world with rewire=1 puts every link between clusters: inside the routes pattern.
    mask = T.small_world(8, 8, density=0.3, num_clusters=4, rewire=1.0, seed=0)
    assert not np.any((mask > 0) & ~routes)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: T.BlockPattern(np.ones(3)), "2-D"),
        (lambda: T.BlockPattern([[0, 2]]), "non-binary"),
        (lambda: T.BlockPattern([[0, 0]]), "no 1"),
        (lambda: T.BlockPattern.between_clusters(1), "num_clusters=1"),
        (lambda: T.BlockPattern(np.ones((5, 2))).dense((4, 4)), r"blocks.shape=\(5, 2\)"),
    ],
)
def test_block_pattern_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()
