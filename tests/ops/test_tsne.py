"""The t-SNE objective against a numpy reference: calibration, symmetry, loss, gradient, edges."""

import keras
import numpy as np
import pytest

from keras_sparse_moe import losses
from keras_sparse_moe.ops import tsne
from tests.test_case import to_numpy

RNG = np.random.default_rng(0)
# Two clusters of different scales: one bracket must fit both.
X = np.concatenate([RNG.normal(size=(40, 6)), 10.0 + 0.05 * RNG.normal(size=(40, 6))]).astype(
    "float32"
)


def _row_entropy(p):
    safe = np.where(p > 0, p, 1.0)
    return -np.sum(np.where(p > 0, p * np.log(safe), 0.0), axis=1)


@pytest.mark.parametrize("perplexity", [2.0, 10.0, 30.0, 70.0])
def test_calibrated_rows_hit_the_target_perplexity(perplexity):
    p = to_numpy(tsne.conditional_affinities(tsne.squared_distances(X), perplexity))
    assert np.all(np.diag(p) == 0)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(_row_entropy(p.astype("float64")), np.log(perplexity), atol=1e-5)


@pytest.mark.parametrize("width", [2, tsne.DIRECT_MAX_DIM + 4])  # differences, Gram form
def test_squared_distances_match_numpy(width):
    x = np.concatenate([X[:20], X[20:40]], axis=1)[:, :width]
    d = to_numpy(tsne.squared_distances(x))
    ref = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    np.testing.assert_allclose(d, ref, rtol=1e-4, atol=1e-2)
    assert np.all(np.diag(d) == 0)


def test_squared_distances_of_a_wide_map_keep_close_pairs_exact():
    # A 2-D map of spread 500: the Gram form's rounding (~0.04 here) would swamp,
    # or zero, the distances between neighbours 0.35 apart.
    rng = np.random.default_rng(1)
    a = 500.0 * rng.normal(size=(64, 2))
    y = np.concatenate([a, a + 0.25 * rng.normal(size=(64, 2))]).astype("float32")
    d = np.diagonal(to_numpy(tsne.squared_distances(y))[:64, 64:])
    y64 = y.astype("float64")
    ref = ((y64[:64] - y64[64:]) ** 2).sum(-1)
    np.testing.assert_allclose(d, ref, rtol=1e-3, atol=1e-6)


def test_joint_affinities_are_symmetric_and_sum_to_one():
    p = to_numpy(tsne.joint_affinities(X, 10.0))
    np.testing.assert_allclose(p, p.T, rtol=1e-6)
    assert p.sum() == pytest.approx(1.0, abs=1e-5)
    off = ~np.eye(len(X), dtype=bool)
    assert np.all(p[off] >= tsne.P_FLOOR) and np.all(np.diag(p) == 0)


def _numpy_kl_and_grad(p, y, dof, exaggeration):
    d = ((y[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    w = (1.0 + d / dof) ** (-(dof + 1.0) / 2.0)
    np.fill_diagonal(w, 0.0)
    q = w / w.sum()
    off = ~np.eye(len(y), dtype=bool)
    kl = np.sum(p[off] * np.log(p[off])) - exaggeration * np.sum(p[off] * np.log(w[off]))
    kl += np.log(w.sum())
    # dC/dy_i = (2(α+1)/α) Σ_j (e p_ij − q_ij) (y_i − y_j) / (1 + d_ij/α)
    coeff = (exaggeration * p - q) / (1.0 + d / dof)
    np.fill_diagonal(coeff, 0.0)
    grad = (2.0 * (dof + 1.0) / dof) * np.einsum("ij,ijk->ik", coeff, y[:, None, :] - y[None])
    return kl, grad


def _value_and_grad(fn, y):
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        y = tf.constant(y)
        with tf.GradientTape() as tape:
            tape.watch(y)
            value = fn(y)
        return float(value), tape.gradient(value, y).numpy()
    import jax

    value, grad = jax.value_and_grad(fn)(y)
    return float(value), np.asarray(grad)


@pytest.mark.parametrize("dof, exaggeration", [(1.0, 1.0), (3.0, 1.0), (1.0, 12.0), (0.5, 4.0)])
def test_loss_and_gradient_match_numpy(dof, exaggeration):
    x = X[::4]
    y = RNG.normal(size=(len(x), 2)).astype("float32")
    p = to_numpy(tsne.joint_affinities(x, 5.0)).astype("float64")
    value, grad = _value_and_grad(lambda v: tsne.tsne_kl(p, v, dof, exaggeration), y)
    ref_value, ref_grad = _numpy_kl_and_grad(p, y.astype("float64"), dof, exaggeration)
    assert value == pytest.approx(ref_value, rel=1e-4, abs=1e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-3, atol=1e-5)
    if exaggeration == 1.0:
        assert value >= 0.0


@pytest.mark.parametrize("case", ["duplicates", "all_equal"])
def test_degenerate_batches_give_finite_loss_and_gradient(case):
    x = np.repeat(X[:5], 6, axis=0) if case == "duplicates" else np.ones((30, 6), "float32")
    y = np.repeat(RNG.normal(size=(5, 2)), 6, axis=0).astype("float32")
    if case == "all_equal":
        y = np.zeros((30, 2), "float32")
    p = to_numpy(tsne.joint_affinities(x, 8.0))
    assert np.all(np.isfinite(p)) and p.sum() == pytest.approx(1.0, abs=1e-5)
    value, grad = _value_and_grad(lambda v: losses.tsne_kl(x, v, perplexity=8.0), y)
    assert np.isfinite(value) and np.all(np.isfinite(grad))


def test_float16_inputs_compute_in_float32():
    value = losses.tsne_kl(X.astype("float16"), X[:, :2].astype("float16"), perplexity=10.0)
    assert keras.backend.standardize_dtype(value.dtype) == "float32"
    assert np.isfinite(to_numpy(value))


def test_compiles_under_xla():
    """The bisection is a fixed-length loop with static shapes: it jit-compiles."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        fn = tf.function(lambda a, b: losses.tsne_kl(a, b, perplexity=10.0), jit_compile=True)
    else:
        import jax

        fn = jax.jit(lambda a, b: losses.tsne_kl(a, b, perplexity=10.0))
    x = X[:40]  # one scale: the two-scale batch is at float32's limit, where XLA rounds differently
    y = RNG.normal(size=(len(x), 2)).astype("float32")
    eager = to_numpy(losses.tsne_kl(x, y, perplexity=10.0))
    np.testing.assert_allclose(to_numpy(fn(x, y)), eager, rtol=1e-4)


@pytest.mark.parametrize(
    "perplexity, batch, error, match",
    [
        (0.0, 10, ValueError, "perplexity=0.0"),
        (-5, 10, ValueError, "perplexity=-5"),
        ("30", 10, TypeError, "perplexity='30'"),
        (9.0, 10, ValueError, "perplexity=9.0, batch_size=10"),
        (30.0, 20, ValueError, "perplexity=30.0, batch_size=20"),
    ],
)
def test_invalid_perplexity(perplexity, batch, error, match):
    with pytest.raises(error, match=match):
        tsne.check_perplexity(perplexity, batch, "tsne_kl")
    if not isinstance(perplexity, str) and perplexity > 0:
        with pytest.raises(error, match=match):
            losses.tsne_kl(np.ones((batch, 3), "float32"), np.ones((batch, 2)), perplexity)


def _numpy_sampled_kl(y, dof, exaggeration, n_points, entropy, ids=None):
    """The estimator written out in float64: sampled pairs (i, a + i), Z over the other pairs."""
    a = len(y) // 2
    d = ((y[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    log_w = -0.5 * (dof + 1.0) * np.log1p(d / dof)
    attraction = -np.mean([log_w[i, a + i] for i in range(a)])
    if ids is None:  # pairs of different anchors
        others = [np.exp(log_w[i, j]) for i in range(a) for j in range(a) if i != j]
    else:  # pairs of different points, not an anchor with its own neighbour
        others = [
            np.exp(log_w[i, j])
            for i in range(2 * a)
            for j in range(2 * a)
            if i % a != j % a and ids[i] != ids[j]
        ]
    log_z = np.log(np.mean(others)) + np.log(n_points * (n_points - 1.0))
    return entropy + exaggeration * attraction + log_z


@pytest.mark.parametrize(
    "dof, exaggeration, with_ids", [(1.0, 1.0, False), (0.5, 4.0, False), (1.0, 1.0, True)]
)
def test_sampled_kl_matches_numpy_value_and_finite_differences(dof, exaggeration, with_ids):
    y = RNG.normal(size=(24, 2))
    # Point 3 is both an anchor and another anchor's neighbour: that pair is not in Z.
    ids = np.r_[np.arange(12), 3, 40 + np.arange(11)] if with_ids else None
    args = (dof, exaggeration, 500, -7.5, ids)
    if with_ids:
        y[12] = y[3]
    value, grad = _value_and_grad(
        lambda v: tsne.sampled_tsne_kl(v, dof, exaggeration, n_points=500, entropy=-7.5, ids=ids),
        y.astype("float32"),
    )
    assert value == pytest.approx(_numpy_sampled_kl(y, *args), rel=1e-5)
    step, numeric = 1e-6, np.zeros_like(y)
    for index in np.ndindex(*y.shape):
        shift = np.zeros_like(y)
        shift[index] = step
        numeric[index] = (
            _numpy_sampled_kl(y + shift, *args) - _numpy_sampled_kl(y - shift, *args)
        ) / (2 * step)
    np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-5)


def test_sampled_kl_averages_to_the_full_kl_and_gradient():
    """All N points as anchors, one neighbour each drawn by p_{j|i}: the batch estimate is
    unbiased, so its mean over draws approaches the exact loss and gradient of the full P."""
    x = X[::2]
    n = len(x)
    cond = to_numpy(tsne.conditional_affinities(tsne.squared_distances(x), 5.0)).astype("float64")
    p = np.maximum((cond + cond.T) / (2.0 * n), 1e-300)  # the numpy reference takes logs
    np.fill_diagonal(p, 0.0)
    y = RNG.normal(scale=3.0, size=(n, 2)).astype("float32")
    full_value, full_grad = _numpy_kl_and_grad(p, y.astype("float64"), 1.0, 1.0)
    entropy = float(np.sum(p[p > 0] * np.log(p[p > 0])))
    rng = np.random.default_rng(1)
    values, grads = [], []
    for _ in range(400):
        anchors = rng.permutation(n)
        neighbours = np.array([rng.choice(n, p=cond[i] / cond[i].sum()) for i in anchors])
        batch = np.concatenate([anchors, neighbours])
        value, grad = _value_and_grad(
            lambda v: tsne.sampled_tsne_kl(v, n_points=n, entropy=entropy), y[batch]
        )
        full = np.zeros_like(y, dtype="float64")
        np.add.at(full, batch, grad)  # the batch rows' gradients, back onto the points
        values.append(value)
        grads.append(full)
    assert np.mean(values) == pytest.approx(full_value, rel=0.02)
    mean_grad = np.mean(grads, axis=0)
    cosine = np.sum(mean_grad * full_grad) / np.linalg.norm(mean_grad) / np.linalg.norm(full_grad)
    assert cosine > 0.99, cosine
    assert np.linalg.norm(mean_grad) == pytest.approx(np.linalg.norm(full_grad), rel=0.05)


def test_cauchy_kernel_fast_form_equals_the_general_one():
    # dof as the number 1 takes 1 / (1 + d); as a tensor (a trainable dof) the log-exp form.
    y = RNG.normal(scale=5.0, size=(16, 2)).astype("float32")
    fast = to_numpy(tsne.student_t_kernel(y, 1.0))
    general = to_numpy(tsne.student_t_kernel(y, keras.ops.convert_to_tensor(1.0)))
    np.testing.assert_allclose(fast, general, rtol=1e-5, atol=1e-7)
    assert np.all(np.diag(fast) == 0.0)
    ids = np.arange(16)
    args = (y, 1.0, 1.0, 100, 0.0, ids)
    with_tensor = (y, keras.ops.convert_to_tensor(1.0), 1.0, 100, 0.0, ids)
    assert float(tsne.sampled_tsne_kl(*args)) == pytest.approx(
        float(tsne.sampled_tsne_kl(*with_tensor)), rel=1e-6
    )
