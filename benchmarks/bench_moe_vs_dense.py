"""A mixture of sparse experts against the dense MLP it replaces, in time.

For each size, three models with the same input and output are timed in turns
in one process (so machine noise hits them alike):
- `dense`: the MLP of equal hidden width, `d -> E * expert_units (relu) -> units`;
- `all experts`: the mixture computing every expert on every token and
  weighting the unselected ones by zero (`dispatch="all"`);
- `mixture`: the same mixture as shipped (`top_k`: each expert computes only
  its tokens, the dropless grouped dispatch).

Measures (median of `--repeats` rounds): inference latency at batch 1 and
throughput at batch 1,024 (the compiled forward pass, as serving runs it),
one training step at batch 256 (`train_on_batch`, compiled) and the first
training step's compile time. The table gives milliseconds and the ratios
`mixture / dense` and `mixture / all experts`.

    python benchmarks/bench_moe_vs_dense.py [--sizes demo wide top2of16 sweep] \\
        [--repeats 5] [--markdown docs/moe_vs_dense_BACKEND.md] [--plot PICTURE.png] \\
        [--implementation sparse] [--route-implementation tiles] [--skip-all]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import keras
import numpy as np

from keras_sparse_moe.layers import SparseExpertMixture
from keras_sparse_moe.ops import dispatch

# name -> (d, E, expert_units, units, expert_density, route_density, top_k)
SIZES = {
    "demo": (784, 10, 64, 10, 0.2, 0.02, 2),
    "demo-noroutes": (784, 10, 64, 10, 0.2, 0.0, 2),
    "wide": (1024, 64, 256, 1024, 0.05, 0.0, 2),
    "wide+routes": (1024, 64, 256, 1024, 0.05, 0.02, 2),
    "mid+routes": (1024, 16, 256, 1024, 0.05, 0.02, 2),  # a 4,096^2 route matrix
    "top2of16": (1024, 16, 1024, 1024, 0.1, 0.0, 2),
}
SWEEP = [8, 16, 32, 64, 128]  # E at d = 1024, expert_units = 256, density 5 %, top-2


def sweep_size(e):
    return (1024, e, 256, 1024, 0.05, 0.0, 2)


def build(kind, size, seed=0, implementation="masked", route_implementation=None):
    d, e, h, units, density, routes, k = size
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((d,))
    if kind == "dense":
        hidden = keras.layers.Dense(e * h, activation="relu")(inputs)
        outputs = keras.layers.Dense(units)(hidden)
    else:
        outputs = SparseExpertMixture(
            units=units,
            num_experts=e,
            expert_units=h,
            expert_density=density,
            route_density=routes,
            top_k=k,
            dispatch="all" if kind == "all experts" else "auto",
            implementation=implementation,
            route_implementation=route_implementation,
            seed=seed,
        )(inputs)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.SGD(0.01), "mse", jit_compile=True)
    return model


def forward_fn(model):
    """The compiled inference forward pass, `x -> y`."""
    if keras.backend.backend() == "jax":
        import jax

        fn = jax.jit(lambda tv, ntv, x: model.stateless_call(tv, ntv, x, training=False)[0])
        # Read the variables at each call: training steps donate their old buffers.
        return lambda x: fn(
            [v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables],
            x,
        )
    import tensorflow as tf

    return tf.function(lambda x: model(x, training=False), jit_compile=True)


def _block(y):
    return keras.ops.convert_to_numpy(y[:1])


def measure(models, d, units, repeats, batches=(1, 1024), train_batch=256):
    """`{model: {measure: [seconds, one per round]}}`, timed in turns."""
    rng = np.random.default_rng(0)
    # On the device once: a host array would be copied over at every call.
    xs = {
        b: keras.ops.convert_to_tensor(rng.standard_normal((b, d)).astype("float32"))
        for b in batches
    }
    xt = rng.standard_normal((train_batch, d)).astype("float32")
    yt = rng.standard_normal((train_batch, units)).astype("float32")
    times = {name: {} for name in models}
    fns = {}
    for name, model in models.items():
        start = time.perf_counter()
        model.train_on_batch(xt, yt)
        times[name]["compile (s)"] = [time.perf_counter() - start]
        fns[name] = forward_fn(model)
        for x in xs.values():
            _block(fns[name](x))
    for _ in range(repeats):
        for name, model in models.items():
            for b, x in xs.items():
                calls = 20 if b == 1 else 5
                start = time.perf_counter()
                for _ in range(calls):  # queued back to back; one wait at the end
                    y = fns[name](x)
                _block(y)
                times[name].setdefault(f"infer b={b}", []).append(
                    (time.perf_counter() - start) / calls
                )
            start = time.perf_counter()
            for _ in range(3):
                model.train_on_batch(xt, yt)
            times[name].setdefault(f"train b={train_batch}", []).append(
                (time.perf_counter() - start) / 3
            )
    return {n: {m: statistics.median(v) for m, v in t.items()} for n, t in times.items()}


def device():
    if keras.backend.backend() == "jax":
        import jax

        return jax.devices()[0].device_kind
    return "cpu"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["demo", "wide", "top2of16", "sweep"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--infer-batch", type=int, default=1024, help="throughput batch")
    parser.add_argument("--train-batch", type=int, default=256)
    parser.add_argument("--markdown", help="also write the tables to this file")
    parser.add_argument("--plot", help="write the E sweep's ratios as a PNG picture")
    parser.add_argument(
        "--grouped",
        choices=["auto", *dispatch.GROUPED_FORMS],
        default="auto",
        help="how the grouped dispatch runs its blocks (dispatch.grouped_form; auto: by device)",
    )
    parser.add_argument(
        "--implementation",
        choices=["masked", "sparse"],
        default="masked",
        help="storage of the mixtures' experts (and routes, unless --route-implementation)",
    )
    parser.add_argument(
        "--route-implementation",
        choices=["auto", "masked", "sparse", "tiles"],
        default="auto",
        help="storage of the routes (auto: the mixture's default)",
    )
    parser.add_argument(
        "--skip-all",
        action="store_true",
        help="leave out the all-experts model (at wide+routes on a CPU it takes minutes a call)",
    )
    args = parser.parse_args()
    routes = None if args.route_implementation == "auto" else args.route_implementation
    dispatch.GROUPED_FORM = None if args.grouped == "auto" else args.grouped

    header = (
        f"backend={keras.backend.backend()} device={device()} machine={platform.machine()} "
        f"cpus={os.cpu_count()} date={time.strftime('%Y-%m-%d')} grouped={args.grouped} "
        f"implementation={args.implementation} routes={args.route_implementation}"
    )
    lines = [header, ""]
    lines.append(
        "| size | measure | dense (ms) | all experts (ms) | mixture (ms) "
        "| mixture / dense | mixture / all experts |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    print("\n".join(lines), flush=True)
    named = [(n, SIZES[n]) for n in args.sizes if n != "sweep"]
    if "sweep" in args.sizes:
        named += [(f"sweep E={e}", sweep_size(e)) for e in SWEEP]
    sweep = {}
    for name, size in named:
        kinds = ("dense", "mixture") if args.skip_all else ("dense", "all experts", "mixture")
        models = {
            kind: build(kind, size, implementation=args.implementation, route_implementation=routes)
            for kind in kinds
        }
        result = measure(
            models, size[0], size[3], args.repeats, (1, args.infer_batch), args.train_batch
        )
        for measure_name in result["dense"]:
            dense, mix = result["dense"][measure_name], result["mixture"][measure_name]
            every = result.get("all experts", {}).get(measure_name)
            scale = 1.0 if measure_name.startswith("compile") else 1e3
            unit = "s" if scale == 1.0 else "ms"
            label = measure_name.replace(" (s)", "")
            every_text = "-" if every is None else f"{every * scale:.3g}"
            ratio_text = "-" if every is None else f"{mix / every:.2f}"
            row = (
                f"| {name} | {label} ({unit}) | {dense * scale:.3g} | {every_text} "
                f"| {mix * scale:.3g} | {mix / dense:.2f} | {ratio_text} |"
            )
            lines.append(row)
            print(row, flush=True)
            if name.startswith("sweep") and every is not None:
                sweep.setdefault(measure_name, []).append((size[1], mix / dense, mix / every))
        del models
        keras.backend.clear_session()
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")
    if args.plot and sweep:
        plot(sweep, header, args.plot)


def plot(sweep, header, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, column, title in (
        (axes[0], 1, "mixture / dense MLP"),
        (axes[1], 2, "mixture / all experts"),
    ):
        for measure_name, rows in sweep.items():
            if measure_name.startswith("compile"):
                continue
            es = [r[0] for r in rows]
            ax.plot(es, [r[column] for r in rows], marker="o", label=measure_name)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.plot(es, [2 / e for e in es], "k--", lw=0.8, label="FLOP floor k/E")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("experts E (top-2, d=1024, 256 units each)")
        ax.set_title(title)
    axes[0].set_ylabel("time ratio")
    axes[1].legend(fontsize=8)
    fig.suptitle(header, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
