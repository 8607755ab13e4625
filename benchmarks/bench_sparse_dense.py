"""Fit-step time of a SparseDense MLP relative to the same MLP built from Dense.

784-1000-1000-1000-10, batch 128, `jit_compile=True`. The models are timed in
turns (one epoch each, repeated) so machine noise hits all of them alike; the
table gives the median step time and its ratio to the dense model.

    python benchmarks/bench_sparse_dense.py [--data ../shared/data/mnist.npz] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys

import keras
import numpy as np
from interleaved import fit_step_times
from keras import ops

import keras_sparse_moe as ksm
from keras_sparse_moe.layers import SparseDense

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from common import build_mlp, dense_layer  # noqa: E402


class ForwardMaskedDense(SparseDense):
    """Ablation: multiply the kernel by the mask in the forward pass instead."""

    def call(self, inputs):
        kernel = ops.multiply(self.kernel, ops.cast(self.mask, self.kernel.dtype))
        outputs = ops.add(ops.matmul(inputs, kernel), self.bias)
        return self.activation(outputs)


@ops.custom_gradient
def _multiply_masked_gradient(kernel, mask):
    def grad(*args, upstream=None):
        upstream = args[0] if upstream is None else upstream
        return upstream * ops.cast(mask, upstream.dtype), ops.zeros_like(mask)

    return ops.copy(kernel), grad


class ProductMaskedDense(SparseDense):
    """Ablation: the gradient masked by a product (`g * mask`, NaN-unsafe) instead of a select."""

    def dense_kernel(self):
        return _multiply_masked_gradient(ops.copy(self.kernel), ops.copy(self.mask))


def mlp(hidden_layer, seed=0):
    return build_mlp(
        hidden_layer, optimizer=keras.optimizers.SGD(0.01, momentum=0.9), metrics=(), seed=seed
    )


def load(path, steps, batch):
    n = steps * batch
    if path:
        data = ksm.datasets.load_image_classification(path)
        return data.x_train[:n], data.y_train[:n]
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
        "Dense": mlp(dense_layer),
        "SparseDense": mlp(
            lambda units, i: SparseDense(units, epsilon=args.epsilon, activation="relu", seed=1)
        ),
        "SparseDense, gradient masked by a product (ablation)": mlp(
            lambda units, i: ProductMaskedDense(
                units, epsilon=args.epsilon, activation="relu", seed=1
            )
        ),
        "SparseDense, mask in forward (ablation)": mlp(
            lambda units, i: ForwardMaskedDense(
                units, epsilon=args.epsilon, activation="relu", seed=1
            )
        ),
    }
    times = fit_step_times(models, x, y, args.batch, args.steps, args.repeats)

    sparse = [layer for layer in models["SparseDense"].layers if isinstance(layer, SparseDense)]
    used = sum(layer.num_connections for layer in sparse)
    dense_weights = sum(int(np.prod(layer.kernel.shape)) for layer in sparse)
    print(
        f"backend={keras.backend.backend()} machine={platform.machine()} "
        f"cpus={os.cpu_count()} epsilon={args.epsilon} "
        f"hidden kernel weights used={used}/{dense_weights} ({used / dense_weights:.1%})"
    )
    base = statistics.median(times["Dense"])
    print("| model | median step (ms) | ratio to Dense |\n|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med * 1e3:.2f} | {med / base:.3f} |")


if __name__ == "__main__":
    main()
