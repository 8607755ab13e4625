"""Models, callbacks and checks shared by the distribution tests and the multi-worker script.

Every case trains with plain SGD on a fixed batch order, so a run over N
replicas (same global batch) follows the single-device run up to float
summation order: the replicas' mean gradient is the global batch's gradient.
"""

import keras
import numpy as np

import keras_sparse_moe as ksm
from keras_sparse_moe.callbacks import MagnitudePruning, RigL, SETEvolution
from keras_sparse_moe.schedules import PolynomialDecay

RNG = np.random.default_rng(7)
X = RNG.random((128, 20), dtype=np.float32)
Y = (X[:, :4] @ RNG.standard_normal((4, 3))).argmax(-1).astype("int32")
GATE_INDEX = (X[:, 0] > 0.5).astype("int32")
BATCH = 32
EPOCHS = 2
# Weights after a few SGD steps agree to float32 summation order.
ATOL = 2e-5


def mlp():
    """Two sparse layers, one per storage, so every case covers both."""
    return keras.Sequential(
        [
            keras.Input((20,)),
            ksm.layers.SparseDense(32, density=0.3, activation="relu", seed=0, name="masked"),
            ksm.layers.SparseDense(
                32, density=0.3, activation="relu", implementation="sparse", seed=1, name="sparse"
            ),
            keras.layers.Dense(3, name="head"),
        ],
        name="mlp",
    )


def n_m_mlp():
    """`mlp` with 2:4 layers (both storages), for rewiring that keeps every group."""
    return keras.Sequential(
        [
            keras.Input((20,)),
            ksm.layers.SparseDense(32, n_m=(2, 4), activation="relu", seed=0, name="masked"),
            ksm.layers.SparseDense(
                32, n_m=(2, 4), activation="relu", implementation="sparse", seed=1, name="sparse"
            ),
            keras.layers.Dense(3, name="head"),
        ],
        name="n_m_mlp",
    )


def assert_exactly_n_m(model, n=2, m=4):
    for layer in model.layers:
        if isinstance(layer, ksm.layers.SparseKernelLayer):
            counts = layer.dense_mask().reshape(-1, m, layer.kernel_shape[1]).sum(axis=1)
            assert (counts == n).all(), layer.name


def mixture(gate=None, oracle=False, **kwargs):
    """A mixture of 4 built-in experts before a dense head (`oracle`: gate reads an index)."""
    x = keras.Input((20,), name="x")
    inputs = [x]
    moe = ksm.layers.SparseExpertMixture(
        units=8, num_experts=4, expert_units=16, gate=gate, seed=0, name="moe", **kwargs
    )
    if oracle:
        index = keras.Input((), dtype="int32", name="index")
        inputs.append(index)
        h = moe(x, gate_inputs=index)
    else:
        h = moe(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(h), name="moe_model")


def user_expert_mixture():
    experts = [
        keras.Sequential(
            [ksm.layers.SparseDense(8, density=0.3, activation="relu", seed=i)], name=f"user_{i}"
        )
        for i in range(2)
    ]
    x = keras.Input((20,))
    h = ksm.layers.SparseExpertMixture(experts=experts, name="moe")(x)
    return keras.Model(x, keras.layers.Dense(3, name="head")(h), name="user_moe")


CALLBACKS = {
    "set": lambda: SETEvolution(update_every=3, zeta=0.2, seed=5),
    "rigl": lambda: RigL((X, Y), update_every=3, drop_fraction=0.3, end_step=12, seed=5),
    "pruning": lambda: MagnitudePruning(PolynomialDecay(0.5, 0.9, 0, 12, frequency=3)),
}


def bias_balanced_mixture():
    """A top-1 mixture whose gate favours expert 0, balanced by `BiasBalancing`."""
    model = mixture(top_k=1, selection_bias=True)
    model.get_layer("moe").gate.network.bias.assign(np.array([1.0, 0, 0, 0], "float32"))
    return model


def _fit_bias_balanced(model):
    """`fit` with `BiasBalancing`; returns the history and the final bias."""
    callback = ksm.callbacks.BiasBalancing(rate=0.05)
    history = fit(model, callback)
    return history, keras.ops.convert_to_numpy(model.get_layer("moe").expert_bias)


def bias_balancing_matches_one_device(scope):
    """Trains `bias_balanced_mixture` on one device and inside `scope` (a strategy's or
    a distribution's) from the same weights; checks that both move the bias alike and
    see the same load. Returns `(distributed model, one-device model)` with their load
    counts reset (under `tf.distribute` a count reads as the replicas' mean)."""
    reference = compile_model(bias_balanced_mixture())
    weights = reference.get_weights()
    single, single_bias = _fit_bias_balanced(reference)
    with scope:
        model = compile_model(bias_balanced_mixture())
        model.set_weights(weights)
        history, bias = _fit_bias_balanced(model)
    assert np.abs(single_bias).max() > 0
    np.testing.assert_allclose(bias, single_bias, atol=1e-7)
    np.testing.assert_allclose(history["moe/max_violation"], single["moe/max_violation"])
    moe, single_moe = model.get_layer("moe"), reference.get_layer("moe")
    np.testing.assert_allclose(moe.load_fractions, single_moe.load_fractions)
    for layer in (moe, single_moe):
        layer.reset_statistics()
    return model, reference


def compile_model(model):
    model.compile(
        keras.optimizers.SGD(0.1, momentum=0.9),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def fit(model, callback, inputs=X):
    history = model.fit(
        inputs, Y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, callbacks=[callback], verbose=0
    )
    return history.history


def rewired(history):
    """Connections replaced over the run (`History.history`)."""
    return sum(sum(v) for k, v in history.items() if k.endswith("/rewired"))


def connections(model):
    """Per sparse layer: its connection set, as sorted flat positions."""
    found = {}
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, ksm.layers.SparseKernelLayer):
            layer.refresh_connections()  # read the storage itself, not a cache
            rows, cols = (np.asarray(a) for a in layer.connection_indices())
            found[layer.name] = np.sort(rows.astype(np.int64) * layer.kernel_shape[1] + cols)
    return found


def assert_same_training(model, reference, atol=ATOL):
    """Same connections, weights within `atol`."""
    got, want = connections(model), connections(reference)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    for variable, expected in zip(model.weights, reference.get_weights()):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(variable),
            expected,
            atol=atol,
            err_msg=variable.path,
        )


def custom_loop_fit(model, callback, strategy):
    """`fit` written out: `strategy.run` steps, the callback driven through its hooks.

    For `MultiWorkerMirroredStrategy`, which Keras 3's `fit` does not run
    (keras-team/keras#20585, its symbolic build reduces the first batch with
    an op that rejects per-replica values). Worker `i` of `n` reads the `i`-th
    slice of each global batch, so the workers' steps add up to one device's.
    """
    import tensorflow as tf

    workers = strategy.num_replicas_in_sync
    per_replica = BATCH // workers

    def dataset_fn(context):
        index = context.input_pipeline_id
        rows = np.arange(len(X)).reshape(-1, workers, per_replica)[:, index].reshape(-1)
        return tf.data.Dataset.from_tensor_slices((X[rows], Y[rows])).batch(per_replica)

    dataset = strategy.distribute_datasets_from_function(dataset_fn)
    steps = len(X) // BATCH
    with strategy.scope():
        model.optimizer.build(model.trainable_variables)

    @tf.function
    def train_step(x, y):
        def replica_step(x, y):
            with tf.GradientTape() as tape:
                # Keras scales the loss by 1 / num_replicas_in_sync.
                loss = model.compute_loss(x=x, y=y, y_pred=model(x, training=True))
            variables = model.trainable_variables
            model.optimizer.apply(tape.gradient(loss, variables), variables)
            return loss

        losses = strategy.run(replica_step, args=(x, y))
        return strategy.reduce("SUM", losses, axis=None)

    history = keras.callbacks.History()
    callbacks = keras.callbacks.CallbackList(
        [callback, history], model=model, epochs=EPOCHS, steps=steps
    )
    callbacks.on_train_begin()
    for epoch in range(EPOCHS):
        callbacks.on_epoch_begin(epoch)
        for batch, (x, y) in enumerate(dataset):
            logs = {"loss": float(train_step(x, y))}
            callbacks.on_train_batch_end(batch, logs)
        callbacks.on_epoch_end(epoch, logs)  # the last batch's loss
    callbacks.on_train_end()
    history = history.history
    return history
