"""Step time on 2 and 4 replicas relative to 1: a smoke figure for scaling out.

A `SparseExpertMixture` (784 -> 8 built-in experts of 256 hidden units at 10 %
density, routes at 5 % -> 64) and a dense head, SGD, `jit_compile="auto"` (XLA
on JAX; Keras turns it off under tf.distribute and on TF's CPU), a
fixed global batch (default 512) split over the replicas. Each configuration
runs in its own process (devices are set up before the backend starts, and
every process makes the same number of devices: 4 logical CPUs on TensorFlow,
4 host devices on JAX, so only the distribution differs) and times `--steps`
fit steps after a compiling epoch, `--repeats` times, and one SET evolution
(`SETEvolution.evolve`, which under `tf.distribute` includes the copy to the
other replicas). Rounds visit the configurations in turn so machine noise hits
them alike; the table gives medians and the ratios to one device.

- TensorFlow: no strategy (1), `MirroredStrategy` over 2 and 4 devices.
- JAX: no distribution (1), `DataParallel` over 2 and 4 devices, and expert
  parallelism: `ModelParallel` with `expert_layout_map` on a `(1, N)`
  ("batch", "model") mesh, each device holding 8 / N experts.

    python benchmarks/bench_distributed.py [--backends tensorflow jax] [--rounds 3]

On a machine with accelerators the devices are the GPUs (`--gpu`): no logical
CPUs are made.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

DEVICES = 4
CONFIGS = {
    "tensorflow": [("1 device", 1), ("MirroredStrategy", 2), ("MirroredStrategy", 4)],
    "jax": [
        ("1 device", 1),
        ("DataParallel", 2),
        ("DataParallel", 4),
        ("experts over 'model'", 2),
        ("experts over 'model'", 4),
    ],
}


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", default=["tensorflow", "jax"])
    parser.add_argument("--batch-size", type=int, default=512, help="the global batch")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed epoch")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per process")
    parser.add_argument("--rounds", type=int, default=3, help="processes per configuration")
    parser.add_argument("--gpu", action="store_true", help="use the GPUs as the devices")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "N"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- #
# One configuration, in its own process.
# --------------------------------------------------------------------------- #
def setup_devices(backend, gpu):
    if backend == "jax" and not gpu:
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES}"
    if backend == "tensorflow" and not gpu:
        import tensorflow as tf

        tf.config.set_logical_device_configuration(
            tf.config.list_physical_devices("CPU")[0],
            [tf.config.LogicalDeviceConfiguration()] * DEVICES,
        )


def build():
    import keras

    import keras_sparse_moe as ksm

    inputs = keras.Input((784,))
    h = ksm.layers.SparseExpertMixture(
        units=64,
        num_experts=8,
        expert_units=256,
        expert_density=0.1,
        route_density=0.05,
        seed=0,
        name="moe",
    )(inputs)
    model = keras.Model(inputs, keras.layers.Dense(10, name="head")(h))
    model.compile(
        keras.optimizers.SGD(0.01),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile="auto",  # Keras: XLA on JAX; off on TensorFlow on CPU and under tf.distribute
    )
    return model


def scope_for(kind, n, gpu):
    import contextlib

    import keras

    if n == 1:
        return contextlib.nullcontext()
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        devices = tf.config.list_logical_devices("GPU" if gpu else "CPU")[:n]
        return tf.distribute.MirroredStrategy([d.name for d in devices]).scope()
    devices = keras.distribution.list_devices()[:n]
    if kind == "DataParallel":
        return keras.distribution.DataParallel(devices=devices).scope()
    from keras_sparse_moe.distribution import expert_layout_map

    mesh = keras.distribution.DeviceMesh((1, n), ["batch", "model"], devices)
    layout_map = expert_layout_map(build(), mesh)
    return keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch").scope()


def worker(args):
    kind, n = args.worker[0], int(args.worker[1])
    setup_devices(os.environ.get("KERAS_BACKEND", "tensorflow"), args.gpu)
    import numpy as np

    from keras_sparse_moe.callbacks import SETEvolution

    rng = np.random.default_rng(0)
    rows = args.batch_size * args.steps
    x = rng.random((rows, 784), dtype=np.float32)
    y = rng.integers(0, 10, rows).astype("int32")
    with scope_for(kind, n, args.gpu):
        model = build()
        set_callback = SETEvolution(update_every=10**9, seed=1)  # evolves only when called
        model.fit(x, y, batch_size=args.batch_size, epochs=1, verbose=0, callbacks=[set_callback])
        steps, evolutions = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            model.fit(x, y, batch_size=args.batch_size, epochs=1, verbose=0)
            steps.append((time.perf_counter() - start) / args.steps)
        for _ in range(3):  # compiles its variants (sampled and exact selection)
            set_callback.evolve()
        for _ in range(args.repeats):
            start = time.perf_counter()
            set_callback.evolve()
            evolutions.append(time.perf_counter() - start)
    print(json.dumps({"step": statistics.median(steps), "evolve": statistics.median(evolutions)}))


# --------------------------------------------------------------------------- #
# The driver: configurations in turns, a table of ratios.
# --------------------------------------------------------------------------- #
def run_config(backend, kind, n, args):
    command = [sys.executable, os.path.abspath(__file__), "--worker", kind, str(n)]
    command += ["--batch-size", str(args.batch_size), "--steps", str(args.steps)]
    command += ["--repeats", str(args.repeats)] + (["--gpu"] if args.gpu else [])
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("XLA_FLAGS", None)
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{backend} {kind} x{n} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    args = parse(argv)
    if args.worker:
        return worker(args)
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; global batch "
        f"{args.batch_size}, {args.steps} steps x {args.repeats} per process, "
        f"{args.rounds} rounds"
    )
    for backend in args.backends:
        results = {config: [] for config in CONFIGS[backend]}
        for round_ in range(args.rounds):
            for kind, n in CONFIGS[backend]:
                results[(kind, n)].append(run_config(backend, kind, n, args))
                print(f"  {backend} round {round_ + 1}: {kind} x{n} done", flush=True)
        base = results[("1 device", 1)]
        base_step = statistics.median(r["step"] for r in base)
        base_evolve = statistics.median(r["evolve"] for r in base)
        print(f"\n{backend}\n")
        print("| run | replicas | step ms | step ratio to 1 | SET evolve ms | evolve ratio to 1 |")
        print("|---|---|---|---|---|---|")
        for (kind, n), runs in results.items():
            step = statistics.median(r["step"] for r in runs)
            evolve = statistics.median(r["evolve"] for r in runs)
            print(
                f"| {kind} | {n} | {1000 * step:.1f} | {step / base_step:.2f} | "
                f"{1000 * evolve:.1f} | {evolve / base_evolve:.2f} |"
            )


if __name__ == "__main__":
    main()
