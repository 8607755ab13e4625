"""Builds and trains the five models of the repeatability test, with no seed but
Keras' global one; prints per line one digest of a model's starting state
("built": its weights and its callbacks' seeds), of its trained weights
("trained"), or of a ParametricTSNE map, for each global seed in turn. Run in a
fresh process:

    python -m tests.repeatable_run GLOBAL_SEED [built:GLOBAL_SEED ...]
"""

import hashlib
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_sparse_moe as ksm  # noqa: E402
from keras_sparse_moe.layers import PTSNEGate, SparseConv2D, SparseDense, SparseExpertMixture  # noqa: E402


def digest(arrays):
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(keras.ops.convert_to_numpy(a)).tobytes())
    return h.hexdigest()[:16]


def fit(model, x, y, callbacks):
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=32, epochs=2, callbacks=callbacks, verbose=0)
    return digest(model.weights)


def built(model, callbacks):
    """The state a run starts from: the initial weights and masks, and the seeds the
    callbacks draw their rewiring from."""
    return digest([*model.weights, np.array([c._seed for c in callbacks])])


def main(seed, train=True):
    keras.utils.set_random_seed(seed)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    x = np.random.rand(128, 16).astype("float32")
    y = np.random.randint(0, 4, 128)
    images = np.random.rand(64, 8, 8, 2).astype("float32")
    runs = {}  # name -> (model, inputs, targets, callbacks)
    for storage in ("masked", "sparse"):
        model = keras.Sequential(
            [
                keras.Input((16,)),
                SparseDense(24, "relu", density=0.3, implementation=storage),
                SparseDense(4, "softmax", density=0.5, implementation=storage),
            ]
        )
        runs[f"mlp {storage} SET"] = (model, x, y, [ksm.callbacks.SETEvolution(zeta=0.3)])
    cnn = keras.Sequential(
        [
            keras.Input((8, 8, 2)),
            SparseConv2D(6, 3, density=0.5, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(4, activation="softmax"),
        ]
    )
    rigl = ksm.callbacks.RigL(data=(images, y[:64]), update_every=1, batch_size=32)
    runs["cnn RigL"] = (cnn, images, y[:64], [rigl])
    for name, gate in (
        ("routed mixture SET", None),
        ("PTSNE mixture", PTSNEGate(4, perplexity=5.0)),
    ):
        mixture = SparseExpertMixture(
            units=4, num_experts=4, expert_units=8, route_density=0.1, gate=gate, top_k=2
        )
        model = keras.Sequential([keras.Input((16,)), mixture, keras.layers.Softmax()])
        runs[name] = (model, x, y, [ksm.callbacks.SETEvolution(zeta=0.3)])
    for name, (model, inputs, targets, callbacks) in runs.items():
        print(f"{seed} built {name}: {built(model, callbacks)}")
        if train:
            print(f"{seed} trained {name}: {fit(model, inputs, targets, callbacks)}")
    tsne = ksm.ParametricTSNE(perplexity=5.0, hidden=(16,), epochs=2, batch_size=64, verbose=0)
    print(f"{seed} trained ParametricTSNE: {digest([tsne.fit_transform(x)])}")


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        # "N": build and train everything under global seed N; "built:N": build the
        # models (their starting state) and fit the ParametricTSNE map only.
        main(int(arg.removeprefix("built:")), train=not arg.startswith("built:"))
