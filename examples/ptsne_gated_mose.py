"""Seed 000 end to end: a mixture of sparse experts gated by a parametric t-SNE map.

A `keras_sparse_moe.layers.SparseExpertMixture` of sparse one-hidden-layer
experts (`expert_density`), linked by a few sparse routes (`route_density`),
evolved by SET inside `model.fit`, and gated by a `PTSNEGate`: a network maps
every image to a point of a 2-D t-SNE map and each expert owns a region of
that map (k-means positions); every image goes to its `top_k` nearest experts
(the capacity dispatch in training, the dropless grouped dispatch at
inference). The map network starts as a
`keras_sparse_moe.ParametricTSNE` of the training images and keeps training
with the gate's per-batch t-SNE loss and the task.
It is compared with
- the same mixture under a softmax gate (`SoftmaxGate`, one Dense layer), and
- a dense MLP of the same depth whose hidden layer is as wide as all the
  experts' hidden units together,
on every dataset given (MNIST, Fashion-MNIST). For each it prints test
accuracy, weights used, the FLOPs per example its inference code executes
(`ksm.reporting.executed_flops`) and its inference time per example; for the
PTSNE-gated mixture the gate's share of that time, the
per-class activation-rate table, and it writes the gate map, the table as a
picture, a `.keras` file (reloaded and checked) and, on TensorFlow, a
SavedModel (reloaded and checked).

    python examples/ptsne_gated_mose.py [--data mnist.npz fashion_mnist.npz] [--epochs 3]
        [--experts 10] [--out demo_output]

Without `--data` it uses Keras' MNIST (cache or download), and offline
scikit-learn's bundled 8x8 digits.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import time

# Before TensorFlow loads: the tables and progress bars, not TensorFlow's C++ log lines.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np

import keras_sparse_moe as ksm

MODELS = ("PTSNE-gated sparse experts", "softmax-gated sparse experts", "dense MLP")
INFERENCE_BATCH = 1024


def build(kind, data, args):
    """One of `MODELS`, compiled; the mixtures output logits, a softmax follows."""
    dim, classes = data.x_train.shape[1], data.num_classes
    inputs = keras.Input((dim,))
    if kind == "dense MLP":
        hidden = keras.layers.Dense(args.experts * args.expert_units, activation="relu")(inputs)
        logits = keras.layers.Dense(classes)(hidden)
    else:
        if kind.startswith("PTSNE"):
            embedding = pretrained_map(data, args)
            gate = ksm.layers.PTSNEGate(
                args.experts,
                embedding=embedding,
                perplexity=args.perplexity,
                tsne_weight=args.tsne_weight,
                seed=args.seed,
            )
        else:
            gate = ksm.layers.SoftmaxGate(args.experts)
        logits = ksm.layers.SparseExpertMixture(
            units=classes,
            num_experts=args.experts,
            expert_units=args.expert_units,
            expert_density=args.expert_density,
            route_density=args.route_density,
            gate=gate,
            top_k=args.top_k,
            capacity_factor=args.capacity_factor,
            balance_losses="entropy",
            seed=args.seed,
            name="mixture",
        )(inputs)
    outputs = keras.layers.Softmax()(logits)
    return compiled(keras.Model(inputs, outputs, name=kind.replace(" ", "_")))


def compiled(model):
    """`model` compiled as every model of the demo is trained (Adam 1e-3, XLA)."""
    model.compile(
        keras.optimizers.Adam(1e-3),
        "sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=True,
    )
    return model


def pretrained_map(data, args):
    """The gate's map network: a `ParametricTSNE` of the training images (global affinities).

    A batch of 128 random images holds few true neighbours, so a map trained
    only by the gate's per-batch t-SNE loss stays coarse; starting from a map
    fitted on the whole training set gives the experts meaningful regions,
    and the gate's loss keeps it a t-SNE map while the task trains.
    """
    if not args.map_epochs:
        layers = [keras.layers.Dense(units, activation="relu") for units in args.gate_hidden]
        return keras.Sequential([*layers, keras.layers.Dense(2)], name="embedding")
    print(f"\n== ParametricTSNE map of the {len(data.x_train)} training images")
    tsne = ksm.ParametricTSNE(
        hidden=tuple(args.gate_hidden),
        perplexity=args.perplexity,
        epochs=args.map_epochs,
        seed=args.seed,
        verbose=2,
    )
    return tsne.fit(data.x_train).network_


def cost(model, batch_size):
    """(weights used, FLOPs per example the inference code executes at `batch_size`).

    Weights count connections, not masked kernels; FLOPs come from
    `ksm.reporting.executed_flops`: the gate, the `top_k` experts a token visits
    (plus the padding of the grouped layout) and the routes between them.
    """
    flops = ksm.reporting.executed_flops(model, batch_size=batch_size)["total"]
    return ksm.reporting.weights_used(model), flops


def inference_seconds(model, x, batch_size):
    """Seconds per example of `model.predict` on `x` (after one call that compiles)."""
    model.predict(x, batch_size=batch_size, verbose=0)
    start = time.perf_counter()
    model.predict(x, batch_size=batch_size, verbose=0)
    return (time.perf_counter() - start) / len(x)


def gate_share(model, x, batch_size):
    """`(gate seconds, model seconds)` per example at inference: the mixture's gate
    alone (the same layer, called on the model's input) against the whole model."""
    (mixture,) = [lay for lay in model.layers if isinstance(lay, ksm.layers.SparseExpertMixture)]
    gate_model = keras.Model(model.inputs, mixture.gate(model.inputs[0]))
    return inference_seconds(gate_model, x, batch_size), inference_seconds(model, x, batch_size)


def check_saving(model, x, out, tag):
    """`.keras` round trip and (TensorFlow) SavedModel export, both checked on `x`.

    Every check runs `x` as one batch: with the capacity dispatch, which
    assignments overflow depends on the batch, so `predict`'s batches of 32
    would not compare with one call on all of `x`.
    """
    expected = keras.ops.convert_to_numpy(model(x, training=False))
    path = os.path.join(out, f"{tag}.keras")
    model.save(path)
    reloaded = keras.models.load_model(path)
    gap = float(np.abs(keras.ops.convert_to_numpy(reloaded(x, training=False)) - expected).max())
    lines = [f"saved {path}; reloaded, max |difference| {gap:.1e}"]
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        folder = os.path.join(out, f"{tag}_savedmodel")
        model.export(folder, format="tf_saved_model", verbose=False)
        served_model = tf.saved_model.load(folder)  # kept: its variables live with it
        served = served_model.serve(x).numpy()
        gap = float(np.abs(served - expected).max())
        lines.append(f"exported SavedModel {folder}; served, max |difference| {gap:.1e}")
    return lines


def run_dataset(path, args):
    data = ksm.datasets.load_image_classification(path)
    limit = args.train_samples
    if limit and limit < len(data.x_train):
        data.x_train, data.y_train = data.x_train[:limit], data.y_train[:limit]
    # Small sets (the offline digits) get more epochs: at least `min_steps` steps in all.
    steps = math.ceil(len(data.x_train) / args.batch_size)
    epochs = max(args.epochs, math.ceil(args.min_steps / steps))
    print(
        f"\n### {data.name}: {len(data.x_train)} train / {len(data.x_test)} test images, "
        f"{epochs} epochs of {steps} steps"
    )
    rows, extras = [], {}
    for kind in MODELS:
        keras.utils.set_random_seed(args.seed)
        start = time.perf_counter()  # the PTSNE gate's map is fitted in `build`: counted
        model = build(kind, data, args)
        callbacks = []
        if kind != "dense MLP":
            # SET evolves the experts and the routes; routes regrow only between experts
            # (`expert_routes` is bounded by `BlockPattern.between_clusters`).
            callbacks.append(ksm.callbacks.SETEvolution(zeta=0.3, seed=args.seed))
        print(f"\n== {kind}")
        model.fit(
            data.x_train,
            data.y_train,
            batch_size=args.batch_size,
            epochs=epochs,
            callbacks=callbacks,
            verbose=2,
        )
        seconds = time.perf_counter() - start
        _, accuracy = model.evaluate(data.x_test, data.y_test, batch_size=1024, verbose=0)
        weights, flops = cost(model, INFERENCE_BATCH)
        per_example = inference_seconds(model, data.x_test, INFERENCE_BATCH)
        rows.append((data.name, kind, accuracy, weights, flops, per_example, seconds))
        if kind.startswith("PTSNE"):
            extras = {"model": model, "data": data}
    return rows, extras


def report_ptsne(extras, args):
    """Activation-rate table, gate map, saving: the PTSNE-gated mixture of one dataset."""
    model, data = extras["model"], extras["data"]
    tag = re.sub(r"[^a-z0-9]+", "_", os.path.splitext(data.name)[0].lower()).strip("_")
    table = ksm.routing.activation_rates(
        model, {tag: data.x_test}, by_class={tag: data.y_test}, verbose=False
    )
    print(f"\nPer-class activation rates on {data.name} (mean gate value per class and expert)")
    print(table.to_markdown(2))
    lines = []
    try:
        path = os.path.join(args.out, f"gate_map_{tag}.png")
        ksm.plots.gate_map(model, data.x_test[:4000], data.y_test[:4000], path=path)
        lines.append(f"wrote {path}")
        path = os.path.join(args.out, f"activation_rates_{tag}.png")
        ksm.plots.activation_table(table, path=path, title=f"activation rates, {data.name}")
        lines.append(f"wrote {path}")
    except ImportError:
        lines.append("no pictures: matplotlib is missing (pip install keras-sparse-moe[plots])")
    gate, whole = gate_share(model, data.x_test, INFERENCE_BATCH)
    (mixture,) = [lay for lay in model.layers if isinstance(lay, ksm.layers.SparseExpertMixture)]
    trained = sum(int(np.prod(v.shape)) for v in mixture.gate.trainable_weights)
    frozen = sum(int(np.prod(v.shape)) for v in mixture.gate.non_trainable_weights)
    lines.append(
        f"PTSNE gate at inference: {gate * 1e6:.1f} of {whole * 1e6:.1f} µs per example "
        f"({100 * gate / whole:.0f} %); its map network holds {trained:,} trained weights "
        f"(and {frozen:,} frozen: the principal-component projection, running statistics)"
    )
    lines += check_saving(model, data.x_test[:256], args.out, f"ptsne_mose_{tag}")
    print("\n".join(lines))
    return table


def parse_args(argv=None):
    """The demo's arguments (also the model arguments of `benchmarks/bench_moe_accuracy.py`)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", nargs="*", default=[None], help=".npz files (x/y_train/test)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--min-steps",
        type=int,
        default=1000,
        help="more epochs on small sets: at least this many steps",
    )
    parser.add_argument("--train-samples", type=int, default=0, help="first N training images")
    parser.add_argument("--experts", type=int, default=10)
    parser.add_argument("--expert-units", type=int, default=64)
    parser.add_argument("--expert-density", type=float, default=0.2)
    parser.add_argument("--route-density", type=float, default=0.02)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--capacity-factor", type=float, default=1.5)
    parser.add_argument("--perplexity", type=float, default=30.0)
    parser.add_argument("--gate-hidden", type=int, nargs="+", default=[128, 128])
    parser.add_argument(
        "--map-epochs", type=int, default=5, help="ParametricTSNE epochs of the gate's map; 0: none"
    )
    parser.add_argument("--tsne-weight", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="demo_output", help="folder for pictures and models")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rows, tables = [], []
    for path in args.data or [None]:
        dataset_rows, extras = run_dataset(path, args)
        rows += dataset_rows
        tables.append(report_ptsne(extras, args))
    lines = [
        f"Results after {args.epochs} epochs, at least {args.min_steps} steps "
        f"({keras.backend.backend()} backend)",
        f"| data | model | test accuracy | weights used | FLOPs / example | "
        f"inference µs / example (batch {INFERENCE_BATCH}) | train time |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, kind, accuracy, weights, flops, per_example, seconds in rows:
        lines.append(
            f"| {name} | {kind} | {accuracy:.4f} | {weights:,} | {flops:,} "
            f"| {per_example * 1e6:.1f} | {seconds:.0f} s |"
        )
    print("\n" + "\n".join(lines))
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return rows, tables


if __name__ == "__main__":
    main()
