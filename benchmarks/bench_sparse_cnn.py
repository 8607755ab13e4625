"""Sparse convolutions side by side: dense, static ERK, SET, RigL, pruning and tfmot on CIFAR-10.

Part `cnn`: a 4-conv CNN (conv32-conv32-pool-conv64-conv64-pool-flatten-dense10,
ReLU, Adam 1e-3, batch 128) on the CIFAR-10 subset (4,000 / 1,000 images),
trained in turns one epoch each, so machine noise hits all models alike:
- dense;
- static sparse at 10 % and 5 % of the conv weights, spread by ERK
  (`ksm.sparsify(..., distribution="erk", include=[Conv2D])`);
- SET (zeta 0.3 each epoch) and RigL (every 50 steps, 0.3 cosine) from the 10 % ERK model;
- `MagnitudePruning` from the dense model to 10 % of each conv kernel (polynomial
  over the first 75 % of the steps);
- tfmot `prune_low_magnitude` on the equivalent tf_keras model, same schedule
  (skipped if tfmot / tf_keras are not installed, or with --skip-tfmot).
Reports test accuracy, the fraction of conv weights used and the epoch time
relative to dense, median and fastest of the epochs after the first (masked
storage: a sparse kernel costs a dense one's time; on a shared 2-core machine
epoch times jump between two levels, so both are given).

Part `moe`: seed 003's mixture (two CNN experts, MNIST + CIFAR) with dense experts
and with sparse experts (10 % ERK, static and SET), oracle gate and conv gate:
test accuracy and the activation-rate table of each (see examples/moe_mnist_cifar.py).

    python benchmarks/bench_sparse_cnn.py --data-dir ../shared/data --epochs 15
    python benchmarks/bench_sparse_cnn.py --part moe --data-dir ../shared/data --epochs 4
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys

import keras
import numpy as np

import keras_sparse_moe as ksm

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
sys.path.insert(0, HERE)
from bench_sparse_training import Timed, tfmot_stripped  # noqa: E402
from common import load_named  # noqa: E402
from interleaved import epochs_in_turns  # noqa: E402

FILTERS = (32, 32, 64, 64)


def cnn_layers(module, filters):
    """The CNN's layers from `module` (keras or tf_keras)."""
    L = module.layers
    a, b, c, d = filters
    return [
        L.Conv2D(a, 3, padding="same", activation="relu", name="conv1"),
        L.Conv2D(b, 3, padding="same", activation="relu", name="conv2"),
        L.MaxPooling2D(),
        L.Conv2D(c, 3, padding="same", activation="relu", name="conv3"),
        L.Conv2D(d, 3, padding="same", activation="relu", name="conv4"),
        L.MaxPooling2D(),
        L.Flatten(),
        L.Dense(10, activation="softmax", name="logits"),
    ]


def dense_cnn(filters, seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((32, 32, 3)), *cnn_layers(keras, filters)])


def compiled(model):
    model.compile(
        keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    return model


def sparse_cnn(filters, seed, density):
    dense = dense_cnn(filters, seed)
    return ksm.sparsify(
        dense, density=density, distribution="erk", include=[keras.layers.Conv2D], seed=seed
    )


def conv_weights(model):
    """(used, total) conv kernel weights: connections of sparse layers, nonzeros otherwise."""
    used = total = 0
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, ksm.layers.SparseKernelLayer):
            used += layer.num_connections
            total += math.prod(layer.weight_shape)
        elif type(layer).__name__ == "Conv2D":
            kernel = np.asarray(keras.ops.convert_to_numpy(layer.kernel))
            used += int(np.count_nonzero(kernel))
            total += kernel.size
    return used, total


def tfmot_cnn(filters, seed, density, end_step):
    import tensorflow_model_optimization as tfmot
    import tf_keras

    tf_keras.utils.set_random_seed(seed)
    schedule = tfmot.sparsity.keras.PolynomialDecay(
        0.0, 1.0 - density, begin_step=0, end_step=end_step, frequency=50
    )
    layers = [
        tfmot.sparsity.keras.prune_low_magnitude(layer, pruning_schedule=schedule)
        if isinstance(layer, tf_keras.layers.Conv2D)
        else layer
        for layer in cnn_layers(tf_keras, filters)
    ]
    model = tf_keras.Sequential([tf_keras.layers.Input((32, 32, 3)), *layers])
    model.compile(
        tf_keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    return model, [tfmot.sparsity.keras.UpdatePruningStep()]


def tfmot_conv_weights(model):
    used = total = 0
    for layer in model.layers:
        if type(layer).__name__ == "Conv2D":
            kernel = layer.get_weights()[0]
            used += int(np.count_nonzero(kernel))
            total += kernel.size
    return used, total


def cnn(args):
    data = load_named(args.data_dir, "cifar10")
    x, y = data.x_train.reshape((-1, *data.image_shape)), data.y_train
    xt, yt = data.x_test.reshape((-1, *data.image_shape)), data.y_test
    steps = math.ceil(len(x) / args.batch_size)
    total = steps * args.epochs
    end = int(0.75 * total) // 50 * 50  # schedules prune every 50 steps: end on one
    filters = tuple(args.filters)
    runs = {
        "dense": (compiled(dense_cnn(filters, args.seed)), []),
        "static ERK 10 %": (compiled(sparse_cnn(filters, args.seed, 0.1)), []),
        "static ERK 5 %": (compiled(sparse_cnn(filters, args.seed, 0.05)), []),
        "SET, ERK 10 % (zeta 0.3 / epoch)": (
            compiled(sparse_cnn(filters, args.seed, 0.1)),
            [Timed(ksm.callbacks.SETEvolution(zeta=0.3, seed=args.seed), args.epochs)],
        ),
        "RigL, ERK 10 % (dT 50, 0.3 cosine)": (
            compiled(sparse_cnn(filters, args.seed, 0.1)),
            [
                Timed(
                    ksm.callbacks.RigL(
                        data=(x, y),
                        update_every=50,
                        drop_fraction=0.3,
                        end_step=end,
                        seed=args.seed,
                    ),
                    args.epochs,
                )
            ],
        ),
        "MagnitudePruning to 10 % / layer": (
            compiled(
                ksm.sparsify(
                    dense_cnn(filters, args.seed), density=1.0, include=[keras.layers.Conv2D]
                )
            ),
            [
                Timed(
                    ksm.callbacks.MagnitudePruning(
                        ksm.schedules.PolynomialDecay(
                            0.0, 0.9, begin_step=0, end_step=end, frequency=50
                        )
                    ),
                    args.epochs,
                )
            ],
        ),
    }
    if not args.skip_tfmot:
        try:
            runs["tfmot prune_low_magnitude to 10 % / layer"] = tfmot_cnn(
                filters, args.seed, 0.1, end
            )
        except ImportError as error:
            print(f"tfmot skipped: {error}")
    for name, (model, _) in runs.items():
        if isinstance(model, keras.Model):
            used, all_ = conv_weights(model)
            print(f"{name}: {used:,} of {all_:,} conv weights at the start", flush=True)
    times = epochs_in_turns(
        runs,
        x,
        y,
        args.batch_size,
        args.epochs,
        lambda epoch: print(f"epoch {epoch + 1}/{args.epochs} done", flush=True),
    )
    rows = []
    for name, (model, _) in runs.items():
        if name.startswith("tfmot"):
            model = tfmot_stripped(model)
            used, all_ = tfmot_conv_weights(model)
        else:
            used, all_ = conv_weights(model)
        accuracy = model.evaluate(xt, yt, verbose=0)[1]
        later = times[name][1:] or times[name]  # the first epoch compiles
        rows.append((name, accuracy, used / all_, statistics.median(later), min(later)))
    base, fastest = rows[0][3], rows[0][4]
    print(
        f"\nCIFAR-10 subset ({len(x)} / {len(xt)}), CNN filters {filters}, {args.epochs} epochs, "
        f"batch {args.batch_size}, Adam 1e-3, backend {keras.backend.backend()}, "
        f"{platform.machine()} x{os.cpu_count()}"
    )
    print(f"dense epoch: median {base:.2f} s, fastest {fastest:.2f} s")
    print("| model | test accuracy | conv weights used | epoch time / dense: median | fastest |")
    print("|---|---|---|---|---|")
    for name, accuracy, fraction, seconds, least in rows:
        print(
            f"| {name} | {accuracy:.4f} | {fraction:.2%} | {seconds / base:.2f} | "
            f"{least / fastest:.2f} |"
        )


def moe(args):
    import moe_mnist_cifar

    tables = []
    for label, extra in (
        ("dense experts", []),
        ("sparse experts, ERK 10 %", ["--expert-density", "0.1"]),
        ("sparse experts, ERK 10 % + SET", ["--expert-density", "0.1", "--expert-set"]),
    ):
        print(f"\n##### {label}", flush=True)
        results = moe_mnist_cifar.main(
            [
                "--data-dir",
                args.data_dir,
                "--epochs",
                str(args.epochs),
                "--filters",
                str(args.moe_filters),
                "--gates",
                "oracle",
                "conv",
                "--losses",
                "none",
                "entropy",
                "--seed",
                str(args.seed),
                # The setup its figures were measured with (docs/benchmarks.md).
                "--mixing",
                "probabilities",
                "--gate-size",
                "small",
                "--out",
                os.path.join(args.out, label.replace(" ", "_").replace(",", "").replace("%", "")),
                *extra,
            ]
        )
        tables.append((label, results))
    print(f"\nSeed 003 mixture, {args.epochs} epochs, {args.moe_filters} filters per expert conv")
    print("| experts | gate | test acc | MNIST → e0, e1 | CIFAR → e0, e1 |")
    print("|---|---|---|---|---|")
    for label, results in tables:
        for name, acc, _, _, table, *_ in results:
            m, c = table.values[:2]  # test images
            print(
                f"| {label} | {name} | {acc:.4f} | {m[0]:.3f}, {m[1]:.3f} | "
                f"{c[0]:.3f}, {c[1]:.3f} |"
            )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("cnn", "moe"), default="cnn")
    parser.add_argument("--data-dir", default=os.path.join(HERE, "..", "..", "shared", "data"))
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--filters", type=int, nargs=4, default=list(FILTERS))
    parser.add_argument("--moe-filters", type=int, default=32)
    parser.add_argument("--skip-tfmot", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join("demo_output", "bench_sparse_cnn"))
    args = parser.parse_args(argv)
    {"cnn": cnn, "moe": moe}[args.part](args)


if __name__ == "__main__":
    main()
