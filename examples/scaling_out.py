"""Scaling out on one machine: a mixture of sparse experts with SET, on 1 device and on N.

TensorFlow (the default backend): `tf.distribute.MirroredStrategy` over N
devices (GPUs, or N logical CPUs made from the host). JAX: data parallelism
(`keras.distribution.DataParallel`) and expert parallelism (`ModelParallel`
with `keras_sparse_moe.distribution.expert_layout_map`: each device along the
"model" axis holds num_experts / size experts) over N devices (GPUs, or N
host devices). Every run starts from the same weights and sees the same global
batches; the table shows how far each lands from the one-device run (float
summation order apart, the same run) and how many connections differ.

    python examples/scaling_out.py --devices 2
    KERAS_BACKEND=jax python examples/scaling_out.py --devices 4
    python examples/scaling_out.py --data ../shared/data/mnist.npz --epochs 3

On a cluster the same code runs in every process: TensorFlow reads each
worker's `TF_CONFIG` (`tf.distribute.MultiWorkerMirroredStrategy`); JAX
starts with `jax.distributed.initialize()` and the mesh spans all processes'
devices (`keras.distribution.list_devices()`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

# Before TensorFlow loads: the tables and progress bars, not TensorFlow's C++ log lines.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # Keras and the backend start after the devices are set up (main)


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2, help="devices to spread over (>= 2)")
    parser.add_argument("--data", help="an MNIST-like .npz (default: Keras' MNIST, else digits)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128, help="the global batch")
    parser.add_argument("--max-samples", type=int, default=8192, help="training rows used")
    args = parser.parse_args(argv)
    if args.devices < 2:
        parser.error(f"--devices must be at least 2. Received: --devices={args.devices}")
    return args


def make_devices(count):
    """Before the backend starts: `count` CPU devices when there are no accelerators."""
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    if backend == "jax":
        flag = f"--xla_force_host_platform_device_count={count}"
        if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    elif backend == "tensorflow":
        import tensorflow as tf

        if len(tf.config.list_physical_devices("GPU")) < count:
            tf.config.set_logical_device_configuration(
                tf.config.list_physical_devices("CPU")[0],
                [tf.config.LogicalDeviceConfiguration()] * count,
            )


def build(num_classes, input_dim):
    import keras

    import keras_sparse_moe as ksm

    inputs = keras.Input((input_dim,))
    h = ksm.layers.SparseExpertMixture(
        units=64,
        num_experts=4,
        expert_units=128,
        expert_density=0.2,
        route_density=0.05,
        balance_losses={"sample_entropy": 0.01},
        seed=0,
        name="moe",
    )(inputs)
    model = keras.Model(inputs, keras.layers.Dense(num_classes, name="head")(h), name="scaling")
    model.compile(
        keras.optimizers.SGD(0.05, momentum=0.9),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def connections(model):
    import keras_sparse_moe as ksm

    found = []
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, ksm.layers.SparseKernelLayer):
            layer.refresh_connections()
            rows, cols = layer.connection_indices()
            found.append(np.sort(rows.astype(np.int64) * layer.kernel_shape[1] + cols))
    return found


def train(name, scope, weights, data, args):
    """Builds and trains under `scope` (a strategy or distribution scope, or None)."""
    import keras

    from keras_sparse_moe.callbacks import SETEvolution

    with scope or contextlib.nullcontext():
        model = build(data.num_classes, data.x_train.shape[1])
        model.set_weights(weights)
        start = time.perf_counter()
        model.fit(
            data.x_train,
            data.y_train,
            batch_size=args.batch_size,
            epochs=args.epochs,
            shuffle=False,
            callbacks=[SETEvolution(update_every=20, zeta=0.2, seed=1)],
            verbose=0,
        )
        seconds = (time.perf_counter() - start) / args.epochs
        accuracy = model.evaluate(data.x_test, data.y_test, verbose=0)[1]
    final = [keras.ops.convert_to_numpy(v) for v in model.weights]
    return {
        "name": name,
        "accuracy": float(accuracy),
        "seconds": seconds,
        "weights": final,
        "connections": connections(model),
        "max_diff": None,
        "differing": None,
    }


def compare(run, reference):
    run["max_diff"] = max(
        float(np.abs(a - b).max()) for a, b in zip(run["weights"], reference["weights"])
    )
    # Connections of this run that the one-device run does not have. Replicas
    # sum gradients in another order; a weight at SET's drop threshold can then
    # fall on the other side of it (a handful in tens of thousands).
    run["differing"] = sum(
        len(np.setdiff1d(a, b)) for a, b in zip(run["connections"], reference["connections"])
    )


def main(argv=None):
    args = parse(argv)
    make_devices(args.devices)
    import keras

    from keras_sparse_moe import datasets
    from keras_sparse_moe.distribution import expert_layout_map

    data = datasets.load_image_classification(args.data)
    rows = min(len(data.x_train), args.max_samples) // args.batch_size * args.batch_size
    data.x_train, data.y_train = data.x_train[:rows], data.y_train[:rows]
    backend = keras.backend.backend()
    print(f"{data.name}: {rows} training rows, backend {backend}, {args.devices} devices")

    weights = build(data.num_classes, data.x_train.shape[1]).get_weights()  # every run's start
    reference = train("1 device", None, weights, data, args)
    runs = [reference]
    if backend == "tensorflow":
        import tensorflow as tf

        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        strategy = tf.distribute.MirroredStrategy([d.name for d in devices[: args.devices]])
        name = f"MirroredStrategy x{args.devices}"
        runs.append(train(name, strategy.scope(), weights, data, args))
    elif backend == "jax":
        devices = keras.distribution.list_devices()[: args.devices]
        parallel = keras.distribution.DataParallel(devices=devices)
        runs.append(train(f"DataParallel x{args.devices}", parallel.scope(), weights, data, args))
        model_axis = 2 if args.devices % 2 == 0 else 1
        mesh = keras.distribution.DeviceMesh(
            (args.devices // model_axis, model_axis), ["batch", "model"], devices
        )
        layout_map = expert_layout_map(build(data.num_classes, data.x_train.shape[1]), mesh)
        experts = keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")
        runs.append(
            train(f"experts over 'model' ({mesh.shape})", experts.scope(), weights, data, args)
        )
    else:
        sys.exit(f"This example runs on TensorFlow or JAX, not {backend}.")
    for run in runs[1:]:
        compare(run, reference)

    print(
        "\n| run | test accuracy | s / epoch | max abs weight diff vs 1 device "
        "| connections not in the 1-device run |"
    )
    print("|---|---|---|---|---|")
    for run in runs:
        diff = "-" if run["max_diff"] is None else f"{run['max_diff']:.2e}"
        total = sum(len(c) for c in run["connections"])
        same = "-" if run["differing"] is None else f"{run['differing']} of {total:,}"
        print(f"| {run['name']} | {run['accuracy']:.4f} | {run['seconds']:.2f} | {diff} | {same} |")
    return runs


if __name__ == "__main__":
    main()
