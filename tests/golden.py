"""Golden `.keras` files: models saved by one format of the library, which every later
version must load with the same outputs (`tests/test_golden_files.py`).

`python -m tests.golden` writes a new set into `tests/data/golden/FORMAT/`, one
`.keras` file per model and `NAME.npz` with its input and output. Existing
sets are never rewritten: they are what old users' files look like.
"""

import os
import sys

import keras
import numpy as np

import keras_sparse_moe as ksm
from keras_sparse_moe.layers import PTSNEGate, SparseConv2D, SparseDense, SparseExpertMixture

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "golden")


def _mlp(storage):
    return keras.Sequential(
        [
            keras.Input((12,)),
            SparseDense(16, "relu", density=0.3, implementation=storage, seed=1),
            SparseDense(3, density=0.5, implementation=storage, seed=2),
        ]
    )


def _mixture(gate):
    return keras.Sequential(
        [
            keras.Input((12,)),
            SparseExpertMixture(
                units=3,
                num_experts=4,
                expert_units=8,
                route_density=0.1,
                gate=gate,
                top_k=2,
                seed=3,
            ),
        ]
    )


def _map():
    """A small map network (the default one would make a 1 MB file)."""
    return keras.Sequential([keras.layers.Dense(8, activation="relu"), keras.layers.Dense(2)])


def models():
    """name -> (model, input): the models every golden set holds."""
    rng = np.random.default_rng(0)
    x = rng.random((16, 12)).astype("float32")
    images = rng.random((4, 6, 6, 2)).astype("float32")
    cnn = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            SparseConv2D(4, 3, density=0.5, activation="relu", seed=4),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3),
        ]
    )
    return {
        "mlp_masked": (_mlp("masked"), x),
        "mlp_sparse": (_mlp("sparse"), x),
        "conv": (cnn, images),
        "routed_mixture": (_mixture(None), x),
        "ptsne_mixture": (_mixture(PTSNEGate(4, embedding=_map(), perplexity=5.0, seed=5)), x),
    }


def write(folder):
    os.makedirs(folder)
    keras.utils.set_random_seed(0)
    for name, (model, x) in models().items():
        model.compile("adam", "mse")
        y = np.zeros(model.compute_output_shape(x.shape), "float32")
        callbacks = [ksm.callbacks.SETEvolution(zeta=0.3)]
        model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=callbacks)  # evolved masks
        model.save(os.path.join(folder, f"{name}.keras"))
        output = keras.ops.convert_to_numpy(model(x, training=False))
        np.savez(os.path.join(folder, f"{name}.npz"), x=x, y=output)


if __name__ == "__main__":
    folder = os.path.join(HERE, f"format_{ksm.saving.FORMAT_VERSION}")
    if os.path.exists(folder):
        sys.exit(f"{folder} exists: golden sets are never rewritten")
    write(folder)
    print(f"wrote {folder}")
