"""Two experts, two datasets: does the gate learn to send MNIST to one and CIFAR to the other?

Seed 003's experiment. MNIST and CIFAR-10 become one 20-class problem (digits
are classes 0-9, CIFAR classes 10-19), all images 32x32 grey. A
`keras_sparse_moe.layers.SparseExpertMixture` mixes two CNN experts
(conv-pool-conv-pool-dense128-dense20) with
- an oracle gate (`OracleGate`: MNIST to expert 0, CIFAR to expert 1),
- the seed's conv gate (conv64 x2 without activation, each followed by pooling,
  then dense 64 ReLU, dense 2 softmax) and dense gate (dense 64 ReLU, dense 2
  softmax), as `SoftmaxGate`s; `--gate-size small` takes smaller ones (conv16
  ReLU x2 then dense 2; dense 2),
each learned gate trained with no gate loss, with the entropy loss and with the
variance loss (`balance_losses="entropy"` / `"variance"`: 0.1 * batch term +
0.01 * sample term).

Routing (`--routings`, two experts, the learned gates): `softmax` (default:
every expert weighted by the gate), `top_k` (each image to its top-1 expert;
in training each expert computes only its images, `capacity_factor=1.25`),
`bias` (top-1 chosen by gate + a per-expert bias that
`keras_sparse_moe.callbacks.BiasBalancing` moves against the load, no loss),
`expert_choice` (each expert takes the half of the batch it scores highest,
no loss) and `shared` (top-1 routed plus a third CNN expert every image
visits, `shared_experts`). The table adds each expert's share of the training
images (load) and the median training step time. Expert choice routes by the
batch: the test images are shuffled for the test accuracy, and the per-dataset
accuracies (batches of one dataset) show what it does to unmixed batches.

Mixing (`--mixing`): `logits` (default, the seed's `softmax(sum_e G_e NN_e(x))`:
the experts end in a linear layer, one softmax follows the mixture) or
`probabilities` (each expert ends in a softmax and the mixture averages the
distributions). `--gate-lr-multiplier F` trains the gate at F times the
experts' learning rate (`keras_sparse_moe.optimizers.scale_learning_rates`).

Prints test accuracy and the activation-rate tables (mean gate value per dataset
and expert; ideal = identity) on training and on test images for every run,
and writes the train and test accuracy curves, the tables as pictures and a
markdown summary. With `--expert-density D` the
experts' convolutions and hidden Dense layer become sparse (`ksm.sparsify`,
ERK over the expert's layers, the 20-way output kept dense) holding the
fraction D of those weights; `--expert-set` then evolves them with SET.

The CIFAR file in ../shared/data is a 4,000/1,000 subset, so MNIST is
subsampled to 4,000/1,000 to match.

    python examples/moe_mnist_cifar.py --data-dir ../shared/data [--epochs 4] [--filters 128]
    python examples/moe_mnist_cifar.py --data-dir ../shared/data --expert-density 0.1
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# Before TensorFlow loads: the tables and progress bars, not TensorFlow's C++ log lines.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
from keras import ops

import keras_sparse_moe as ksm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import load_named  # noqa: E402

GATES = ("oracle", "conv", "dense")
LOSSES = ("none", "entropy", "variance")
ROUTINGS = ("softmax", "top_k", "bias", "expert_choice", "shared")
BALANCED = ("bias", "expert_choice")  # balance without a gate loss
MNIST, CIFAR = 0, 1


def load(data_dir, samples, test_samples, seed):
    """Grey 32x32 images in [0, 1], 20-class labels and the dataset index of each image."""
    rng = np.random.default_rng(seed)
    parts = {}
    for index, name in ((MNIST, "mnist"), (CIFAR, "cifar10")):
        if not os.path.exists(os.path.join(data_dir, f"{name}.npz")):
            raise FileNotFoundError(
                f"{name}.npz not found in {data_dir}: pass --data-dir with mnist.npz and "
                "cifar10.npz"
            )
        data = load_named(data_dir, name)
        for split, count in (("train", samples), ("test", test_samples)):
            x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
            pick = rng.permutation(len(x))[: min(count, len(x))]
            x = x[pick].reshape((-1, *data.image_shape))  # in [0, 1]
            if x.ndim == 4:  # CIFAR: RGB to grey (ITU-R 601 luma)
                x = x @ np.array([0.299, 0.587, 0.114], dtype="float32")
            x = x[..., None]
            if x.shape[1:3] != (32, 32):
                x = ops.convert_to_numpy(ops.image.resize(x, (32, 32)))
            parts.setdefault(split, []).append(
                (x, y[pick] + 10 * index, np.full(len(x), index, "int32"))
            )
    return {split: [np.concatenate(a) for a in zip(*chunks)] for split, chunks in parts.items()}


def conv_expert(filters, name, density=None, seed=0, output_activation="softmax"):
    """Seed 003's CNN expert; with `density`, its convolutions and hidden Dense layer
    are sparse (ERK over them at that global density; the output layer stays dense).
    `output_activation=None` makes it return logits (for logit mixing)."""
    expert = keras.Sequential(
        [
            keras.Input((32, 32, 1)),
            keras.layers.Conv2D(filters, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(filters, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(20, activation=output_activation, name=f"{name}_output"),
        ],
        name=name,
    )
    if density is None:
        return expert
    return ksm.sparsify(
        expert, density=density, distribution="erk", exclude=[f"{name}_output"], seed=seed
    )


def gate_network(kind, size):
    """The gate's network, ending in 2 logits (`SoftmaxGate` applies the softmax)."""
    if size == "seed":  # seed 003's gates
        if kind == "conv":
            return [
                keras.layers.Conv2D(64, 3, padding="same"),  # no activation, as the seed
                keras.layers.MaxPooling2D(),
                keras.layers.Conv2D(64, 3, padding="same"),
                keras.layers.MaxPooling2D(),
                keras.layers.Flatten(),
                keras.layers.Dense(64, activation="relu"),
                keras.layers.Dense(2),
            ]
        return [
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(2),
        ]
    if kind == "conv":  # smaller: half the time of the seed's conv gate
        return [
            keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(2),
        ]
    return [keras.layers.Flatten(), keras.layers.Dense(2)]


def make_gate(kind, size="seed"):
    if kind == "oracle":
        return ksm.layers.OracleGate(2)
    network = keras.Sequential(gate_network(kind, size), name=f"{kind}_gate_network")
    return ksm.layers.SoftmaxGate(2, network=network, name="gate")


def build(
    gate_kind,
    loss,
    filters,
    expert_density=None,
    seed=0,
    mixing="logits",
    gate_size="seed",
    gate_lr_multiplier=1.0,
    routing="softmax",
):
    image = keras.Input((32, 32, 1), name="image")
    activation = None if mixing == "logits" else "softmax"
    experts = [
        conv_expert(filters, f"expert_{i}", expert_density, seed + 10 * i, activation)
        for i in ((0, 1, 2) if routing == "shared" else (0, 1))
    ]
    routed = {
        "softmax": {},
        "top_k": {"top_k": 1, "capacity_factor": 1.25},
        "bias": {"top_k": 1, "capacity_factor": 1.25, "selection_bias": True},
        "expert_choice": {"top_k": 1, "routing": "expert_choice"},
        "shared": {"top_k": 1, "capacity_factor": 1.25, "shared_experts": experts[2:]},
    }[routing]
    mixture = ksm.layers.SparseExpertMixture(
        experts=experts[:2],
        gate=make_gate(gate_kind, gate_size),
        balance_losses=None if loss == "none" else loss,
        name="mixture",
        **routed,
    )
    if gate_kind == "oracle":
        index = keras.Input((1,), dtype="int32", name="dataset")
        inputs, mixed = [image, index], mixture(image, gate_inputs=index)
    else:
        inputs, mixed = image, mixture(image)
    if mixing == "logits":  # softmax(sum_e G_e * NN_e(x))
        mixed = keras.layers.Softmax(name="probabilities")(mixed)
    model = keras.Model(inputs, mixed)
    optimizer = keras.optimizers.Adam(1e-3)
    if gate_kind != "oracle" and gate_lr_multiplier != 1.0:
        optimizer = ksm.optimizers.scale_learning_rates(
            optimizer, {"mixture/gate/": gate_lr_multiplier}
        )
    model.compile(optimizer, "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def inputs_of(model, x, index):
    return [x, index] if len(model.inputs) == 2 else x


class StepTimer(keras.callbacks.Callback):
    """Wall time of every training step (`on_train_batch_begin` to `_end`)."""

    def on_train_begin(self, logs=None):
        self.times = []

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self._start)


def expert_load(model, x, batch_size):
    """Each expert's share of the images, as the mixture routes them at inference."""
    mixture = model.get_layer("mixture")
    chosen = [
        ops.convert_to_numpy(mixture.gate_values(x[i : i + batch_size])) > 0
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(chosen).mean(axis=0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=os.path.join("..", "shared", "data"))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--filters", type=int, default=128, help="conv filters per expert layer")
    parser.add_argument("--samples", type=int, default=4000, help="training images per dataset")
    parser.add_argument("--test-samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--gates", nargs="+", default=list(GATES), choices=GATES)
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    parser.add_argument(
        "--routings",
        nargs="+",
        default=["softmax"],
        choices=ROUTINGS,
        help="how the gate routes (bias and expert_choice run with no gate loss)",
    )
    parser.add_argument(
        "--bias-rate", type=float, default=0.01, help="BiasBalancing's step (routing 'bias')"
    )
    parser.add_argument(
        "--expert-density",
        type=float,
        default=None,
        help="make the experts sparse, keeping this fraction of their conv and hidden weights",
    )
    parser.add_argument(
        "--expert-set", action="store_true", help="evolve sparse experts with SET each epoch"
    )
    parser.add_argument(
        "--mixing",
        choices=("logits", "probabilities"),
        default="logits",
        help="mix the experts' logits then softmax (seed 003), or mix their probabilities",
    )
    parser.add_argument(
        "--gate-size",
        choices=("seed", "small"),
        default="seed",
        help="the seed's gates (conv64 x2 + dense64; dense64) or smaller ones",
    )
    parser.add_argument(
        "--gate-lr-multiplier",
        type=float,
        default=1.0,
        help="learning rate of the gate relative to the experts'",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join("demo_output", "moe"))
    args = parser.parse_args(argv)

    data = load(args.data_dir, args.samples, args.test_samples, args.seed)
    (x, y, index), (x_test, y_test, index_test) = data["train"], data["test"]
    print(
        f"data: {int((index == MNIST).sum())} MNIST + {int((index == CIFAR).sum())} CIFAR "
        f"training images, {len(x_test)} test images, 32x32 grey, 20 classes"
    )
    os.makedirs(args.out, exist_ok=True)
    mix = np.random.default_rng(args.seed).permutation(len(x_test))
    runs = []
    for routing in args.routings:
        for g in args.gates:
            for loss in ("none",) if routing in BALANCED else args.losses:
                oracle_ok = routing == "softmax" and loss == "none"
                if g != "oracle" or oracle_ok:
                    runs.append((routing, g, loss))
    results, histories, tables = [], {}, {}
    for routing, gate_kind, loss in runs:
        name = f"{gate_kind} gate, {'no gate loss' if loss == 'none' else loss + ' loss'}"
        if routing != "softmax":
            name = f"{routing.replace('_', ' ')}: {name}"
        print(f"\n== {name}")
        keras.utils.set_random_seed(args.seed)
        model = build(
            gate_kind,
            loss,
            args.filters,
            args.expert_density,
            args.seed,
            args.mixing,
            args.gate_size,
            args.gate_lr_multiplier,
            routing,
        )
        # Activation rates on test images and on as many training images.
        seen = {code: np.flatnonzero(index == code)[: args.test_samples] for code in (MNIST, CIFAR)}
        split = {
            "mnist": inputs_of(model, x_test[index_test == MNIST], index_test[index_test == MNIST]),
            "cifar": inputs_of(model, x_test[index_test == CIFAR], index_test[index_test == CIFAR]),
            "mnist (train)": inputs_of(model, x[seen[MNIST]], index[seen[MNIST]]),
            "cifar (train)": inputs_of(model, x[seen[CIFAR]], index[seen[CIFAR]]),
        }
        logger = ksm.callbacks.ActivationRateLogger(split, verbose=0)
        timer = StepTimer()
        callbacks = [logger, timer]
        if routing == "bias":
            callbacks.append(ksm.callbacks.BiasBalancing(rate=args.bias_rate))
        if args.expert_set and args.expert_density is not None:
            callbacks.append(ksm.callbacks.SETEvolution(zeta=0.3, seed=args.seed))
        start = time.perf_counter()
        history = model.fit(
            inputs_of(model, x, index),
            y,
            batch_size=args.batch_size,
            epochs=args.epochs,
            # Shuffled: under expert choice a batch's make-up decides its routing.
            validation_data=(inputs_of(model, x_test[mix], index_test[mix]), y_test[mix]),
            callbacks=callbacks,
            verbose=2,
        )
        seconds = time.perf_counter() - start
        table = logger.tables[-1]
        print(f"activation rates ({name}):\n{table}")
        accuracy = {
            part: model.evaluate(split[part], y_test[index_test == code], verbose=0)[1]
            for part, code in (("mnist", MNIST), ("cifar", CIFAR))
        }
        shares = (
            expert_load(model, x, args.batch_size) if gate_kind != "oracle" else np.full(2, 0.5)
        )
        histories[name], tables[name] = history.history, table
        results.append(
            (
                name,
                history.history["val_accuracy"][-1],
                accuracy["mnist"],
                accuracy["cifar"],
                table,
                seconds,
                history.history["accuracy"][-1],
                shares,
                1000 * float(np.median(timer.times)),
            )
        )

    experts = "dense experts"
    if args.expert_density is not None:
        experts = f"sparse experts at {args.expert_density:g} of their weights (ERK)"
        experts += ", SET" if args.expert_set else ""
    setup = f"{args.mixing} mixing, {args.gate_size} gates"
    if args.gate_lr_multiplier != 1.0:
        setup += f", gate learning rate x{args.gate_lr_multiplier:g}"
    print(
        f"\nResults after {args.epochs} epochs ({args.filters} filters per expert conv, "
        f"{experts}, {setup}); rates: mean gate value of expert 0, expert 1 on test images "
        "(on training images); load: the share of training images each expert computes "
        "at inference:"
    )
    lines = [
        "| gate | train acc | test acc | MNIST acc | CIFAR acc | MNIST → e0, e1 | "
        "CIFAR → e0, e1 | load e0, e1 | ms/step | time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, acc, mnist, cifar, table, seconds, train_acc, shares, step_ms in results:
        rates = table.as_dict()
        m, c, m_train, c_train = (rates[k] for k in split)
        lines.append(
            f"| {name} | {train_acc:.4f} | {acc:.4f} | {mnist:.4f} | {cifar:.4f} | "
            f"{m[0]:.3f}, {m[1]:.3f} ({m_train[0]:.3f}, {m_train[1]:.3f}) | "
            f"{c[0]:.3f}, {c[1]:.3f} ({c_train[0]:.3f}, {c_train[1]:.3f}) | "
            f"{shares[0]:.3f}, {shares[1]:.3f} | {step_ms:.0f} | {seconds:.0f} |"
        )
    summary = "\n".join(lines)
    print(summary)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(summary + "\n")
    path = os.path.join(args.out, "accuracy.png")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
        for ax, key, label in (
            (axes[0], "accuracy", "training"),
            (axes[1], "val_accuracy", "test"),
        ):
            ksm.plots.accuracy_curves(
                histories, ax=ax, key=key, ylabel=f"{label} accuracy (MNIST + CIFAR, 20 classes)"
            )
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
    except ImportError:
        print("matplotlib is not installed (pip install keras-sparse-moe[plots]): no pictures")
        return results
    print(f"wrote {path}")
    for name, table in tables.items():
        slug = name.replace(",", "").replace(" ", "_")
        ksm.plots.activation_table(
            table, path=os.path.join(args.out, f"rates_{slug}.png"), title=name
        )
    print(f"wrote activation-rate pictures to {args.out}")
    return results


if __name__ == "__main__":
    main()
