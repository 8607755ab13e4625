"""Drop/grow primitives against numpy references, compiled as the callbacks use them."""

import numpy as np
import pytest

from keras_sparse_moe.ops import rewiring
from tests.test_case import to_numpy

RNG = np.random.default_rng(0)


def _compiled(fn):
    return rewiring.compile_function(fn)


@pytest.mark.parametrize("count", [0, 1, 7, 20])
def test_select_top_matches_argsort(count):
    scores = RNG.permutation(50).astype("float32")
    picked = to_numpy(_compiled(lambda s, c: rewiring.select_top(s, c, 20))(scores, count))
    expected = np.zeros(50)
    expected[np.argsort(-scores)[:count]] = 1
    np.testing.assert_array_equal(picked, expected)


def test_set_drop_removes_smallest_positive_and_largest_negative():
    kernel = RNG.standard_normal(400).astype("float32")
    mask = (RNG.random(400) < 0.5).astype("float32")
    kernel *= mask
    zeta = 0.3
    drop = to_numpy(_compiled(lambda k, m: rewiring.set_drop(k, m, zeta, 200))(kernel, mask))
    pos = np.flatnonzero((mask > 0) & (kernel >= 0))
    neg = np.flatnonzero((mask > 0) & (kernel < 0))
    expected = np.zeros(400)
    expected[pos[np.argsort(kernel[pos])][: int(zeta * len(pos))]] = 1
    expected[neg[np.argsort(-kernel[neg])][: int(zeta * len(neg))]] = 1
    np.testing.assert_array_equal(drop, expected)
    assert np.all(mask[drop > 0] == 1)


def test_magnitude_drop_and_grow():
    kernel = RNG.standard_normal(300).astype("float32")
    mask = (RNG.random(300) < 0.3).astype("float32")
    kernel *= mask
    drop = to_numpy(
        _compiled(lambda k, m, c: rewiring.magnitude_drop(k, m, c, 64))(kernel, mask, 10)
    )
    kept = np.flatnonzero(mask)
    expected = np.zeros(300)
    expected[kept[np.argsort(np.abs(kernel[kept]))][:10]] = 1
    np.testing.assert_array_equal(drop, expected)

    scores = RNG.random(300).astype("float32")
    grown = to_numpy(_compiled(lambda m, s, c: rewiring.grow(m, s, c, 64))(mask, scores, 10))
    empty = np.flatnonzero(mask == 0)
    expected = np.zeros(300)
    expected[empty[np.argsort(-scores[empty])][:10]] = 1
    np.testing.assert_array_equal(grown, expected)
