"""Fit-step time of a SparseDense MLP relative to the same MLP built from Dense.

784-1000-1000-1000-10, batch 128, `jit_compile=True`. The models are timed in
turns (one epoch each, repeated) so machine noise hits all of them alike; the
table gives the median step time and its ratio to the dense model.

    python benchmarks/bench_sparse_dense.py [--data ../shared/data/mnist.npz] [--repeats 7]
"""

from __future__ import annotations

import argparse
import platform
import statistics

import keras
import numpy as np
from interleaved import fit_step_times
from keras import ops

from keras_sparse_moe.layers import SparseDense

HIDDEN = (1000, 1000, 1000)


class ForwardMaskedDense(SparseDense):
    """Ablation: multiply the kernel by the mask in the forward pass instead."""

    def call(self, inputs):
        kernel = ops.multiply(self.kernel, ops.cast(self.mask, self.kernel.dtype))
        outputs = ops.add(ops.matmul(inputs, kernel), self.bias)
        return self.activation(outputs)


def mlp(make_layer, seed=0):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((784,))]
    layers += [make_layer(units, "relu") for units in HIDDEN]
    # At epsilon=20 a 1000x10 layer would be denser than full: SET keeps it dense.
    layers += [keras.layers.Dense(10, activation="softmax")]
    model = keras.Sequential(layers)
    model.compile(
        keras.optimizers.SGD(0.01, momentum=0.9),
        "sparse_categorical_crossentropy",
        jit_compile=True,
    )
    return model


def load(path, steps, batch):
    n = steps * batch
    if path:
        with np.load(path) as d:
            x, y = d["x_train"][:n], d["y_train"][:n]
        return x.reshape(len(x), -1).astype("float32") / 255.0, y.astype("int32")
    rng = np.random.default_rng(0)
    return rng.random((n, 784), dtype=np.float32), rng.integers(0, 10, n).astype("int32")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=None, help="an .npz with x_train, y_train")
    parser.add_argument("--epsilon", type=float, default=20.0)
    parser.add_argument("--steps", type=int, default=60, help="steps per timed epoch")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()

    x, y = load(args.data, args.steps, args.batch)
    models = {
        "Dense": mlp(lambda u, a: keras.layers.Dense(u, activation=a)),
        "SparseDense": mlp(lambda u, a: SparseDense(u, epsilon=args.epsilon, activation=a, seed=1)),
        "SparseDense, mask in forward (ablation)": mlp(
            lambda u, a: ForwardMaskedDense(u, epsilon=args.epsilon, activation=a, seed=1)
        ),
    }
    times = fit_step_times(models, x, y, args.batch, args.steps, args.repeats)

    sparse = [layer for layer in models["SparseDense"].layers if isinstance(layer, SparseDense)]
    used = sum(layer.num_connections for layer in sparse)
    dense_weights = sum(int(np.prod(layer.kernel.shape)) for layer in sparse)
    print(
        f"backend={keras.backend.backend()} machine={platform.machine()} "
        f"cpus={__import__('os').cpu_count()} epsilon={args.epsilon} "
        f"hidden kernel weights used={used}/{dense_weights} ({used / dense_weights:.1%})"
    )
    base = statistics.median(times["Dense"])
    print("| model | median step (ms) | ratio to Dense |\n|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med * 1e3:.2f} | {med / base:.3f} |")


if __name__ == "__main__":
    main()
