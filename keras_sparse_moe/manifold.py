"""`ParametricTSNE`: a Keras network trained to place points as t-SNE would (scikit-learn API)."""

from __future__ import annotations

import math
import time

import keras
import numpy as np
from keras import ops
from scipy import sparse
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors
from sklearn.utils.validation import check_is_fitted, validate_data

from keras_sparse_moe import _runtime, validation
from keras_sparse_moe.ops import tsne
from keras_sparse_moe.ops.tsne import check_dof

__all__ = ["ParametricTSNE", "knn_affinities"]

OWNER = "ParametricTSNE"
AFFINITIES = ("global", "batch")
DECAYS = ("cosine", None)
NORMALIZATIONS = ("layer", None)
NETWORK_INPUTS = ("pca", "raw")
# `transform` embeds rows in batches of this many (the last one padded): a row's
# embedding then takes the same arithmetic path wherever it sits among the others.
TRANSFORM_BATCH = 256


def knn_affinities(x, perplexity=30.0, n_neighbors=None, pca_components=50, seed=None):
    """Global t-SNE affinities from each point's nearest neighbours (sparse, symmetric).

    Each point's `p_{j|i}` spreads over its `n_neighbors` (default
    `3 * perplexity`) nearest neighbours with a per-point `β_i` calibrated to
    the perplexity (`keras_sparse_moe.ops.tsne.calibrate_rows`); then
    `P = (P_cond + P_condᵀ) / (2n)`. Neighbours come from scikit-learn's
    `NearestNeighbors`, on the first `pca_components` principal components
    when the data is wider (None: the raw features).

    Args:
        x: `(n, ...)` array; rows are flattened.
        perplexity: Effective number of neighbours.
        n_neighbors: Neighbours per point (default `min(n - 1, 3 * perplexity)`).
        pca_components: Int or None.
        seed: Seeds the PCA's randomized solver.

    Returns:
        `(P, conditional)`: the joint `(n, n)` CSR matrix summing to 1, and the
        `(neighbour index, p_{j|i})` arrays, both `(n, n_neighbors)`.

    Examples:

        >>> import numpy as np
        >>> x = np.random.default_rng(0).normal(size=(200, 8))
        >>> p, (index, cond) = knn_affinities(x, perplexity=10.0)
        >>> index.shape, round(float(p.sum()), 6), bool(abs(p - p.T).max() < 1e-12)
        ((200, 30), 1.0, True)
    """
    x = np.asarray(x, dtype="float32").reshape(len(x), -1)
    n = len(x)
    k = min(n - 1, int(math.ceil(3 * perplexity)) if n_neighbors is None else n_neighbors)
    tsne.check_perplexity(float(perplexity), k + 1, "knn_affinities")
    if pca_components is not None and x.shape[1] > pca_components and n > pca_components:
        x = PCA(pca_components, random_state=seed).fit_transform(x).astype("float32")
    distances, index = NearestNeighbors(n_neighbors=k).fit(x).kneighbors()
    cond = ops.convert_to_numpy(tsne.calibrate_rows(np.square(distances), perplexity))
    rows = np.repeat(np.arange(n), k)
    p = sparse.csr_matrix((cond.ravel().astype("float64"), (rows, index.ravel())), shape=(n, n))
    p = (p + p.T) / (2.0 * n)
    return p.tocsr(), (index, cond)


class _NeighbourBatches(keras.utils.PyDataset):
    """Batches of random anchors, then one neighbour of each drawn by `p_{j|i}`.

    A random batch of a large set holds almost no neighbour pairs, so it could
    not feel the attraction of the global `P`; pairing every anchor with a
    sampled neighbour gives `tsne.sampled_tsne_kl` an unbiased sample of it.
    """

    def __init__(self, x, conditional, batch_size, seed):
        super().__init__()
        self.x = x
        self.index, self.cumulative = conditional[0], np.cumsum(conditional[1], axis=1)
        self.anchors = batch_size // 2
        # Every draw comes from (seed, epoch, batch): the batches do not depend on
        # how often or in which order Keras reads them.
        self.seed, self.epoch = _runtime.new_seed(seed), -1
        self.on_epoch_end()

    def __len__(self):
        return max(1, len(self.x) // self.anchors)

    def on_epoch_end(self):
        self.epoch += 1
        self.order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.x))

    def __getitem__(self, i):
        anchors = self.order[i * self.anchors : (i + 1) * self.anchors]
        rng = np.random.default_rng([self.seed, self.epoch, i])
        draw = rng.random((len(anchors), 1)) * self.cumulative[anchors, -1:]
        column = np.minimum((self.cumulative[anchors] < draw).sum(axis=1), self.index.shape[1] - 1)
        batch = np.concatenate([anchors, self.index[anchors, column]])
        return self.x[batch], batch.astype("int32")  # the points' ids: "y" of the loss


class _ExaggerationSchedule(keras.callbacks.Callback):
    """Sets the trainer's `exaggeration` as each epoch starts: `factor` for `epochs` epochs, then 1.

    One `fit` for both phases, so that `keras.callbacks.BackupAndRestore` resumes either.
    """

    def __init__(self, factor, epochs):
        super().__init__()
        self.factor, self.epochs = factor, epochs

    def on_epoch_begin(self, epoch, logs=None):
        self.model.exaggeration.assign(self.factor if epoch < self.epochs else 1.0)


class _TSNETrainer(keras.Model):
    """The network plus the t-SNE loss (and a trainable `dof` when asked).

    `population` None: `P` from each batch itself; else `(N, Σ P log P)` of the
    global affinities, and batches come from `_NeighbourBatches`.
    """

    def __init__(self, network, perplexity, dof, population=None, **kwargs):
        super().__init__(**kwargs)
        self.network = network
        self.perplexity = perplexity
        self.population = population
        self.trainable_dof = dof == "trainable"
        self.fixed_dof = None if self.trainable_dof else float(dof)
        self.log_dof = self.add_weight(
            name="log_dof",
            shape=(),
            initializer=keras.initializers.Constant(0.0 if self.trainable_dof else math.log(dof)),
            trainable=self.trainable_dof,
        )
        self.exaggeration = self.add_weight(
            name="exaggeration", shape=(), initializer="ones", trainable=False
        )

    def call(self, inputs, training=None):
        return self.network(inputs, training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        # A fixed dof as a number: the loss takes the Cauchy kernel's fast form at dof 1
        # (a step on 20,000 MNIST points took 9.4-9.9 ms instead of 10.7-11.0).
        dof = ops.exp(self.log_dof) if self.trainable_dof else self.fixed_dof
        if self.population is None:
            p = tsne.joint_affinities(x, self.perplexity)
            return tsne.tsne_kl(p, y_pred, dof=dof, exaggeration=self.exaggeration)
        n, entropy = self.population
        return tsne.sampled_tsne_kl(y_pred, dof, self.exaggeration, n, entropy, ids=y)


class ParametricTSNE(TransformerMixin, BaseEstimator):
    """Parametric t-SNE (van der Maaten 2009): a Keras network that embeds unseen points.

    A feed-forward network `x -> y` (ReLU layers of widths `hidden`,
    layer-normalised by default, a linear `n_components` output) is trained
    to minimise the t-SNE loss `KL(P ‖ Q)` (`keras_sparse_moe.ops.tsne`), so
    that, unlike t-SNE, `transform` places new points without re-optimising.
    Follows scikit-learn's conventions (`fit` returns self, `transform`,
    `fit_transform`, `get_params` / `set_params`) and passes scikit-learn's
    `check_estimator`; `network_` is an ordinary Keras model (`.keras` save,
    SavedModel export).

    **Repeatable.** With the same `seed` (or, for `seed=None`, the same
    `keras.utils.set_random_seed`), two fits give the same map, and a row's
    embedding by `transform` does not depend on the other rows given with it.
    **float32.** The network computes in float32 and `transform` returns
    float32 for any real input (the `preserves_dtype` tag says so); NaN, inf,
    complex and sparse inputs are refused with a clear error.

    **Affinities.** `"global"` (default): since `fit` sees the whole set, `P`
    comes from each point's nearest neighbours over all of it
    (`knn_affinities`); every batch pairs random anchors with a neighbour
    drawn from their rows, and the loss (`tsne.sampled_tsne_kl`) estimates the
    KL divergence of the whole set's map (so the progress bar shows it).
    `"batch"`: `P` from the batch alone, computed in the graph, as the
    original method and the `PTSNEGate` do (batches may be shuffled; the
    perplexity must be well below the batch size).

    Args:
        n_components: Embedding dimension (positive int).
        perplexity: Effective number of neighbours (float > 0).
        hidden: Widths of the hidden ReLU layers. The default 256-256-256
            on the 50 principal components costs 1/10 of the paper's
            500-500-2000 on the pixels per point; on all of MNIST, 270
            epochs reach 1-NN 0.946-0.951 and training-map trustworthiness
            0.969-0.972, where the paper's network took 240 epochs to
            0.945 / 0.973.
        normalization: `"layer"`: a `LayerNormalization` after each hidden
            layer (on all of MNIST, 60 epochs: test 1-NN / trustworthiness
            0.941 / 0.959 against 0.927 / 0.948 without, for 1.2x the time),
            or None.
        dof: Degrees of freedom `α` of the Student-t: a float > 0, `"auto"`
            (`max(1, n_components - 1)`) or `"trainable"` (learned, from 1).
        affinities: `"global"` or `"batch"`.
        early_exaggeration: Factor on the attraction during the first
            `exaggeration_epochs` epochs (1 or None: off).
        exaggeration_epochs: Epochs of early exaggeration.
        epochs: Default number of training epochs for `fit` (270). An epoch
            is `len(x)` points through the network: 1.0-2.3 s for 60,000 MNIST
            images on the 2-core CPUs measured (JAX), 5.5-8.5 minutes in all with
            the neighbours, 2.65-3.7x openTSNE's time. More epochs keep
            sharpening the finest scale, which is where the training map's
            trustworthiness trails openTSNE's (0.986 on MNIST): the recipe
            for that level is `hidden=(500, 500, 2000), network_input="raw",
            epochs=2000`, which gives 0.983 on all 60,000 (8.3 hours on
            those CPUs).
        batch_size: Points per batch (anchors and neighbours in global mode).
        learning_rate: Adam's (initial) learning rate; None:
            `3e-3 · min(1, batch_size / 1024) · min(1, dof)`. At 3e-3 on MNIST,
            batches of 256 points and `dof=0.5` made the map diverge; 1e-3 and
            1.5e-3 did not.
        learning_rate_decay: `"cosine"` (to 0 over the whole `fit`) or None
            (constant).
        dropout: Dropout rate after each hidden layer (0: none).
        pca_components: Principal components (int, or None: the raw features)
            on which the global neighbours are found and, with
            `network_input="pca"`, which the network reads, for rows wider
            than this.
        network_input: `"pca"`: the network's first layer is the fixed
            projection on the `pca_components` principal components of the
            training set (a frozen `Dense` named `"pca"`), so that its first
            trained layer is `pca_components` wide instead of the rows'
            width, and training reads the projected rows once computed: the
            standard first step of t-SNE pipelines. `"raw"`: it reads the
            standardised rows. Affinities, in both modes, come from what the
            network reads. A single narrow hidden layer learns less from
            the components than from the pixels (MNIST, 5 epochs, `(128,)`:
            test 1-NN 0.63 against 0.76); two, `(128, 128)`, do better than
            either (0.80).
        seed: Int seeding the network's initial weights, its dropout, the
            global-mode batches and the PCA (process-wide state is left alone:
            in batch mode Keras shuffles as `keras.utils.set_random_seed` says).
        verbose: Default verbosity of `fit` (Keras progress bar: 0, 1 or 2).

    Attributes:
        network_: The Keras embedding model (after `fit`; also `network`).
        n_features_in_: Features seen by `fit` (for images, `x.shape[1]`, as
            scikit-learn counts; `transform` takes the fitted sample shape).
        dof_: The degrees of freedom used (learned with `"trainable"`).
        history_: The Keras `History` of the last `fit`.

    Examples:

        >>> import numpy as np
        >>> import keras_sparse_moe
        >>> x = np.random.default_rng(0).normal(size=(256, 10)).astype("float32")
        >>> ptsne = keras_sparse_moe.ParametricTSNE(
        ...     perplexity=10.0, hidden=(32,), epochs=2, batch_size=128, seed=0, verbose=0)
        >>> ptsne.fit_transform(x).shape
        (256, 2)
    """

    def __init__(
        self,
        n_components=2,
        perplexity=30.0,
        hidden=(256, 256, 256),
        normalization="layer",
        dof=1.0,
        affinities="global",
        early_exaggeration=None,
        exaggeration_epochs=0,
        epochs=270,
        batch_size=1024,
        learning_rate=None,
        learning_rate_decay="cosine",
        dropout=0.0,
        pca_components=50,
        network_input="pca",
        seed=None,
        verbose="auto",
    ):
        self.n_components = n_components
        self.perplexity = perplexity
        self.hidden = hidden
        self.normalization = normalization
        self.dof = dof
        self.affinities = affinities
        self.early_exaggeration = early_exaggeration
        self.exaggeration_epochs = exaggeration_epochs
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.learning_rate_decay = learning_rate_decay
        self.dropout = dropout
        self.pca_components = pca_components
        self.network_input = network_input
        self.seed = seed
        self.verbose = verbose

    def _check_params(self):
        """Validates the parameters at `fit`, as scikit-learn estimators do."""
        n = self.n_components
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(
                f"`{OWNER}` got an invalid `n_components`. Expected an int >= 1. "
                f"Received: n_components={n!r}"
            )
        tsne.check_perplexity(self.perplexity, None, OWNER)
        dof = check_dof(self.dof, int(n), OWNER)
        if self.affinities not in AFFINITIES:
            raise ValueError(
                f"`{OWNER}` got an unknown `affinities`. Expected one of {AFFINITIES}. "
                f"Received: affinities={self.affinities!r}"
            )
        hidden = tuple(self.hidden)
        for width in hidden:
            validation.check_size("hidden", width, OWNER)
        exaggeration = 1.0 if self.early_exaggeration is None else self.early_exaggeration
        validation.check_float(
            "early_exaggeration", exaggeration, OWNER, "a float >= 1 or None", lambda v: v >= 1
        )
        validation.check_float(
            "dropout", self.dropout, OWNER, "a float in [0, 1)", lambda v: 0 <= v < 1
        )
        if self.learning_rate is not None:
            validation.check_float(
                "learning_rate", self.learning_rate, OWNER, "a float > 0 or None", lambda v: v > 0
            )
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"`{OWNER}` got an unknown `normalization`. Expected one of {NORMALIZATIONS}. "
                f"Received: normalization={self.normalization!r}"
            )
        if self.learning_rate_decay not in DECAYS:
            raise ValueError(
                f"`{OWNER}` got an unknown `learning_rate_decay`. Expected one of {DECAYS}. "
                f"Received: learning_rate_decay={self.learning_rate_decay!r}"
            )
        epochs = self.exaggeration_epochs
        if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 0:
            raise ValueError(
                f"`{OWNER}` got an invalid `exaggeration_epochs`. Expected an int >= 0. "
                f"Received: exaggeration_epochs={epochs!r}"
            )
        if self.pca_components is not None:
            validation.check_size("pca_components", self.pca_components, OWNER)
        if self.network_input not in NETWORK_INPUTS:
            raise ValueError(
                f"`{OWNER}` got an unknown `network_input`. Expected one of {NETWORK_INPUTS}. "
                f"Received: network_input={self.network_input!r}"
            )
        return dof, hidden, float(exaggeration)

    def _projection(self, flat):
        """The fixed first layer, `(n, d)` rows -> the network's features, and those of `flat`.

        With `network_input="pca"` and rows wider than `pca_components`: the
        first principal components, scaled to unit overall variance (a frozen
        `Dense` named `"pca"`). Otherwise the rows standardised by their overall
        mean and std (`Rescaling`, named `"standardise"`).
        """
        k = self.pca_components
        if self.network_input == "pca" and k is not None and flat.shape[1] > k and len(flat) > k:
            pca = PCA(k, random_state=self.seed).fit(flat)
            features = pca.transform(flat).astype("float32")
            scale = float(features.std()) or 1.0
            kernel = (pca.components_.T / scale).astype("float32")
            bias = (-pca.mean_ @ pca.components_.T / scale).astype("float32")
            layer = keras.layers.Dense(k, trainable=False, name="pca")
            layer.build((None, flat.shape[1]))
            layer.set_weights([kernel, bias])
            return layer, features / scale
        mean, std = float(flat.mean()), float(flat.std()) or 1.0
        layer = keras.layers.Rescaling(1.0 / std, offset=-mean / std, name="standardise")
        return layer, (flat - mean) / std

    def _build_network(self, x, hidden):
        """`(network, trained, features)`: the embedding model of `x`'s samples, its trained
        part (every layer after the fixed projection) and the projected `x` it trains on."""
        flat = x.reshape(len(x), -1)
        projection, features = self._projection(flat)
        init = keras.initializers.GlorotUniform
        layers = []
        for i, width in enumerate(hidden):
            seed = None if self.seed is None else self.seed + i
            layers.append(
                keras.layers.Dense(width, activation="relu", kernel_initializer=init(seed))
            )
            if self.normalization == "layer":
                layers.append(keras.layers.LayerNormalization())
            if self.dropout:
                layers.append(keras.layers.Dropout(self.dropout, seed=seed))
        seed = None if self.seed is None else self.seed + len(hidden)
        layers.append(
            keras.layers.Dense(self.n_components, kernel_initializer=init(seed), name="embedding")
        )
        # Both models share the trained layers: training reads the projected rows once
        # computed, `transform` (and a `PTSNEGate`) the raw samples.
        trained = keras.Sequential([keras.Input(features.shape[1:]), *layers], name="map")
        network = keras.Sequential(
            [keras.Input(x.shape[1:]), keras.layers.Flatten(), projection, *layers],
            name="parametric_tsne",
        )
        return network, trained, features

    def _learning_rate(self, batch_size, dof, total_steps):
        """Adam's learning rate: constant, or cosine-decayed to 0 over the whole `fit`."""
        rate = self.learning_rate
        if rate is None:
            # Heavy tails (dof < 1) need a smaller step; a trainable dof starts at 1.
            heavy_tails = 1.0 if dof == "trainable" else min(1.0, dof)
            rate = 3e-3 * min(1.0, batch_size / 1024) * heavy_tails
        if self.learning_rate_decay is None:
            return rate
        return keras.optimizers.schedules.CosineDecay(rate, total_steps)

    def fit(self, x, y=None, epochs=None, batch_size=None, verbose=None, callbacks=None):
        """Trains the network on `x` (`(n, ...)`); returns self. `y` is ignored.

        `epochs`, `batch_size` and `verbose` override the constructor's for this
        call; `callbacks` are Keras callbacks (e.g. `TensorBoard`) given to the
        training's `fit`, whose `model` is a trainer wrapping `self.network`.
        A long fit survives interruptions with
        `callbacks=[keras.callbacks.BackupAndRestore(folder)]`: calling `fit`
        again with the same data, arguments and folder resumes at the last
        finished epoch, with the network, the optimiser's state and the
        learning-rate schedule where they were (the batches are drawn afresh).
        """
        dof, hidden, exaggeration = self._check_params()
        x = self._validate(x, reset=True)
        epochs = self.epochs if epochs is None else epochs
        batch_size = self.batch_size if batch_size is None else batch_size
        verbose = self.verbose if verbose is None else verbose
        validation.check_size("epochs", epochs, OWNER)
        validation.check_size("batch_size", batch_size, OWNER)
        batch_size = min(batch_size, len(x))
        tsne.check_perplexity(float(self.perplexity), batch_size, OWNER)
        self.network_, trained, features = self._build_network(x, hidden)
        population = None
        if self.affinities == "global":
            if batch_size < 4:
                raise ValueError(
                    f"`{OWNER}` needs batches of at least 4 points with global affinities "
                    f"(2 anchors and a neighbour of each). Received: batch_size={batch_size}"
                )
            if verbose:
                print(f"{OWNER}: nearest-neighbour affinities of {len(x)} points ...", flush=True)
            start = time.perf_counter()
            # The features already are the principal components when the network reads them.
            p, conditional = knn_affinities(
                features, self.perplexity, pca_components=self.pca_components, seed=self.seed
            )
            if verbose:
                print(f"{OWNER}: affinities found in {time.perf_counter() - start:.1f} s")
            population = (len(x), float(np.sum(p.data * np.log(p.data))))
            # Batch order is the sampler's own: Keras' shuffle would draw it from the global RNG.
            batches = _NeighbourBatches(features, conditional, batch_size, self.seed)
            data = {"x": batches, "shuffle": False}
            steps = len(data["x"])
        else:
            data = {"x": features, "batch_size": batch_size, "shuffle": True}
            steps = math.ceil(len(x) / batch_size)
        trainer = _TSNETrainer(
            trained, float(self.perplexity), dof, population, name="tsne_trainer"
        )
        trainer(features[:1])  # built, so that `keras.callbacks.BackupAndRestore` can restore it
        rate = self._learning_rate(batch_size, dof, epochs * steps)
        trainer.compile(optimizer=keras.optimizers.Adam(rate))
        boost = self.exaggeration_epochs if exaggeration > 1 else 0
        schedule = _ExaggerationSchedule(exaggeration, boost)
        run = trainer.fit(
            **data, epochs=epochs, verbose=verbose, callbacks=[schedule, *(callbacks or [])]
        )
        self.history_ = dict(run.history)
        self.dof_ = float(np.exp(ops.convert_to_numpy(trainer.log_dof)))
        return self

    @property
    def network(self):
        """The Keras embedding model, `network_` (after `fit`)."""
        check_is_fitted(self, "network_")
        return self.network_

    def _validate(self, x, reset):
        """`x` as a float32 array of at least 2-D, checked as scikit-learn does (finite, real,
        dense, the fitted features)."""
        x = validate_data(
            self,
            x,
            reset=reset,
            dtype=np.float32,
            allow_nd=True,
            ensure_min_samples=2 if reset else 1,
        )
        if reset:
            self._sample_shape = x.shape[1:]
        elif x.shape[1:] != self._sample_shape:
            raise ValueError(
                f"`{OWNER}` was fitted on samples of shape {self._sample_shape}. Received: "
                f"x of shape {x.shape}"
            )
        return x

    def transform(self, x, batch_size=TRANSFORM_BATCH):
        """Embeds `x` (`(n, ...)`, seen or unseen) with the trained network: `(n, n_components)`
        float32, `batch_size` rows at a time. For a given `batch_size`, each row's
        embedding is the same whatever other rows come with it: the last batch is padded
        to the full size, so every row takes the same arithmetic path."""
        check_is_fitted(self, "network_")
        batch_size = validation.check_size("batch_size", batch_size, OWNER)
        x = self._validate(x, reset=False)
        n = len(x)
        padded = np.concatenate([x, np.zeros((-n % batch_size, *x.shape[1:]), x.dtype)])
        # Each fit's network traces its own predict function: expected, not a retracing
        # problem for TensorFlow to warn of after a few fits.
        with _runtime.quiet_retracing():
            return self.network_.predict(padded, batch_size=batch_size, verbose=0)[:n]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float32"]
        return tags

    def fit_transform(self, x, y=None, **fit_params):
        """`fit(x)` then `transform(x)`."""
        return self.fit(x, **fit_params).transform(x)
