"""Sequence inputs with padding: a Keras mask keeps padded tokens out of the
routing, the capacity, the balancing losses, the expert load and the activation
rates, so padding changes nothing about the real tokens."""

import keras
import numpy as np
import pytest

import keras_sparse_moe as ksm
from keras_sparse_moe import losses
from keras_sparse_moe.layers import SparseExpertMixture
from tests.test_case import to_numpy

RNG = np.random.default_rng(7)
BATCH, REAL, PADDED, DIM = 3, 5, 8, 10
X = RNG.standard_normal((BATCH, REAL, DIM)).astype("float32")
# The same sequences padded to 8 steps with large garbage: it must not matter.
X_PADDED = np.concatenate([X, 50 * RNG.standard_normal((BATCH, PADDED - REAL, DIM))], 1)
X_PADDED = X_PADDED.astype("float32")
MASK = np.ones((BATCH, REAL), bool)
MASK_PADDED = np.arange(PADDED)[None, :] < REAL + np.zeros((BATCH, 1), int)
BUILTIN = dict(units=4, num_experts=4, expert_units=8, expert_density=0.5, seed=0)

CONFIGS = {
    "softmax, entropy": dict(balance_losses="entropy"),
    "top-2 grouped, switch": dict(top_k=2, balance_losses="switch"),
    "top-2 capacity": dict(
        top_k=2,
        capacity_factor=1.0,
        balance_losses={
            "importance_cv2": 0.1,
            "router_z_loss": 0.01,
            "batch_variance": 1.0,
            "sample_variance": 1.0,
        },
    ),
    "expert choice": dict(top_k=1, routing="expert_choice", capacity_factor=1.0),
    "shared + routes, all": dict(
        top_k=2, num_shared_experts=1, route_density=0.3, dispatch="all", balance_losses="entropy"
    ),
}


def _run(layer, x, mask, training):
    layer.reset_statistics()
    y = to_numpy(layer(x, mask=mask, training=training))
    stats = {
        "losses": [float(to_numpy(v)) for v in layer.losses] if training else [],
        "load": None if getattr(layer, "expert_load", None) is None else layer.load_fractions,
        "overflow": layer.overflow_fraction,
    }
    return y, stats


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_padding_changes_nothing_about_the_real_tokens(name, training):
    layer = SparseExpertMixture(**BUILTIN, **CONFIGS[name])
    y, stats = _run(layer, X, MASK, training)
    y_padded, stats_padded = _run(layer, X_PADDED, MASK_PADDED, training)
    np.testing.assert_allclose(y_padded[:, :REAL], y, rtol=1e-4, atol=1e-5)
    assert np.all(y_padded[:, REAL:] == 0)  # padding: zero outputs
    np.testing.assert_allclose(stats_padded["losses"], stats["losses"], rtol=1e-4, atol=1e-6)
    if stats["load"] is not None:
        np.testing.assert_allclose(stats_padded["load"], stats["load"], atol=1e-6)
    assert stats_padded["overflow"] == stats["overflow"]
    if training and layer.loss_names:
        assert stats["losses"]  # the losses were compared, not two empty lists
        # Without the mask the padding does count: the comparison above can fail.
        _, unmasked = _run(layer, X_PADDED, None, training)
        assert not np.allclose(unmasked["losses"], stats["losses"], rtol=1e-4, atol=1e-6)


def test_masked_losses_match_numpy_on_the_real_tokens():
    gates = RNG.dirichlet(np.ones(4), size=12).astype("float32")
    keep = RNG.random(12) < 0.6
    real = gates[keep]
    pairs = [
        (losses.batch_entropy, lambda g: np.log(4) + (g.mean(0) * np.log(g.mean(0))).sum()),
        (losses.sample_entropy, lambda g: -(g * np.log(g)).sum(1).mean()),
        (losses.batch_variance, lambda g: g.mean(0).var()),
        (losses.sample_variance, lambda g: 3 / 16 - g.var(1).mean()),
        (losses.importance_cv2, lambda g: g.sum(0).var() / (g.sum(0).mean() ** 2 + 1e-10)),
        (losses.router_z_loss, lambda g: (np.log(np.exp(g).sum(1)) ** 2).mean()),
    ]
    for function, reference in pairs:
        value = float(to_numpy(function(gates, mask=keep)))
        assert value == pytest.approx(float(reference(real)), rel=1e-5, abs=1e-6), function
    index = np.argmax(gates, 1)
    switch = float(to_numpy(losses.switch_load_balancing(gates, index, alpha=1.0, mask=keep)))
    fraction = np.bincount(index[keep], minlength=4) / keep.sum()
    assert switch == pytest.approx(4 * (fraction * real.mean(0)).sum(), rel=1e-5)


def test_noisy_top_k_load_counts_only_real_tokens():
    layer = SparseExpertMixture(**BUILTIN, gate=ksm.layers.NoisyTopKGate(4, top_k=2))
    layer(X_PADDED)
    routing = layer.gate.route(layer.expert_bank.tokens(X_PADDED), training=False)
    np.testing.assert_allclose(to_numpy(routing.token_load).sum(0), to_numpy(routing.load))
    from keras_sparse_moe.layers.expert_mixture import _load

    kept = to_numpy(_load(routing, MASK_PADDED.reshape(-1)))
    real = to_numpy(layer.gate.route(layer.expert_bank.tokens(X), training=False).load)
    np.testing.assert_allclose(kept, real, atol=1e-6)


def _sequence_model(mixture):
    tokens = keras.Input((None,), dtype="int32")
    hidden = keras.layers.Embedding(30, DIM, mask_zero=True)(tokens)
    pooled = keras.layers.GlobalAveragePooling1D()(mixture(hidden))  # reads the mask
    model = keras.Model(tokens, keras.layers.Dense(2)(pooled))
    model.compile(keras.optimizers.Adam(0.01), "mse", jit_compile=True)
    return model


@pytest.mark.parametrize("name", ["top-2 capacity", "expert choice"])
def test_embedding_mask_reaches_the_mixture_and_passes_on(name):
    keras.utils.set_random_seed(0)
    mixture = SparseExpertMixture(**BUILTIN, **CONFIGS[name])
    model = _sequence_model(mixture)
    ids = RNG.integers(1, 30, (BATCH, REAL))
    padded = np.concatenate([ids, np.zeros((BATCH, PADDED - REAL), int)], 1)
    np.testing.assert_allclose(to_numpy(model(padded)), to_numpy(model(ids)), atol=1e-5)
    # Training runs compiled with the mask; the load counts the real tokens only.
    mixture.reset_statistics()
    model.fit(padded, np.zeros((BATCH, 2)), epochs=1, verbose=0)
    if mixture.counts_load:
        load = to_numpy(mixture.expert_load)
        assert load.sum() == BATCH * REAL * mixture.top_k
    # The activation rates count the real tokens only.
    rates = ksm.routing.activation_rates(model, {"padded": padded, "ids": ids}, verbose=False)
    np.testing.assert_allclose(rates.values[0], rates.values[1], atol=1e-5)


def test_a_mask_of_the_wrong_rank_is_refused():
    layer = SparseExpertMixture(**BUILTIN)
    with pytest.raises(ValueError, match="mask over the leading axes"):
        layer(X, mask=np.ones((BATCH,), bool))
