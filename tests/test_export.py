"""Export of every layer and gate to every format Keras supports on the backend.

Each model is trained one step (once a process), exported, loaded in that
format's runtime (TensorFlow, ONNX Runtime, LiteRT's builtin-op interpreter,
OpenVINO) and compared with Keras' own outputs at several batch sizes (the batch
size is left free in every export). SavedModel and OpenVINO export every model
at once, as the outputs of one model on shared inputs: their conversions cost
seconds however small the model (jax2tf's on JAX, OpenVINO's).
"""

import functools
import os

import keras
import numpy as np
import pytest

from keras_sparse_moe.layers import (
    NoisyTopKGate,
    OracleGate,
    PTSNEGate,
    SparseConv1D,
    SparseConv2D,
    SparseDense,
    SparseExpertMixture,
)
from keras_sparse_moe.ops import sparse_matmul
from tests.test_case import compiled_call

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _no_openvino_telemetry(monkeypatch):
    """OpenVINO's converter sends usage events, each from a forked process it waits on
    for up to 3 s (0.4-0.7 s an export here, offline): the suite sends none."""
    try:
        from openvino_telemetry.backend.backend_ga4 import GA4Backend
    except ImportError:  # no OpenVINO, or a version without this backend
        return
    monkeypatch.setattr(GA4Backend, "send", lambda self, message: None)


MIXTURE = dict(units=3, num_experts=4, expert_units=8, expert_density=0.5, seed=0)


def _sequential(layer, dim=10):
    return keras.Sequential([keras.Input((dim,)), layer])


def _user_experts():
    return [
        keras.Sequential([keras.layers.Dense(6, activation="tanh"), keras.layers.Dense(3)])
        for _ in range(3)
    ]


def _oracle():
    x_in, index_in = keras.Input((10,)), keras.Input((1,), dtype="int32")
    mixture = SparseExpertMixture(
        gate=OracleGate(2), top_k=1, capacity_factor=1.0, units=3, num_experts=2, seed=1
    )
    return keras.Model([x_in, index_in], mixture(x_in, gate_inputs=index_in))


MODELS = {
    "sparse_dense": lambda: _sequential(SparseDense(7, density=0.3, activation="relu", seed=0)),
    "sparse_dense_sparse_storage": lambda: _sequential(
        SparseDense(7, density=0.3, activation="relu", seed=0, implementation="sparse")
    ),
    "sparse_conv1d": lambda: keras.Sequential(
        [
            keras.Input((10,)),
            keras.layers.Reshape((10, 1)),
            SparseConv1D(4, 3, padding="causal", density=0.5, activation="relu", seed=0),
            keras.layers.Flatten(),
        ]
    ),
    "sparse_conv2d_sparse_storage": lambda: keras.Sequential(
        [
            keras.Input((10,)),
            keras.layers.Reshape((5, 2, 1)),
            SparseConv2D(3, 2, padding="same", density=0.5, implementation="sparse", seed=0),
            keras.layers.Flatten(),
        ]
    ),
    "softmax_routes_capacity": lambda: _sequential(
        SparseExpertMixture(top_k=2, capacity_factor=1.0, route_density=0.2, **MIXTURE)
    ),
    "sparse_experts_routes": lambda: _sequential(
        SparseExpertMixture(
            top_k=2, capacity_factor=1.0, route_density=0.2, implementation="sparse", **MIXTURE
        )
    ),
    # Masked experts with routes kept by tile: a free batch size reads every connection.
    "noisy_top_k_capacity": lambda: _sequential(
        SparseExpertMixture(
            gate=NoisyTopKGate(4, top_k=2, seed=0),
            capacity_factor=1.25,
            route_density=0.2,
            route_implementation="tiles",
            **MIXTURE,
        )
    ),
    "user_experts": lambda: _sequential(
        SparseExpertMixture(experts=_user_experts(), top_k=2, capacity_factor=1.0)
    ),
    "ptsne_gate": lambda: _sequential(
        SparseExpertMixture(
            gate=PTSNEGate(4, perplexity=5.0, seed=0), top_k=2, capacity_factor=1.0, **MIXTURE
        )
    ),
    "oracle_gate_inputs": _oracle,
}


def _inputs(name, batch):
    x = RNG.standard_normal((batch, 10)).astype("float32")
    if name == "oracle_gate_inputs":
        return [x, RNG.integers(0, 2, (batch, 1)).astype("int32")]
    return [x]


@functools.cache  # one training per model and process: the exports only read it
def _trained(name):
    model = MODELS[name]()
    model.compile("adam", "mse")
    train = _inputs(name, 32)
    train = train if len(train) > 1 else train[0]
    model.fit(train, RNG.standard_normal((32, model.output_shape[-1])), epochs=1, verbose=0)
    return model


def _expected(model, inputs):
    return compiled_call(model, inputs if len(inputs) > 1 else inputs[0])


def _compare(served, expected, names, tol=1e-4):
    """`served` (the runtime's outputs, in order) against Keras' `expected`, one per name."""
    # The models' outputs come first (TensorFlow's OpenVINO conversion adds a few
    # dangling shape tensors after them).
    assert len(served) >= len(expected) == len(names)
    for name, a, b in zip(names, served, expected):
        np.testing.assert_allclose(np.asarray(a), b, rtol=tol, atol=tol, err_msg=name)


@pytest.mark.slow
def test_saved_model_export_reloads_with_equal_outputs(tmp_path):
    tf = pytest.importorskip("tensorflow", reason="SavedModel export needs TensorFlow")
    names = sorted(MODELS)
    model = _all_in_one(names)
    path = os.path.join(tmp_path, "exported")
    model.export(path, format="tf_saved_model", verbose=False)
    reloaded = tf.saved_model.load(path)
    for batch in (1, 5, 32):  # the batch size is left dynamic
        inputs = _all_inputs(batch)
        _compare(reloaded.serve(inputs), _expected(model, inputs), names, tol=1e-5)


def _run_onnx(path, inputs):
    """Every output, in order."""
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    feed = {spec.name: value for spec, value in zip(session.get_inputs(), inputs)}
    return session.run(None, feed)


def _run_litert(path, inputs):
    """Every output, in order."""
    from ai_edge_litert.interpreter import Interpreter

    # The plain interpreter has LiteRT's builtin ops only (no Flex delegate).
    interpreter = Interpreter(model_path=path)
    # LiteRT orders the inputs its own way: match them by dtype and row shape.
    feed = {}
    for spec in interpreter.get_input_details():
        (value,) = [
            v
            for v in inputs
            if v.dtype == spec["dtype"] and v.shape[1:] == tuple(spec["shape_signature"][1:])
        ]
        interpreter.resize_tensor_input(spec["index"], value.shape)
        feed[spec["index"]] = value
    interpreter.allocate_tensors()
    for index, value in feed.items():
        interpreter.set_tensor(index, value)
    interpreter.invoke()
    # The outputs' order is not the model's: their names end in the model's output index.
    outputs = interpreter.get_output_details()
    outputs.sort(key=lambda spec: int(spec["name"].rsplit(":", 1)[1]))
    return [interpreter.get_tensor(spec["index"]) for spec in outputs]


def _run_openvino(path, inputs):
    """Every output, in order."""
    import openvino

    # float32: on CPUs with bfloat16 units (AMX, AVX512-BF16) OpenVINO otherwise
    # infers in bfloat16, 0.3 % off the model.
    compiled = openvino.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    results = compiled(inputs)
    return [results[output] for output in compiled.outputs]


# format -> (file name, runtime module, runner). On JAX, OpenVINO reads the ONNX
# export: Keras' own JAX -> OpenVINO route needs jax2tf's non-native
# serialization, which current JAX no longer has (it fails for a plain Dense).
EXPORTS = {
    "onnx": ("model.onnx", "onnxruntime", _run_onnx),
    "litert": ("model.tflite", "ai_edge_litert", _run_litert),
    "openvino": ("model.xml", "openvino", _run_openvino),
}


def _formats():
    if keras.backend.backend() == "tensorflow":
        return ["onnx", "litert", "openvino"]
    return ["onnx", "openvino"]


def _export_and_compare(model, fmt, tmp_path, names, inputs_at=None):
    """Exports `model` to `fmt`, runs it in the format's runtime at batch sizes 1 and 7
    and compares each output with Keras' (one output per name; the inputs from
    `inputs_at(batch)`, by default those of `_all_in_one`)."""
    file_name, runtime, run = EXPORTS[fmt]
    pytest.importorskip(runtime, reason=f"the {fmt} runtime is in the `export` extra")
    exported = "onnx" if fmt == "openvino" and keras.backend.backend() == "jax" else fmt
    path = os.path.join(tmp_path, file_name if exported == fmt else EXPORTS[exported][0])
    model.export(path, format=exported, verbose=False)
    for batch in (1, 7):
        inputs = (inputs_at or _all_inputs)(batch)
        expected = _expected(model, inputs)
        _compare(run(path, inputs), expected if isinstance(expected, list) else [expected], names)


# tf2onnx's and LiteRT's conversions grow faster than the graph: one model each
# is quicker there. OpenVINO's fixed cost is what dominates (one export for all).
@pytest.mark.parametrize("fmt", [f for f in _formats() if f != "openvino"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_export_runs_in_the_formats_runtime_with_equal_outputs(name, fmt, tmp_path):
    inputs_at = functools.partial(_inputs, name)
    _export_and_compare(_trained(name), fmt, tmp_path, [name], inputs_at)


@pytest.mark.slow
def test_every_model_runs_in_openvino_with_equal_outputs(tmp_path):
    names = sorted(MODELS)
    _export_and_compare(_all_in_one(names), "openvino", tmp_path, names)


def _all_in_one(names):
    """One model whose outputs are those of the trained `names` models (in that order),
    on shared inputs: OpenVINO's conversion costs seconds per export, however small
    the model, so every model is converted in one export."""
    x_in, index_in = keras.Input((10,)), keras.Input((1,), dtype="int32")
    outputs = []
    for name in names:
        inputs = [x_in, index_in] if name == "oracle_gate_inputs" else x_in
        named = keras.Model(inputs, _trained(name)(inputs), name=name)  # unique names
        outputs.append(named(inputs))
    model = keras.Model([x_in, index_in], outputs)
    model([x_in, index_in])  # JAX's ONNX export wants a called model: a symbolic call does
    return model


def _all_inputs(batch):
    return _inputs("oracle_gate_inputs", batch)  # x and the oracle's index


def _size(path):
    """Bytes of a file or of a folder's files (a SavedModel)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _bytes_per_connection(fmt, tmp_path):
    """Bytes a sparse-storage connection adds to the `fmt` file (or export)."""
    exported = "onnx" if fmt == "openvino" and keras.backend.backend() == "jax" else fmt
    names = {"keras": "model.keras", "tf_saved_model": "saved_model"}
    name = names.get(exported) or EXPORTS[exported][0]
    sizes, counts = [], []
    for density in (0.1, 0.3):
        layer = SparseDense(200, density=density, seed=0, implementation="sparse")
        model = _sequential(layer, dim=300)
        model(np.zeros((1, 300), "float32"))  # the ONNX export wants a called model
        path = os.path.join(tmp_path, f"{density}_{name}")
        if fmt == "keras":
            model.save(path)
        else:
            model.export(path, format=exported, verbose=False)
        sizes.append(_size(path) + (_size(path[:-4] + ".bin") if path.endswith(".xml") else 0))
        counts.append(layer.num_connections)
    return (sizes[1] - sizes[0]) / (counts[1] - counts[0])


def _skip_without(fmt):
    if fmt in EXPORTS:
        pytest.importorskip(EXPORTS[fmt][1], reason=f"the {fmt} runtime is in the `export` extra")
    if fmt == "tf_saved_model":
        pytest.importorskip("tensorflow", reason="SavedModel export needs TensorFlow")


# Formats whose converter folds computed indices into constants (TensorFlow's).
FOLDING = {"onnx", "litert", "openvino"} if keras.backend.backend() == "tensorflow" else set()


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["keras", "tf_saved_model", *_formats()])
def test_sparse_storage_files_grow_by_8_bytes_a_connection(fmt, tmp_path, monkeypatch):
    """A float32 value and one int32 position a connection. TensorFlow's converters
    keep that with `COMPACT_EXPORTS` (and their unpacked, faster indices without it:
    O(nnz) still)."""
    _skip_without(fmt)
    if fmt in FOLDING:
        (tmp_path / "default").mkdir()
        assert 8 < _bytes_per_connection(fmt, tmp_path / "default") < 4 * 8
        monkeypatch.setattr(sparse_matmul, "COMPACT_EXPORTS", True)
    per_connection = _bytes_per_connection(fmt, tmp_path)
    # Keras' TensorFlow SavedModel writes every variable twice (a plain Dense layer's too).
    copies = 2 if fmt == "tf_saved_model" and keras.backend.backend() == "tensorflow" else 1
    assert 7.5 * copies <= per_connection <= 1.3 * 8 * copies  # (names vary by a byte or two)


@pytest.mark.tensorflow_only
@pytest.mark.parametrize("fmt", ["onnx", "litert", "openvino"])
def test_compact_exports_run_with_equal_outputs(fmt, tmp_path, monkeypatch):
    """`COMPACT_EXPORTS` changes TensorFlow's serving graphs only (JAX's keep the
    stored positions anyway)."""
    monkeypatch.setattr(sparse_matmul, "COMPACT_EXPORTS", True)
    names = ["sparse_conv2d_sparse_storage", "sparse_experts_routes"]
    _export_and_compare(_all_in_one(names), fmt, tmp_path, names)
