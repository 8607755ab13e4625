"""Exported models side by side: file size and latency in each runtime, as ratios to Keras.

Each model is exported to every format Keras supports on the backend
(TensorFlow: SavedModel, ONNX, LiteRT, OpenVINO; JAX: SavedModel, ONNX, and
OpenVINO reading the ONNX file), loaded in that format's runtime, checked
against Keras' outputs, and timed at batch 1 and 64 in turns with Keras'
`predict_on_batch` (median of `--repeats` rounds, so machine noise hits all
alike). File sizes: the `.keras` file, each export (a SavedModel's folder in
all), and the gzip of the `.keras` file (what a sparse kernel kept dense
saves once compressed). `B/conn`: bytes of the file per stored weight
(connections of the sparse layers plus the dense layers' weights).

Models: `mlp` 784-1024-1024-10 at 5 % (masked, sparse storage, and the
masked one after `ksm.strip`), `mlp_sparse_10` the sparse one at 10 % (its
size over `mlp_sparse`'s gives the bytes per added connection), `cnn` a
3-conv CNN at 10 % (masked; strided, no pooling), `mixture` the demo's mixture (784 -> 10, 10
experts of 64, 20 % inside, 2 % routes, top-2) and `ptsne_mixture` the same
with a `PTSNEGate`. `--compact` exports with
`keras_sparse_moe.ops.sparse_matmul.COMPACT_EXPORTS = True` (TensorFlow's
converters keep sparse storage at 8 bytes a connection, at a cost in latency).

    python benchmarks/bench_export.py [--models mlp_masked mixture ...] [--repeats 7] \\
        [--compact] [--markdown docs/export_BACKEND.md]
"""

from __future__ import annotations

import argparse
import gzip
import os
import platform
import statistics
import tempfile
import time

import keras
import numpy as np

import keras_sparse_moe as ksm
from keras_sparse_moe.layers import PTSNEGate, SparseConv2D, SparseDense, SparseExpertMixture
from keras_sparse_moe.ops import sparse_matmul

BATCHES = (1, 64)


def _mlp(implementation, density=0.05):
    return keras.Sequential(
        [
            keras.Input((784,)),
            SparseDense(1024, "relu", density=density, seed=0, implementation=implementation),
            SparseDense(1024, "relu", density=density, seed=1, implementation=implementation),
            keras.layers.Dense(10),
        ]
    )


def _cnn():
    return keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            SparseConv2D(32, 3, padding="same", activation="relu", density=0.1, seed=0),
            # Strides, not pooling: jax2onnx writes a MaxPool onnxruntime refuses.
            SparseConv2D(64, 3, 2, padding="same", activation="relu", density=0.1, seed=1),
            SparseConv2D(64, 3, 2, padding="same", activation="relu", density=0.1, seed=2),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10),
        ]
    )


def _mixture(gate=None):
    mixture = SparseExpertMixture(
        units=10,
        num_experts=10,
        expert_units=64,
        expert_density=0.2,
        route_density=0.02,
        top_k=2,
        gate=gate,
        seed=0,
    )
    return keras.Sequential([keras.Input((784,)), mixture])


MODELS = {
    "mlp_masked": lambda: _mlp("masked"),
    "mlp_sparse": lambda: _mlp("sparse"),
    "mlp_sparse_10": lambda: _mlp("sparse", 0.1),
    "mlp_stripped": lambda: ksm.strip(_mlp("masked")),
    "cnn_masked": _cnn,
    "mixture": _mixture,
    "ptsne_mixture": lambda: _mixture(PTSNEGate(10, perplexity=30.0, seed=0)),
}


def stored_weights(model):
    """Connections of the sparse layers plus every other layer's kernel and bias entries."""
    total = 0
    for layer in ksm.find_layers(model):
        if isinstance(layer, keras.Model):
            continue
        if hasattr(layer, "num_connections"):
            total += layer.num_connections + (layer.bias.shape[0] if layer.use_bias else 0)
        elif not isinstance(layer, SparseExpertMixture):
            total += sum(int(np.prod(w.shape)) for w in layer.trainable_weights)
    return total


def size_of(path):
    """Bytes of every file in `path`'s folder (an export gets a folder of its own:
    OpenVINO's `.bin`, jax2onnx's external weights and a SavedModel's files count)."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(folder)
        for name in names
    )


class SavedModelRunner:
    def __init__(self, path):
        import tensorflow as tf

        self.loaded = tf.saved_model.load(path)  # kept: the function reads its variables

    def __call__(self, x):
        return np.asarray(self.loaded.serve(x))


class OnnxRunner:
    def __init__(self, path):
        import onnxruntime

        self.session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.name = self.session.get_inputs()[0].name

    def __call__(self, x):
        return self.session.run(None, {self.name: x})[0]


class LiteRTRunner:
    def __init__(self, path):
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=path)
        self.shape = None

    def __call__(self, x):
        it = self.interpreter
        index = it.get_input_details()[0]["index"]
        if self.shape != x.shape:  # resize once per batch size, as a server would
            it.resize_tensor_input(index, x.shape)
            it.allocate_tensors()
            self.shape = x.shape
        it.set_tensor(index, x)
        it.invoke()
        return it.get_tensor(it.get_output_details()[0]["index"])


class OpenVINORunner:
    def __init__(self, path):
        import openvino

        # float32, as the model: on CPUs with bfloat16 units (AMX, AVX512-BF16)
        # OpenVINO otherwise infers in bfloat16 (faster, 0.3 % off).
        config = {"INFERENCE_PRECISION_HINT": "f32"}
        self.compiled = openvino.Core().compile_model(path, "CPU", config)
        self.request = self.compiled.create_infer_request()

    def __call__(self, x):
        return self.request.infer([x])[self.compiled.outputs[0]]


def formats():
    """`[(label, Keras export format, file name, runner)]` for the backend."""
    listed = [
        ("SavedModel", "tf_saved_model", "saved_model", SavedModelRunner),
        ("ONNX Runtime", "onnx", "model.onnx", OnnxRunner),
    ]
    if keras.backend.backend() == "tensorflow":
        listed.append(("LiteRT", "litert", "model.tflite", LiteRTRunner))
        listed.append(("OpenVINO", "openvino", "model.xml", OpenVINORunner))
    else:  # Keras' JAX -> OpenVINO route needs jax2tf's removed non-native serialization
        listed.append(("OpenVINO (ONNX file)", "onnx", "model.onnx", OpenVINORunner))
    return listed


def measure(name, build, repeats, folder):
    model = build()
    shape = (None,) + tuple(model.input_shape[1:])
    rng = np.random.default_rng(0)
    inputs = {b: rng.standard_normal((b,) + shape[1:]).astype("float32") for b in BATCHES}
    os.makedirs(os.path.join(folder, name, "keras"))
    keras_path = os.path.join(folder, name, "keras", "model.keras")
    model.save(keras_path)
    with open(keras_path, "rb") as f:
        gzipped = len(gzip.compress(f.read(), 9))
    rows = [("Keras (.keras)", size_of(keras_path), gzipped, model.predict_on_batch)]
    exported = {}
    for label, fmt, file_name, runner in formats():
        path = os.path.join(folder, name, fmt, file_name)
        if path not in exported:
            os.makedirs(os.path.dirname(path))
            model.export(path, format=fmt, verbose=False)
            exported[path] = True
        run = runner(path)
        for x in inputs.values():  # correctness, and the first call's warm-up
            np.testing.assert_allclose(
                run(x), model.predict_on_batch(x), rtol=1e-4, atol=1e-4, err_msg=label
            )
        rows.append((label, size_of(path), None, run))
    times = {label: {b: [] for b in BATCHES} for label, *_ in rows}
    for _ in range(repeats):
        for label, _, _, run in rows:
            for b, x in inputs.items():
                calls = 50 if b == 1 else 10
                start = time.perf_counter()
                for _ in range(calls):
                    run(x)
                times[label][b].append((time.perf_counter() - start) / calls)
    medians = {k: {b: statistics.median(v) for b, v in t.items()} for k, t in times.items()}
    base = medians["Keras (.keras)"]
    out = []
    weights = stored_weights(model)
    for label, size, gzipped, _ in rows:
        out.append(
            f"| {name} | {label} | {size / 1e6:.3g} | "
            f"{'' if gzipped is None else f'{gzipped / 1e6:.3g}'} | {size / weights:.1f} | "
            + " | ".join(
                f"{medians[label][b] * 1e3:.3g} ({medians[label][b] / base[b]:.2f})"
                for b in BATCHES
            )
            + " |"
        )
    return out, weights, {label: size for label, size, _, _ in rows}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument(
        "--compact", action="store_true", help="export with sparse_matmul.COMPACT_EXPORTS = True"
    )
    args = parser.parse_args()
    sparse_matmul.COMPACT_EXPORTS = args.compact
    header = (
        f"backend={keras.backend.backend()} machine={platform.machine()} cpus={os.cpu_count()} "
        f"date={time.strftime('%Y-%m-%d')} compact_exports={args.compact}"
    )
    lines = [
        header,
        "",
        "| model | runtime | file (MB) | gzip (MB) | B/weight | "
        + " | ".join(f"batch {b}: ms (/ Keras)" for b in BATCHES)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(BATCHES),
    ]
    print("\n".join(lines), flush=True)
    sizes = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            rows, weights, sizes[name] = measure(name, MODELS[name], args.repeats, folder)
            sizes[name]["weights"] = weights
            lines.extend(rows)
            print("\n".join(rows), flush=True)
            keras.backend.clear_session()
    if {"mlp_sparse", "mlp_sparse_10"} <= set(sizes):
        small, large = sizes["mlp_sparse"], sizes["mlp_sparse_10"]
        added = large["weights"] - small["weights"]
        lines.append("")
        lines.append("Bytes per added connection (mlp_sparse_10 - mlp_sparse), by file:")
        for label in small:
            if label != "weights":
                slope = (large[label] - small[label]) / added
                lines.append(f"- {label}: {slope:.2f} B ({slope / 8:.2f} x 8 B)")
        print("\n".join(lines[-len(small) :]), flush=True)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
