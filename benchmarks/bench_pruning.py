"""Pruning side by side at equal connection counts: 2:4 against tfmot's `sparsity_m_by_n`,
global against layer-wise magnitude pruning, ERK against uniform.

Two tasks, each trained in turns one epoch per model (so machine noise hits all alike):
- `mnist`: LeNet-300-100 (784-300-100-10, ReLU) on MNIST, every Dense kernel pruned;
- `cifar10`: the CNN of `bench_sparse_cnn.py` (conv32-conv32-pool-conv64-conv64-pool-dense10)
  on the CIFAR-10 subset, its conv2-conv4 kernels pruned (conv1's 3 input channels
  cannot form groups of 4: it stays dense, in every model).

Models (Adam 1e-3, batch 128; B = the first epoch's steps, E = 75 % of the steps):
- dense;
- 2:4 by `MagnitudePruning(n_m=(2, 4))`, gradual (PolynomialDecay 0 -> 0.5 over [0, E]:
  4:4, 3:4, then 2:4), and one-shot on tfmot's schedule (ConstantSparsity from B);
- tfmot `prune_low_magnitude(sparsity_m_by_n=(2, 4))`, ConstantSparsity from B, on the
  equivalent tf_keras model (skipped without tfmot / tf_keras, or with --skip-tfmot);
- unstructured 50 % per layer (the 2:4 count without the structure);
- 10 % per layer against 10 % with one global threshold (`scope="global"`);
- static sparse 10 % from the start: uniform per layer against ERK (`sparsify`).

Reports test accuracy, the share of the pruned kernels' weights kept, whether every
group of 4 inputs keeps exactly 2 (2:4 rows), the density of each pruned layer, and
the median epoch time relative to dense.

    python benchmarks/bench_pruning.py --data-dir ../shared/data
    python benchmarks/bench_pruning.py --tasks mnist --epochs 8
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
from bench_sparse_cnn import FILTERS, cnn_layers  # noqa: E402
from bench_sparse_training import tfmot_stripped  # noqa: E402
from common import load_named  # noqa: E402
from interleaved import epochs_in_turns  # noqa: E402

TASKS = {
    # name: (dataset, pruned layers, default epochs, pruning frequency)
    "mnist": ("mnist", ("fc1", "fc2", "fc3"), 8, 100),
    "cifar10": ("cifar10", ("conv2", "conv3", "conv4"), 15, 50),
}


def task_layers(task, module):
    """The task's layers from `module` (keras or tf_keras)."""
    if task == "cifar10":
        return cnn_layers(module, FILTERS)
    L = module.layers
    return [
        L.Dense(300, activation="relu", name="fc1"),
        L.Dense(100, activation="relu", name="fc2"),
        L.Dense(10, activation="softmax", name="fc3"),
    ]


def dense_model(task, input_shape, seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input(input_shape), *task_layers(task, keras)])


def compiled(model):
    model.compile(
        keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    return model


def pruned(task, input_shape, seed, names, schedule, **kwargs):
    """The dense model with `names` as dense SparseKernelLayers, and MagnitudePruning."""
    model = ksm.sparsify(dense_model(task, input_shape, seed), density=1.0, include=list(names))
    others = [x.name for x in ksm.walk.find_layers(model, ksm.layers.SparseKernelLayer)]
    exclude = [name for name in others if name not in names]
    callback = ksm.callbacks.MagnitudePruning(schedule, exclude=exclude or None, **kwargs)
    return compiled(model), [callback]


def static(task, input_shape, seed, names, distribution):
    model = ksm.sparsify(
        dense_model(task, input_shape, seed),
        density=0.1,
        include=list(names),
        distribution=distribution,
        seed=seed,
    )
    return compiled(model), []


def tfmot_model(task, input_shape, seed, names, schedule_args):
    import tensorflow_model_optimization as tfmot
    import tf_keras

    tf_keras.utils.set_random_seed(seed)
    schedule = tfmot.sparsity.keras.ConstantSparsity(**schedule_args)
    layers = [
        tfmot.sparsity.keras.prune_low_magnitude(
            layer, pruning_schedule=schedule, sparsity_m_by_n=(2, 4)
        )
        if layer.name in names
        else layer
        for layer in task_layers(task, tf_keras)
    ]
    model = tf_keras.Sequential([tf_keras.layers.Input(input_shape), *layers])
    model.compile(
        tf_keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    return model, [tfmot.sparsity.keras.UpdatePruningStep()]


def kernels(model, names):
    """`{name: (kept mask as a (fan_in, outputs) matrix, kernel input size)}` of `names`."""
    found = {}
    for layer in model._flatten_layers(include_self=False):
        if layer.name not in names:
            continue
        if isinstance(layer, ksm.layers.SparseKernelLayer):
            mask = layer.dense_mask()
        else:
            mask = np.asarray(layer.get_weights()[0]) != 0
        found[layer.name] = mask.reshape(-1, mask.shape[-1])
    return found


def exactly_2_4(masks):
    """Every group of 4 consecutive inputs of each output keeps exactly 2."""
    return all((m.reshape(m.shape[0] // 4, 4, -1).sum(axis=1) == 2).all() for m in masks.values())


def run_task(task, args):
    dataset, names, default_epochs, frequency = TASKS[task]
    epochs = args.epochs or default_epochs
    data = load_named(args.data_dir, dataset)
    shape = data.image_shape if task == "cifar10" else (data.x_train.shape[-1],)
    x, y = data.x_train.reshape((-1, *shape)), data.y_train
    xt, yt = data.x_test.reshape((-1, *shape)), data.y_test
    steps = math.ceil(len(x) / args.batch_size)
    begin = steps // frequency * frequency
    end = int(0.75 * steps * epochs) // frequency * frequency
    seed = args.seed
    sched = ksm.schedules

    def gradual(sparsity):
        return sched.PolynomialDecay(0.0, sparsity, begin_step=0, end_step=end, frequency=frequency)

    one_shot = dict(target_sparsity=0.5, begin_step=begin, end_step=end, frequency=frequency)
    runs = {
        "dense": (compiled(dense_model(task, shape, seed)), []),
        "2:4, MagnitudePruning gradual": pruned(task, shape, seed, names, gradual(0.5), n_m=(2, 4)),
        "2:4, MagnitudePruning on tfmot's schedule": pruned(
            task, shape, seed, names, sched.ConstantSparsity(**one_shot), n_m=(2, 4)
        ),
    }
    if not args.skip_tfmot:
        try:
            runs["2:4, tfmot sparsity_m_by_n"] = tfmot_model(task, shape, seed, names, one_shot)
        except ImportError as error:
            print(f"tfmot skipped: {error}")
    runs.update(
        {
            "50 % unstructured / layer": pruned(task, shape, seed, names, gradual(0.5)),
            "10 % / layer": pruned(task, shape, seed, names, gradual(0.9)),
            "10 % global": pruned(task, shape, seed, names, gradual(0.9), scope="global"),
            "10 % static uniform": static(task, shape, seed, names, "uniform"),
            "10 % static ERK": static(task, shape, seed, names, "erk"),
        }
    )
    times = epochs_in_turns(
        runs,
        x,
        y,
        args.batch_size,
        epochs,
        lambda epoch: print(f"{task}: epoch {epoch + 1}/{epochs} done", flush=True),
    )
    rows = []
    for name, (model, _) in runs.items():
        if name.startswith("2:4, tfmot"):
            model = tfmot_stripped(model)
        accuracy = model.evaluate(xt, yt, verbose=0)[1]
        masks = kernels(model, names)
        kept = sum(int(m.sum()) for m in masks.values()) / sum(m.size for m in masks.values())
        per_layer = ", ".join(f"{masks[n].mean():.3f}" for n in names)
        pattern = ("yes" if exactly_2_4(masks) else "no") if name.startswith("2:4") else "-"
        later = times[name][1:] or times[name]  # the first epoch compiles
        rows.append((name, accuracy, kept, pattern, per_layer, statistics.median(later)))
    base = rows[0][-1]
    print(
        f"\n{task}: {len(x)} / {len(xt)} images, {epochs} epochs, batch {args.batch_size}, "
        f"Adam 1e-3, pruned {', '.join(names)}, frequency {frequency}, begin {begin}, end {end}; "
        f"backend {keras.backend.backend()}, {platform.machine()} x{os.cpu_count()}"
    )
    print(
        f"| model | test accuracy | pruned kernels kept | exactly 2:4 | density {'/'.join(names)} "
        "| epoch time / dense |"
    )
    print("|---|---|---|---|---|---|")
    for name, accuracy, kept, pattern, per_layer, seconds in rows:
        print(
            f"| {name} | {accuracy:.4f} | {kept:.2%} | {pattern} | {per_layer} | "
            f"{seconds / base:.2f} |"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", choices=tuple(TASKS), default=list(TASKS))
    parser.add_argument("--data-dir", default=os.path.join(HERE, "..", "..", "shared", "data"))
    parser.add_argument("--epochs", type=int, default=None, help="default: 8 MNIST, 15 CIFAR")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--skip-tfmot", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for task in args.tasks:
        run_task(task, args)


if __name__ == "__main__":
    main()
