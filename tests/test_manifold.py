"""ParametricTSNE: scikit-learn conventions, quality on digits, saving, errors; knn_affinities."""

import os

import keras
import numpy as np
import pytest
from scipy.sparse import csr_matrix as sparse_matrix
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA
from sklearn.exceptions import NotFittedError
from sklearn.manifold import trustworthiness
from sklearn.neighbors import KNeighborsClassifier
from sklearn.utils.estimator_checks import parametrize_with_checks

import keras_sparse_moe as ksm
from keras_sparse_moe.manifold import knn_affinities
from tests.test_case import to_numpy

X, Y = load_digits(return_X_y=True)
X = (X / 16.0).astype("float32")
SMALL = dict(perplexity=10.0, hidden=(64, 64), epochs=3, batch_size=256, seed=0, verbose=0)


def _numpy_conditional_row(d_row, perplexity):
    """p_{j|i} by scalar bisection on beta (the textbook loop), float64."""
    low, high = 1e-20, 1e20
    for _ in range(200):
        beta = np.sqrt(low * high)
        w = np.exp(-beta * (d_row - d_row.min()))
        p = w / w.sum()
        entropy = -np.sum(p * np.log(np.maximum(p, 1e-300)))
        low, high = (beta, high) if entropy > np.log(perplexity) else (low, beta)
    return p


def test_knn_affinities_match_a_textbook_calibration():
    x = X[:300]
    p, (index, cond) = knn_affinities(x, perplexity=10.0, pca_components=None)
    assert index.shape == (300, 30) and not np.any(index == np.arange(300)[:, None])
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    for i in (0, 17, 299):
        ref = _numpy_conditional_row(d[i, index[i]], 10.0)
        np.testing.assert_allclose(cond[i], ref, atol=2e-4)
    dense = p.toarray()
    np.testing.assert_allclose(dense, dense.T)
    assert dense.sum() == pytest.approx(1.0) and np.all(np.diag(dense) == 0)


@pytest.mark.slow
@pytest.mark.parametrize("affinities", ["global", "batch"])
def test_fit_transform_embeds_unseen_points_well(affinities):
    """Shuffled batches, both affinity modes: unseen digits land near their class."""
    model = ksm.ParametricTSNE(
        perplexity=20.0,
        hidden=(128, 128),
        epochs=40,
        batch_size=400,
        seed=0,
        verbose=0,
        affinities=affinities,
    )
    train = model.fit_transform(X[:1200])
    test = model.transform(X[1200:])
    assert train.shape == (1200, 2) and test.shape == (597, 2)
    knn = KNeighborsClassifier(1).fit(train, Y[:1200]).score(test, Y[1200:])
    # References on the same split: PCA to 2-D gives 0.54 / 0.81, raw 64-D pixels 1-NN 0.96.
    assert knn > 0.65, knn
    assert trustworthiness(X[1200:], test, n_neighbors=5) > 0.85
    assert len(model.history_["loss"]) == 40 and np.all(np.isfinite(model.history_["loss"]))


def test_global_loss_estimates_the_kl_of_the_whole_map():
    """In global mode each batch's loss estimates KL(P || Q) of all the fitted points."""
    model = ksm.ParametricTSNE(**{**SMALL, "epochs": 6}).fit(X[:600])
    p, _ = knn_affinities(X[:600], perplexity=10.0, seed=0)
    exact = to_numpy(ksm.ops.tsne.tsne_kl(p.toarray(), model.transform(X[:600])))
    # The learning rate has decayed to ~0 in the last epoch: the map it averages over is still.
    assert model.history_["loss"][-1] == pytest.approx(float(exact), rel=0.05)
    assert model.history_["loss"][0] > model.history_["loss"][-1]


def test_default_learning_rate_shrinks_for_small_batches_and_heavy_tails():
    schedule = ksm.ParametricTSNE()._learning_rate(256, 0.5, total_steps=100)
    assert float(to_numpy(schedule(0))) == pytest.approx(3e-3 * (256 / 1024) * 0.5)
    assert float(to_numpy(schedule(100))) == pytest.approx(0.0, abs=1e-9)  # cosine, down to 0
    assert float(to_numpy(ksm.ParametricTSNE()._learning_rate(4096, "trainable", 10)(0))) == (
        pytest.approx(3e-3)
    )
    fixed = ksm.ParametricTSNE(learning_rate=1e-2, learning_rate_decay=None)
    assert fixed._learning_rate(256, 0.5, total_steps=100) == 1e-2


@pytest.mark.parametrize("normalization", ["layer", None])
def test_normalization_follows_each_hidden_layer(normalization):
    x = X[:64]
    model = ksm.ParametricTSNE(hidden=(16, 8), normalization=normalization, seed=0)
    network, trained, _ = model._build_network(x, (16, 8))
    kinds = [type(layer).__name__ for layer in trained.layers]
    assert network.layers[-len(trained.layers) :] == trained.layers  # the trained part, shared
    dense = [i for i, kind in enumerate(kinds) if kind == "Dense"]
    assert len(dense) == 3  # two hidden layers and the linear embedding
    follows = [kinds[i + 1] == "LayerNormalization" for i in dense[:-1]]
    assert follows == [normalization == "layer"] * 2
    assert kinds.count("LayerNormalization") == (2 if normalization else 0)


def test_the_network_reads_the_principal_components_through_a_frozen_layer():
    """`network_input="pca"`: a frozen `pca` layer computes scikit-learn's PCA projection
    (scaled to unit overall variance) and training leaves it unchanged; `"raw"`, and rows no
    wider than `pca_components`, are standardised instead."""
    x = X[:300]
    model = ksm.ParametricTSNE(**{**SMALL, "pca_components": 12}).fit(x)
    layer = model.network_.get_layer("pca")
    assert not layer.trainable and layer.units == 12
    reference = PCA(12, random_state=0).fit_transform(x)
    projected = to_numpy(layer(x))
    np.testing.assert_allclose(projected, reference / reference.std(), atol=1e-4)
    fresh, _, _ = model._build_network(x, (64, 64))  # before any training
    for trained, untrained in zip(layer.get_weights(), fresh.get_layer("pca").get_weights()):
        np.testing.assert_array_equal(trained, untrained)
    for option in ({"network_input": "raw"}, {"pca_components": 64}, {"pca_components": None}):
        fitted = ksm.ParametricTSNE(**{**SMALL, **option}).fit(x, epochs=1)
        names = [layer.name for layer in fitted.network_.layers]
        assert "standardise" in names and "pca" not in names, option


@parametrize_with_checks(
    [ksm.ParametricTSNE(perplexity=5.0, hidden=(4,), epochs=1, batch_size=32, seed=0, verbose=0)]
)
def test_scikit_learn_estimator_checks(estimator, check):
    """scikit-learn's own estimator suite, every check, on each backend."""
    check(estimator)


def test_same_seed_same_map_and_rows_embed_alone():
    x = X[:300].astype("float64")  # any float dtype; the map computes in float32
    first = ksm.ParametricTSNE(**SMALL).fit(x)
    again = ksm.ParametricTSNE(**SMALL).fit(x)
    embedded = first.transform(x)
    assert embedded.dtype == np.float32
    np.testing.assert_array_equal(again.transform(x), embedded)
    # A row's embedding does not depend on the rows around it: subsets, orders, one row.
    order = np.random.default_rng(0).permutation(300)
    np.testing.assert_array_equal(first.transform(x[order]), embedded[order])
    np.testing.assert_array_equal(first.transform(x[7:8]), embedded[7:8])
    small_batches = first.transform(x, batch_size=64)  # within float32 rounding of the above
    np.testing.assert_allclose(small_batches, embedded, atol=1e-5)
    np.testing.assert_array_equal(first.transform(x[:257], batch_size=64), small_batches[:257])
    assert first.network is first.network_ and first.n_features_in_ == 64


def test_transform_refuses_other_samples_clearly():
    model = ksm.ParametricTSNE(**{**SMALL, "epochs": 1}).fit(X[:100])
    with pytest.raises(ValueError, match="X has 63 features, but ParametricTSNE is expecting 64"):
        model.transform(X[:5, :63])
    with pytest.raises(ValueError, match="NaN"):
        model.transform(np.full((2, 64), np.nan))
    with pytest.raises(TypeError, match="[Ss]parse"):
        model.transform(sparse_matrix(X[:5]))
    images = ksm.ParametricTSNE(**{**SMALL, "epochs": 1}).fit(X[:100].reshape(100, 8, 8))
    with pytest.raises(ValueError, match=r"samples of shape \(8, 8\). Received: x of shape"):
        images.transform(X[:5].reshape(5, 8, 4, 2))
    assert images.transform(X[:5].reshape(5, 8, 8)).shape == (5, 2)


def test_sklearn_conventions():
    model = ksm.ParametricTSNE(**SMALL)
    assert model.get_params()["perplexity"] == 10.0
    assert model.set_params(perplexity=5.0) is model and model.perplexity == 5.0
    assert clone(model).get_params() == model.get_params()
    with pytest.raises(NotFittedError):
        model.transform(X[:5])
    assert model.fit(X[:300]) is model
    assert model.n_features_in_ == 64


class _Interrupted(Exception):
    pass


class _Record(keras.callbacks.Callback):
    """Keeps the trainer's step count and weights at the start and each epoch's end, and the
    exaggeration each epoch ran with; raises `_Interrupted` after epoch `stop_after` (0-based)."""

    def __init__(self, stop_after=None):
        super().__init__()
        self.stop_after, self.states, self.exaggerations = stop_after, [], []

    def _keep(self):
        step = int(to_numpy(self.model.optimizer.iterations))
        self.states.append((step, [to_numpy(w).copy() for w in self.model.network.weights]))

    def on_train_begin(self, logs=None):
        self._keep()

    def on_epoch_end(self, epoch, logs=None):
        self._keep()
        self.exaggerations.append(float(to_numpy(self.model.exaggeration)))
        if epoch == self.stop_after:
            raise _Interrupted


def test_exaggeration_phase_and_trainable_dof():
    model = ksm.ParametricTSNE(
        **{**SMALL, "epochs": 4}, early_exaggeration=4.0, exaggeration_epochs=2, dof="trainable"
    )
    record = _Record()
    model.fit(X[:300], callbacks=[record])
    assert record.exaggerations == [4.0, 4.0, 1.0, 1.0]  # as each epoch ran
    assert len(model.history_["loss"]) == 4
    assert model.dof_ != 1.0 and np.isfinite(model.dof_)  # it was learned from 1


def test_an_interrupted_fit_resumes_with_backup_and_restore(tmp_path):
    folder = os.path.join(tmp_path, "backup")
    model = ksm.ParametricTSNE(
        **{**SMALL, "epochs": 5}, early_exaggeration=4.0, exaggeration_epochs=3
    )
    first = _Record(stop_after=1)
    with pytest.raises(_Interrupted):
        model.fit(X[:512], callbacks=[keras.callbacks.BackupAndRestore(folder), first])
    again = _Record()
    model.fit(X[:512], callbacks=[keras.callbacks.BackupAndRestore(folder), again])
    (step, weights), (resumed_step, resumed) = first.states[-1], again.states[0]
    assert step == 2 * (512 // 128) and resumed_step == step  # the schedule goes on from there
    for saved, restored in zip(weights, resumed):
        np.testing.assert_array_equal(restored, saved)
    assert len(model.history_["loss"]) == 3  # epochs 3 to 5
    assert first.exaggerations == [4.0, 4.0] and again.exaggerations == [4.0, 1.0, 1.0]
    assert again.states[-1][0] == 5 * (512 // 128)
    assert not os.path.exists(folder)  # a finished fit leaves no backup


def test_network_saves_and_exports(tmp_path):
    model = ksm.ParametricTSNE(**SMALL).fit(X[:300])
    path = os.path.join(tmp_path, "ptsne.keras")
    model.network.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(to_numpy(loaded(X[:50])), model.transform(X[:50]), atol=1e-5)


@pytest.mark.tensorflow_only
def test_network_saved_model_export(tmp_path):
    import tensorflow as tf

    model = ksm.ParametricTSNE(**SMALL).fit(X[:300])
    path = os.path.join(tmp_path, "exported")
    model.network.export(path, format="tf_saved_model", verbose=False)
    reloaded = tf.saved_model.load(path)
    np.testing.assert_allclose(reloaded.serve(X[:50]).numpy(), model.transform(X[:50]), atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"perplexity": 0.0}, ValueError, "perplexity=0.0"),
        ({"perplexity": -1}, ValueError, "perplexity=-1"),
        ({"n_components": 0}, ValueError, "n_components=0"),
        ({"dof": 0.0}, ValueError, "dof=0.0"),
        ({"dof": "learned"}, ValueError, "dof='learned'"),
        ({"affinities": "local"}, ValueError, "affinities='local'"),
        ({"early_exaggeration": 0.5}, ValueError, "early_exaggeration=0.5"),
        ({"exaggeration_epochs": -1}, ValueError, "exaggeration_epochs=-1"),
        ({"dropout": 1.0}, ValueError, "dropout=1.0"),
        ({"learning_rate": 0}, ValueError, "learning_rate=0"),
        ({"learning_rate": "fast"}, TypeError, "learning_rate='fast'"),
        ({"learning_rate_decay": "linear"}, ValueError, "learning_rate_decay='linear'"),
        ({"normalization": "batch"}, ValueError, "normalization='batch'"),
        ({"pca_components": 0}, ValueError, "pca_components=0"),
        ({"network_input": "pixels"}, ValueError, "network_input='pixels'"),
        ({"hidden": (64, 0)}, ValueError, "hidden=0"),
        ({"perplexity": 300.0, "batch_size": 256}, ValueError, "batch_size=256"),
        ({"perplexity": 1.0, "batch_size": 3}, ValueError, "batch_size=3"),
    ],
)
def test_invalid_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        ksm.ParametricTSNE(**{**SMALL, **kwargs}).fit(X[:300])


def test_verbose_fit_reports_the_neighbour_stage_and_each_epoch(capsys):
    ksm.ParametricTSNE(**{**SMALL, "epochs": 2, "verbose": 2}).fit(X[:200])
    printed = capsys.readouterr().out
    assert "nearest-neighbour affinities of 200 points" in printed
    assert "affinities found in" in printed
    assert printed.count("loss:") == 2  # Keras' line per epoch
    ksm.ParametricTSNE(**SMALL).fit(X[:200])  # verbose=0: silent
    assert capsys.readouterr().out == ""
