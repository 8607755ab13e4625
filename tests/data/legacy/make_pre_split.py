"""Writes the pre-split files under `tests/data/legacy/pre_split/`: mixtures saved by the
library before its expert bank became a layer of its own (format 0, commit 68337df^).

Kept for the record of how they were made; it runs only against that old tree:

    git archive 68337df^ | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old KERAS_BACKEND=jax python tests/data/legacy/make_pre_split.py
"""

import os

import keras
import numpy as np

import keras_sparse_moe as ksm

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pre_split")


def main():
    x = np.random.default_rng(0).random((8, 12)).astype("float32")
    models = {
        "routed_mixture": ksm.layers.SparseExpertMixture(
            units=3,
            num_experts=4,
            expert_units=8,
            expert_density=0.5,
            route_density=0.1,
            top_k=2,
            seed=3,
        ),
        "noisy_top_k": ksm.layers.SparseExpertMixture(
            units=3,
            num_experts=3,
            expert_units=4,
            gate=ksm.layers.NoisyTopKGate(3, 2, seed=4),
            seed=5,
        ),
        "user_experts": ksm.layers.SparseExpertMixture(
            units=3,
            experts=[keras.layers.Dense(3, name=f"expert_{i}") for i in range(3)],
            top_k=2,
            seed=6,
        ),
    }
    for name, layer in models.items():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((12,)), layer])
        model.save(os.path.join(HERE, f"{name}.keras"))
        np.savez(os.path.join(HERE, f"{name}.npz"), x=x, y=np.asarray(model(x, training=False)))


if __name__ == "__main__":
    main()
