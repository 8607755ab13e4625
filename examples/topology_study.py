"""Seed 002's study: does accuracy follow a sparse topology's connectivity rather than its density?

MLPs on MNIST whose hidden layers are `keras_sparse_moe.layers.SparseDense`
with a fixed (never evolved) topology, in the seed's setup: sigmoid units,
Glorot-Gaussian initialisation (over the connections a unit has:
`density_aware_init=True`), SGD with Nesterov momentum, mean squared error on
one-hot targets. The sweep crosses

- the topology: random (Erdős–Rényi, same number of connections), pseudo-random
  regular (one random row rotated), random expander (random biregular),
  structured regular (evenly spaced, rotated) and Fibonacci offsets;
- the degree `d`: each unit of a layer's input feeds `d` of its outputs;
- the depth (one or two hidden layers) and dropout (none or 0.2);

with a fully connected network of each depth/dropout as the reference. Each
sparse layer's bipartite graph is measured by its algebraic connectivity
(second-smallest Laplacian eigenvalue) and spectral gap (`σ1 − σ2`); a
network's value is the mean over its sparse layers.

Prints the accuracy table, each topology's connectivity figures, the
correlation (Pearson r and Spearman ρ) of accuracy with each measure, and the
trained first-layer weight distribution per degree; writes
`accuracy_vs_connectivity.png`, `weight_distribution.png` and `results.md`.

    python examples/topology_study.py --data ../shared/data/mnist.npz   # about 15 min on 2 cores
    python examples/topology_study.py --degrees 3 10 --depths 1 --dropouts 0   # a quick look
"""

from __future__ import annotations

import argparse
import os
import time

# Before TensorFlow loads: the tables and progress bars, not TensorFlow's C++ log lines.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import scipy.stats

import keras_sparse_moe as ksm

TOPOLOGIES = {
    "random": "erdos_renyi",
    "pseudo-random regular": "pseudo_random_regular",
    "random expander": "random_regular",
    "structured regular": "structured_regular",
    "Fibonacci": "fibonacci",
}
DENSE = "fully connected"


def hidden_layer(topology, degree, units, seed):
    if topology == DENSE:
        return keras.layers.Dense(units, activation="sigmoid", kernel_initializer="glorot_normal")
    builder = TOPOLOGIES[topology]
    if builder == "erdos_renyi":  # same number of connections, no per-unit degree
        kwargs = {"density": degree / units}
    else:
        kwargs = {"topology_kwargs": {"degree": degree}}
    return ksm.layers.SparseDense(
        units,
        topology=builder,
        activation="sigmoid",
        kernel_initializer="glorot_normal",
        density_aware_init=True,
        seed=seed,
        **kwargs,
    )


def build(topology, degree, depth, dropout, units, input_dim, classes, learning_rate, seed):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((input_dim,))
    x = inputs
    for i in range(depth):
        x = hidden_layer(topology, degree, units, seed + i)(x)
        if dropout:
            x = keras.layers.Dropout(dropout)(x)
    outputs = keras.layers.Dense(classes, activation="softmax", kernel_initializer="glorot_normal")(
        x
    )
    model = keras.Model(inputs, outputs)
    model.compile(
        keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True),
        "mean_squared_error",
        metrics=["accuracy"],
        # TensorFlow's XLA draws dropout's random numbers slowly on CPU (3x the
        # step time here); without XLA the step costs what it does without dropout.
        jit_compile=not (dropout and keras.backend.backend() == "tensorflow"),
    )
    return model


def connectivity(model):
    """(algebraic connectivity, spectral gap, density): means over the sparse layers."""
    layers = [la for la in model.layers if isinstance(la, ksm.layers.SparseDense)]
    if not layers:
        return float("nan"), float("nan"), 1.0
    masks = [la.dense_mask() for la in layers]
    return (
        float(np.mean([ksm.topologies.algebraic_connectivity(m) for m in masks])),
        float(np.mean([ksm.topologies.spectral_gap(m) for m in masks])),
        float(np.mean([la.actual_density for la in layers])),
    )


def first_layer_weights(model):
    layer = model.layers[1]
    if isinstance(layer, ksm.layers.SparseDense):
        return keras.ops.convert_to_numpy(layer.connection_values())
    return keras.ops.convert_to_numpy(layer.kernel).ravel()


def correlations(rows):
    """Pearson r and Spearman ρ of accuracy with each measure, over sparse runs."""
    acc = np.array([r["accuracy"] for r in rows])
    out = {}
    for key in ("algebraic connectivity", "spectral gap", "density"):
        values = np.array([r[key] for r in rows])
        if len(rows) < 3 or np.ptp(values) == 0 or np.ptp(acc) == 0:
            out[key] = (float("nan"), float("nan"))
            continue
        out[key] = (
            float(scipy.stats.pearsonr(values, acc)[0]),
            float(scipy.stats.spearmanr(values, acc)[0]),
        )
    return out


def setting_name(depth, dropout):
    layers = "1 hidden layer" if depth == 1 else f"{depth} hidden layers"
    return f"{layers}, " + (f"dropout {dropout:g}" if dropout else "no dropout")


def plot(rows, settings, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(settings), 2, figsize=(10, 3.2 * len(settings)), squeeze=False, sharey="row"
    )
    markers = "osD^v<>"
    degrees = sorted({r["degree"] for r in rows if r["topology"] != DENSE})
    for (depth, dropout), row_axes in zip(settings, axes):
        part = [r for r in rows if (r["depth"], r["dropout"]) == (depth, dropout)]
        sparse = [r for r in part if r["topology"] != DENSE]
        stats = correlations(sparse)
        for ax, key in zip(row_axes, ("spectral gap", "algebraic connectivity")):
            for t, topology in enumerate(TOPOLOGIES):
                for d, degree in enumerate(degrees):
                    pts = [r for r in sparse if r["topology"] == topology and r["degree"] == degree]
                    ax.scatter(
                        [r[key] for r in pts],
                        [r["accuracy"] for r in pts],
                        color=f"C{t}",
                        marker=markers[d % len(markers)],
                        label=f"{topology}" if d == 0 else None,
                    )
            for r in part:
                if r["topology"] == DENSE:
                    ax.axhline(r["accuracy"], color="k", ls="--", lw=0.8, label=DENSE)
            ax.set_xscale("symlog", linthresh=1e-2)  # disconnected graphs sit at 0
            ax.set_xlim(-5e-3, 1.5 * max([r[key] for r in sparse] + [1.0]))
            r_p, r_s = stats[key]
            ax.set_title(f"{setting_name(depth, dropout)}: r={r_p:.2f}, ρ={r_s:.2f}", fontsize=9)
            ax.set_xlabel(key + " (mean over sparse layers)")
        row_axes[0].set_ylabel("test accuracy")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    handles += [
        plt.Line2D([], [], color="grey", marker=markers[d % len(markers)], ls="", label=f"d={g}")
        for d, g in enumerate(degrees)
    ]
    fig.legend(handles=handles, loc="upper center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_weights(weights, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, w in weights.items():
        ax.hist(w, bins=120, density=True, histtype="step", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("trained first-layer weight (connections only)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=None, help=".npz with x_train, y_train, x_test, y_test")
    parser.add_argument("--degrees", type=int, nargs="+", default=[3, 10, 30])
    parser.add_argument("--topologies", nargs="+", default=list(TOPOLOGIES), choices=TOPOLOGIES)
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.2])
    parser.add_argument("--units", type=int, default=300, help="width of each hidden layer")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1.0)
    parser.add_argument("--train", type=int, default=None, help="use the first N training images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join("demo_output", "topology_study"))
    args = parser.parse_args(argv)
    if min(args.degrees) < 1 or max(args.degrees) > args.units:
        parser.error(f"--degrees must lie in [1, --units={args.units}]. Received: {args.degrees}")

    data = ksm.datasets.load_image_classification(args.data)
    x, y = data.x_train[: args.train], data.y_train[: args.train]
    x_test, y_test = data.x_test, data.y_test
    classes = data.num_classes
    one_hot = keras.utils.to_categorical(y, classes)
    one_hot_test = keras.utils.to_categorical(y_test, classes)
    print(
        f"data: {data.name}, {len(x)} train / {len(x_test)} test; {args.epochs} epochs, "
        f"SGD {args.learning_rate:g} Nesterov 0.9, batch {args.batch_size}, MSE, sigmoid, "
        f"{args.units} units per hidden layer"
    )
    settings = [(depth, dropout) for depth in args.depths for dropout in args.dropouts]
    runs = [(DENSE, None, s) for s in settings] + [
        (t, d, s) for s in settings for d in args.degrees for t in args.topologies
    ]
    rows, weights = [], {}
    start = time.perf_counter()
    for n, (topology, degree, (depth, dropout)) in enumerate(runs, 1):
        model = build(
            topology,
            degree,
            depth,
            dropout,
            args.units,
            x.shape[1],
            classes,
            args.learning_rate,
            args.seed,
        )
        lam2, gap, density = connectivity(model)
        tic = time.perf_counter()
        model.fit(x, one_hot, batch_size=args.batch_size, epochs=args.epochs, verbose=0)
        accuracy = float(model.evaluate(x_test, one_hot_test, verbose=0, batch_size=1024)[1])
        row = {
            "topology": topology,
            "degree": degree,
            "depth": depth,
            "dropout": dropout,
            "accuracy": accuracy,
            "algebraic connectivity": lam2,
            "spectral gap": gap,
            "density": density,
            "seconds": time.perf_counter() - tic,
        }
        rows.append(row)
        if (depth, dropout) == settings[0] and topology in (DENSE, "random"):
            label = DENSE if topology == DENSE else f"random, d={degree} ({density:.1%})"
            weights[label] = first_layer_weights(model)
        print(
            f"[{n}/{len(runs)}] {setting_name(depth, dropout)} | {topology}"
            + ("" if degree is None else f", d={degree}")
            + f": accuracy {accuracy:.4f}, λ2 {lam2:.4g}, gap {gap:.4g} "
            f"({row['seconds']:.0f} s, {time.perf_counter() - start:.0f} s so far)",
            flush=True,
        )

    lines = [
        "| setting | topology | d | density | test acc | algebraic conn. | spectral gap |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        degree = "–" if r["degree"] is None else str(r["degree"])
        lines.append(
            f"| {setting_name(r['depth'], r['dropout'])} | {r['topology']} | {degree} | "
            f"{r['density']:.4f} | {r['accuracy']:.4f} | {r['algebraic connectivity']:.4g} | "
            f"{r['spectral gap']:.4g} |"
        )
    lines += [
        "",
        "Correlation of test accuracy with each measure, over the sparse runs of a setting "
        "(all degrees; then at one degree, i.e. equal density, averaged over degrees):",
        "",
        "| setting | measure | r (all) | ρ (all) | r (equal density) | ρ (equal density) |",
        "|---|---|---|---|---|---|",
    ]
    for depth, dropout in settings:
        sparse = [r for r in rows if (r["depth"], r["dropout"]) == (depth, dropout) and r["degree"]]
        overall = correlations(sparse)
        by_degree = [correlations([r for r in sparse if r["degree"] == d]) for d in args.degrees]
        for key in ("algebraic connectivity", "spectral gap", "density"):
            same = np.array([c[key] for c in by_degree])
            same_r = np.nanmean(same[:, 0]) if np.isfinite(same).any() else float("nan")
            same_s = np.nanmean(same[:, 1]) if np.isfinite(same).any() else float("nan")
            lines.append(
                f"| {setting_name(depth, dropout)} | {key} | {overall[key][0]:.2f} | "
                f"{overall[key][1]:.2f} | {same_r:.2f} | {same_s:.2f} |"
            )
    lines += [
        "",
        "Trained first-layer weights (connections only), "
        f"{setting_name(*settings[0])}, random topology:",
        "",
        "| network | weights | mean abs | std | 99th pct abs |",
        "|---|---|---|---|---|",
    ]
    for label, w in weights.items():
        lines.append(
            f"| {label} | {w.size} | {np.mean(np.abs(w)):.4f} | {np.std(w):.4f} | "
            f"{np.percentile(np.abs(w), 99):.4f} |"
        )
    summary = "\n".join(lines)
    print("\n" + summary)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(summary + "\n")
    try:
        plot(rows, settings, os.path.join(args.out, "accuracy_vs_connectivity.png"))
        plot_weights(weights, os.path.join(args.out, "weight_distribution.png"))
    except ImportError:
        print("matplotlib is not installed (pip install keras-sparse-moe[plots]): no pictures")
        return rows
    print(f"wrote results.md, accuracy_vs_connectivity.png, weight_distribution.png to {args.out}")
    return rows


if __name__ == "__main__":
    main()
