"""Sparse MLPs vs a dense MLP on MNIST: same architecture, a few percent of the weights.

Trains 784-1000-1000-1000-10 three times: with `keras.layers.Dense` hidden
layers; with `keras_sparse_moe.layers.SparseDense` (Erdős–Rényi, SET's
epsilon=20) kept static; and with the same sparse layers evolved by SET
(`keras_sparse_moe.callbacks.SETEvolution`) inside `model.fit`. Prints a
results table and writes the accuracy curves and the SET paper's picture of the
connections each input pixel keeps.

    python examples/mnist_mlp.py [--data mnist.npz] [--epochs 3] [--out demo_output]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

# Before TensorFlow loads: the tables and progress bars, not TensorFlow's C++ log lines.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras

import keras_sparse_moe as ksm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import build_mlp, dense_layer, sparse_layer, weight_count  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=None, help=".npz with x_train, y_train, x_test, y_test")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epsilon", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="demo_output", help="folder for the pictures")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    data = ksm.datasets.load_image_classification(args.data)
    print(f"data: {data.name}, {len(data.x_train)} train / {len(data.x_test)} test images")
    keras.utils.set_random_seed(args.seed)

    def sparse_mlp():
        return build_mlp(sparse_layer(args.epsilon, args.seed), dim, data.num_classes)

    dim = data.x_train.shape[1]
    set_name = f"SparseDense MLP + SET (epsilon={args.epsilon:g}, zeta=0.3)"
    runs = {
        "Dense MLP": (build_mlp(dense_layer, dim, data.num_classes), []),
        f"SparseDense MLP, static (epsilon={args.epsilon:g})": (sparse_mlp(), []),
        set_name: (sparse_mlp(), [ksm.callbacks.SETEvolution(zeta=0.3, seed=args.seed)]),
    }
    rows, histories = [], {}
    for name, (model, callbacks) in runs.items():
        print(f"\n== {name}")
        history = model.fit(
            data.x_train,
            data.y_train,
            batch_size=args.batch_size,
            epochs=args.epochs,
            validation_data=(data.x_test, data.y_test),
            callbacks=callbacks,
            verbose=1 if os.environ.get("CI") is None else 2,
        )
        histories[name] = history.history
        _, accuracy = model.evaluate(data.x_test, data.y_test, verbose=0)
        used, full = weight_count(model)
        rows.append((name, accuracy, used, full))

    print(f"\nResults on {data.name} after {args.epochs} epochs")
    print("| model | test accuracy | weights used | weights of the dense model |")
    print("|---|---|---|---|")
    for name, accuracy, used, full in rows:
        print(f"| {name} | {accuracy:.4f} | {used:,} ({used / full:.1%}) | {full:,} |")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "accuracy.png")
    try:
        ksm.plots.accuracy_curves(histories, path=path)
        print(f"wrote {path}")
    except ImportError:
        print("matplotlib is not installed (pip install keras-sparse-moe[plots]): no picture")
    try:
        first = runs[set_name][0].layers[1]
        path = os.path.join(args.out, "input_connectivity.png")
        ksm.plots.input_connectivity(
            first, data.image_shape, path=path, title="connections per pixel after SET"
        )
        print(f"wrote {path}")
    except ImportError as error:
        print(error)


if __name__ == "__main__":
    main()
