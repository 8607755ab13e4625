"""Dynamic sparse training side by side: dense, static sparse, SET, RigL and tfmot pruning.

Part `training`: 784-1000-1000-1000-10 MLPs (ReLU, batch 128; Adam 1e-3, or with
`--optimizer sgd --dropout 0.3` the SET paper's SGD and dropout), same epochs for all,
trained in turns, one epoch each, so machine noise hits all alike. The sparse
models use SparseDense(epsilon=20) hidden layers (~4 % of their weights); tfmot's
`prune_low_magnitude` prunes the equivalent tf_keras dense model to the same
per-layer density (polynomial schedule over the first 75 % of training).

Part `rewiring`: time of one SET evolution and one RigL drop/grow (gradient
excluded) of a 1024x1024 layer at epsilon=20, median of repeats, each after an
(untimed) training step as inside `fit`, and back to back.

    python benchmarks/bench_sparse_training.py --data-dir ../shared/data --epochs 10
    python benchmarks/bench_sparse_training.py --datasets mnist --epochs 30 \
        --optimizer sgd --dropout 0.3
    python benchmarks/bench_sparse_training.py --part rewiring
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import keras
import numpy as np

import keras_sparse_moe as ksm
from keras_sparse_moe.callbacks.rigl import dense_kernel_gradients
from keras_sparse_moe.layers import SparseDense

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from common import EPSILON, HIDDEN, build_mlp, dense_layer, load_named, sparse_layer  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from interleaved import epochs_in_turns  # noqa: E402


def make_optimizer(name, module):
    """Adam 1e-3, or the SET paper's SGD (lr 0.01, momentum 0.9), from keras or tf_keras."""
    if name == "sgd":
        return module.optimizers.SGD(0.01, momentum=0.9)
    return module.optimizers.Adam(1e-3)


def keras3_mlp(sparse, seed, optimizer="adam", dropout=0.0):
    return build_mlp(
        sparse_layer(EPSILON, seed) if sparse else dense_layer,
        optimizer=make_optimizer(optimizer, keras),
        dropout=dropout,
        seed=seed,
    )


def tfmot_mlp(densities, end_step, seed, optimizer="adam", dropout=0.0):
    import tensorflow_model_optimization as tfmot
    import tf_keras

    tf_keras.utils.set_random_seed(seed)
    layers = [tf_keras.layers.Input((784,))]
    for units, density in zip(HIDDEN, densities):
        schedule = tfmot.sparsity.keras.PolynomialDecay(
            0.0, 1.0 - density, begin_step=0, end_step=end_step, frequency=100
        )
        layers.append(
            tfmot.sparsity.keras.prune_low_magnitude(
                tf_keras.layers.Dense(units, activation="relu"), pruning_schedule=schedule
            )
        )
        if dropout:
            layers.append(tf_keras.layers.Dropout(dropout))
    layers.append(tf_keras.layers.Dense(10, activation="softmax"))
    model = tf_keras.Sequential(layers)
    model.compile(
        make_optimizer(optimizer, tf_keras),
        "sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model, [tfmot.sparsity.keras.UpdatePruningStep()]


def tfmot_stripped(model):
    """A tfmot-pruned tf_keras model without its pruning wrappers, compiled to evaluate."""
    import tensorflow_model_optimization as tfmot

    model = tfmot.sparsity.keras.strip_pruning(model)
    model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


class Timed(keras.callbacks.Callback):
    """Wraps a callback and adds up the seconds its hooks take.

    The models are trained one `fit(initial_epoch=e, epochs=e + 1)` at a time
    (in turns); the wrapped callback is told the whole run's epoch count so SET
    knows which epoch is really the last and RigL's schedule spans the run.
    """

    def __init__(self, inner, total_epochs):
        super().__init__()
        self.inner, self.seconds, self.total_epochs = inner, 0.0, total_epochs
        self.rewired = 0
        self.longest = 0.0  # the first rewiring, which compiles the per-layer functions

    def set_model(self, model):
        super().set_model(model)
        self.inner.set_model(model)

    def set_params(self, params):
        super().set_params(params)
        self.inner.set_params({**params, "epochs": self.total_epochs})

    def _timed(name):  # noqa: N805 - a decorator factory used in the class body
        def hook(self, *args, **kwargs):
            start = time.perf_counter()
            getattr(self.inner, name)(*args, **kwargs)
            elapsed = time.perf_counter() - start
            self.seconds += elapsed
            self.longest = max(self.longest, elapsed)
            logs = args[1] if len(args) > 1 else kwargs.get("logs")
            if name == "on_epoch_end" and logs:
                self.rewired += int(logs.get(f"{self.inner.name}/rewired", 0))

        return hook

    on_train_begin = _timed("on_train_begin")
    on_epoch_begin = _timed("on_epoch_begin")
    on_epoch_end = _timed("on_epoch_end")
    on_train_batch_end = _timed("on_train_batch_end")


def hidden_weights(model):
    used = total = 0
    for layer in model.layers:
        if isinstance(layer, SparseDense):
            used += layer.num_connections
            total += int(np.prod(layer.kernel.shape))
        elif hasattr(layer, "kernel") and layer.kernel.shape[-1] != 10:
            weights = np.asarray(layer.kernel)
            used += int(np.count_nonzero(weights))
            total += weights.size
    return used, total


def training(args):
    rows = []
    for dataset in args.datasets:
        data = load_named(args.data_dir, dataset)
        x, y, xt, yt = data.x_train, data.y_train, data.x_test, data.y_test
        steps = int(np.ceil(len(x) / args.batch_size))
        total_steps = steps * args.epochs
        recipe = {"optimizer": args.optimizer, "dropout": args.dropout}
        sparse_probe = keras3_mlp(True, args.seed)
        densities = [
            layer.actual_density for layer in sparse_probe.layers if isinstance(layer, SparseDense)
        ]
        runs = {
            "Dense MLP": (keras3_mlp(False, args.seed, **recipe), []),
            "static sparse": (keras3_mlp(True, args.seed, **recipe), []),
            "SET (zeta=0.3, per epoch)": (
                keras3_mlp(True, args.seed, **recipe),
                [Timed(ksm.callbacks.SETEvolution(zeta=0.3, seed=args.seed), args.epochs)],
            ),
            "RigL (dT=100, 0.3, cosine)": (
                keras3_mlp(True, args.seed, **recipe),
                [
                    Timed(
                        ksm.callbacks.RigL(data=(x, y), update_every=100, seed=args.seed),
                        args.epochs,
                    )
                ],
            ),
        }
        if not args.skip_tfmot:
            runs["tfmot prune_low_magnitude"] = tfmot_mlp(
                densities, int(0.75 * total_steps), args.seed, **recipe
            )
        if args.models:
            runs = {name: run for name, run in runs.items() if name.split()[0] in args.models}

        def progress(epoch, dataset=dataset, runs=runs, xt=xt, yt=yt):
            line = f"{dataset}: epoch {epoch + 1}/{args.epochs} done"
            if args.eval_every and (epoch + 1) % args.eval_every == 0:
                accuracies = (
                    f"{name.split()[0]} {model.evaluate(xt, yt, verbose=0)[1]:.4f}"
                    for name, (model, _) in runs.items()
                )
                line += "; test accuracy so far: " + ", ".join(accuracies)
            print(line, flush=True)

        epoch_times = epochs_in_turns(runs, x, y, args.batch_size, args.epochs, progress)
        wall = {name: sum(seconds) for name, seconds in epoch_times.items()}
        for name, (model, callbacks) in runs.items():
            if name.startswith("tfmot"):
                model = tfmot_stripped(model)
            _, accuracy = model.evaluate(xt, yt, verbose=0)
            used, total = hidden_weights(model)
            timed = [c for c in callbacks if isinstance(c, Timed)]
            overhead = sum(c.seconds for c in timed)
            steady = overhead - sum(c.longest for c in timed)
            rewired = sum(c.rewired for c in timed) if timed else None
            rows.append(
                (
                    dataset,
                    name,
                    accuracy,
                    used / total,
                    wall[name],
                    statistics.median(epoch_times[name][1:] or epoch_times[name]),
                    overhead / wall[name] if overhead else None,
                    steady / wall[name] if overhead else None,
                    rewired,
                )
            )
    base = {r[0]: r[5] for r in rows if r[1] == "Dense MLP"}  # else relative to the first
    print(
        f"\n{args.epochs} epochs, batch {args.batch_size}, "
        f"{'SGD 0.01 momentum 0.9' if args.optimizer == 'sgd' else 'Adam 1e-3'}, "
        f"dropout {args.dropout:g}, backend "
        f"{keras.backend.backend()}, {platform.machine()} x{os.cpu_count()}"
    )
    print(
        "| data | model | test accuracy | hidden weights used | wall (s) | epoch time / dense "
        "| callback share of time | same, without the first (compiling) call "
        "| connections rewired |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for data, name, acc, frac, wall_s, epoch_s, share, steady, rewired in rows:
        share_s = f"{share:.2%} | {steady:.2%}" if share is not None else "- | -"
        rewired_s = f"{rewired:,}" if rewired is not None else "-"
        print(
            f"| {data} | {name} | {acc:.4f} | {frac:.2%} | {wall_s:.0f} | "
            f"{epoch_s / base.setdefault(data, epoch_s):.3f} | {share_s} | {rewired_s} |"
        )


def rewiring(args):
    x = np.random.default_rng(0).random((256, 1024), dtype=np.float32)
    model = keras.Sequential([keras.Input((1024,)), SparseDense(1024, epsilon=EPSILON, seed=0)])
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    set_cb = ksm.callbacks.SETEvolution(zeta=0.3, seed=0)
    rigl_cb = ksm.callbacks.RigL(data=(x, x), update_every=10**9, end_step=10**9, seed=0)
    model.fit(x, x, epochs=1, verbose=0, callbacks=[set_cb, rigl_cb])
    layer = model.layers[0]
    nnz = layer.num_connections
    # A real dense gradient (one batch): magnitudes |x_i * delta_j| with the
    # row and column structure the growth selection meets in training.
    grad = dense_kernel_gradients(model, [layer], x[:128], x[:128])[0]

    def rigl_once():
        # Returns once the compiled step has run: it reads the step's flags back,
        # as SET's `evolve` does (no further read, which would time the script).
        rigl_cb.update(0.3, gradients=[grad])

    def train_step():
        model.train_on_batch(x[:128], x[:128])

    def set_once():
        # As in `fit`, each evolution comes at a later optimizer step: regrowth is
        # drawn from (seed, step), so two at the same step would draw the candidates
        # the first just took and redo the step with more (twice the time).
        set_cb._step += 1
        set_cb.evolve()

    # Inside `fit` a rewiring follows training steps. Back to back, a third of the
    # weights are still the exact zeros the last rewiring regrew: one large tie,
    # the slowest case for the drop selection.
    timings = [
        ("SET evolution, after a training step (as in fit)", set_once, train_step),
        ("SET evolution, back to back (1/3 of weights exact zeros)", set_once, None),
        ("RigL drop/grow, after a training step (dense gradient given)", rigl_once, train_step),
        ("RigL drop/grow, back to back", rigl_once, None),
    ]
    print(
        f"1024x1024 layer, epsilon={EPSILON:g}: {nnz} connections, zeta/drop fraction 0.3; "
        f"backend {keras.backend.backend()}, {platform.machine()} x{os.cpu_count()}"
    )
    print("| operation | median (ms) | min (ms) |\n|---|---|---|")
    for name, fn, before in timings:
        fn()  # compile
        samples = []
        for _ in range(args.repeats):
            if before is not None:
                before()  # not timed
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        print(f"| {name} | {statistics.median(samples):.2f} | {min(samples):.2f} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("training", "rewiring"), default="training")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--datasets", nargs="+", default=["mnist", "fashion_mnist"])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--eval-every",
        type=int,
        default=0,
        metavar="N",
        help="print the test accuracy of every model after every N epochs",
    )
    parser.add_argument("--skip-tfmot", action="store_true")
    parser.add_argument(
        "--models",
        nargs="+",
        choices=("Dense", "static", "SET", "RigL", "tfmot"),
        help="train only these (default: all)",
    )
    parser.add_argument(
        "--optimizer",
        choices=("adam", "sgd"),
        default="adam",
        help="adam: Adam 1e-3; sgd: the SET paper's SGD, lr 0.01, momentum 0.9",
    )
    parser.add_argument("--dropout", type=float, default=0.0, help="after each hidden layer")
    args = parser.parse_args()
    if args.eval_every < 0:
        parser.error(f"--eval-every must be 0 (off) or a number of epochs, got {args.eval_every}")
    (training if args.part == "training" else rewiring)(args)


if __name__ == "__main__":
    main()
