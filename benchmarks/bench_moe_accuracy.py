"""Accuracy at equal cost: the demo's mixtures against dense MLPs, over seeds.

Four models per dataset and seed, trained alike (Adam 1e-3, batch 128, the
same epochs; SET evolves the mixtures' experts and routes):
- `PTSNE-gated sparse experts` and `softmax-gated sparse experts`: the
  mixtures of `examples/ptsne_gated_mose.py` (same arguments, same defaults);
- `dense MLP (equal width)`: one hidden layer as wide as all experts' hidden
  units together;
- `dense MLP (equal weights)`: one hidden layer sized so its weights match the
  PTSNE-gated mixture's `ksm.reporting.weights_used` (map network included).

For each it prints test accuracy (mean ± std over the seeds), train time (the
PTSNE gate's map fit included), the FLOPs per example the inference code runs
(`ksm.reporting.executed_flops`) and inference time per example (`predict`,
batch 1,024), and writes the table to `--markdown`.

    python benchmarks/bench_moe_accuracy.py --data ../shared/data/mnist.npz \\
        ../shared/data/fashion_mnist.npz --seeds 0 1 2 --epochs 20 [--markdown out.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

import keras_sparse_moe as ksm  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import ptsne_gated_mose as demo  # noqa: E402

EQUAL_WIDTH, EQUAL_WEIGHTS = "dense MLP (equal width)", "dense MLP (equal weights)"
MODELS = (demo.MODELS[0], demo.MODELS[1], EQUAL_WIDTH, EQUAL_WEIGHTS)


def dense_mlp(width, data):
    """`d -> width (relu) -> classes (softmax)`, compiled as the demo's models."""
    inputs = keras.Input((data.x_train.shape[1],))
    hidden = keras.layers.Dense(width, activation="relu")(inputs)
    outputs = keras.layers.Dense(data.num_classes, activation="softmax")(hidden)
    return demo.compiled(keras.Model(inputs, outputs))


def equal_weight_width(weights, data):
    """The hidden width `w` whose MLP holds about `weights` weights:
    `d*w + w + w*c + c = weights`."""
    d, c = data.x_train.shape[1], data.num_classes
    return max(1, round((weights - c) / (d + 1 + c)))


def run_one(kind, data, args, target_weights):
    keras.utils.set_random_seed(args.seed)
    start = time.perf_counter()
    if kind == EQUAL_WIDTH:
        model = dense_mlp(args.experts * args.expert_units, data)
    elif kind == EQUAL_WEIGHTS:
        model = dense_mlp(equal_weight_width(target_weights, data), data)
    else:
        model = demo.build(kind, data, args)
    callbacks = (
        [] if kind.startswith("dense") else [ksm.callbacks.SETEvolution(zeta=0.3, seed=args.seed)]
    )
    model.fit(
        data.x_train,
        data.y_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        callbacks=callbacks,
        verbose=0,
    )
    seconds = time.perf_counter() - start
    _, accuracy = model.evaluate(data.x_test, data.y_test, batch_size=1024, verbose=0)
    weights, flops = demo.cost(model, demo.INFERENCE_BATCH)
    per_example = demo.inference_seconds(model, data.x_test, demo.INFERENCE_BATCH)
    keras.backend.clear_session()
    return {
        "accuracy": accuracy,
        "weights": weights,
        "flops": flops,
        "infer": per_example,
        "train": seconds,
    }


def mean_std(values, scale=1.0, digits=2):
    values = [v * scale for v in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", nargs="+", required=True, help=".npz files (x/y_train/test)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--markdown", help="also write the table to this file")
    args, rest = parser.parse_known_args(argv)
    # The mixtures' own arguments (--experts, --top-k, ...) with the demo's defaults.
    model_args = demo.parse_args([*rest, "--epochs", str(args.epochs)])
    header = (
        f"backend={keras.backend.backend()} machine={platform.machine()} cpus={os.cpu_count()} "
        f"date={time.strftime('%Y-%m-%d')} epochs={args.epochs} seeds={args.seeds}"
    )
    print(header, flush=True)
    lines = [
        header,
        "",
        "| data | model | test accuracy (%) | train time (s) | inference µs / example "
        "| FLOPs / example | weights used |",
        "|---|---|---|---|---|---|---|",
    ]
    for path in args.data:
        data = ksm.datasets.load_image_classification(path)
        results = {kind: [] for kind in args.models}
        for seed in args.seeds:
            model_args.seed = seed
            target = None
            for kind in args.models:
                if kind == EQUAL_WEIGHTS and target is None:
                    raise ValueError(
                        "`--models`: the equal-weights MLP needs the PTSNE mixture first"
                    )
                result = run_one(kind, data, model_args, target)
                if kind == demo.MODELS[0]:
                    target = result["weights"]
                results[kind].append(result)
                print(
                    f"{data.name} seed {seed} {kind}: accuracy {result['accuracy']:.4f}, "
                    f"train {result['train']:.0f} s, infer {result['infer'] * 1e6:.1f} µs",
                    flush=True,
                )
        for kind, runs in results.items():
            lines.append(
                f"| {data.name} | {kind} | {mean_std([r['accuracy'] for r in runs], 100)} "
                f"| {mean_std([r['train'] for r in runs], digits=0)} "
                f"| {mean_std([r['infer'] for r in runs], 1e6, 1)} "
                f"| {runs[0]['flops']:,} | {runs[0]['weights']:,} |"
            )
    print("\n".join(lines[2:]))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
