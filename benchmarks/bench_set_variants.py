"""SET as the seeds describe it, measured: regrowth at zero or random, per epoch or per step,
the last epoch, and where the connections go.

The SET paper's MNIST MLP (784-1000-1000-1000-10, ReLU, SparseDense hidden layers
at epsilon=20, SGD 0.01 with momentum 0.9, batch 128), trained from the same
initial weights and masks with
- no evolution (static sparse, the reference);
- SET per epoch (zeta=0.3), regrown weights at zero (the library's default) or
  drawn like the initial weights (seed 004: random, `regrow_initializer=
  "glorot_uniform"`);
- SET per step (seed 004): after each step with probability `p`, with
  `zeta_step = zeta / (p * steps per epoch)` so that the same number of
  connections is replaced per epoch on average; zeros or random regrowth.

Per-epoch runs use `last_epoch="prune"` (seed 001): their last logged test
accuracy is the network before the final removal (what `last_epoch="skip"`
returns), and the accuracy after `fit` is the network after it.

Reports test accuracy after every epoch (convergence), wall time, and the
share of the first layer's connections on the central 14x14 pixels (25 % of
the image) and on the 4-pixel border (49 %): SET's claim is that connections
move to the informative pixels. Writes the curves and the per-pixel
connection maps.

    python benchmarks/bench_set_variants.py --data ../shared/data/mnist.npz --epochs 8
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import keras
import numpy as np

import keras_sparse_moe as ksm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from common import EPSILON, build_mlp, sparse_layer  # noqa: E402

CENTRE = (slice(7, 21), slice(7, 21))  # 14x14 of 28x28


class EpochLog(keras.callbacks.Callback):
    """Test accuracy and cumulative wall time after every epoch."""

    def __init__(self, x, y):
        super().__init__()
        self.x, self.y = x, y
        self.accuracy, self.seconds = [], []

    def on_train_begin(self, logs=None):
        self._start, self._paused = time.perf_counter(), 0.0

    def on_epoch_end(self, epoch, logs=None):
        tic = time.perf_counter()
        self.accuracy.append(float(self.model.evaluate(self.x, self.y, verbose=0)[1]))
        self._paused += time.perf_counter() - tic
        self.seconds.append(time.perf_counter() - self._start - self._paused)


def pixel_shares(layer):
    """(share of connections on the central 14x14, on the 4-pixel border) of a 784-input layer."""
    counts = layer.dense_mask().sum(axis=1).reshape(28, 28)
    border = np.ones((28, 28), bool)
    border[4:24, 4:24] = False
    total = counts.sum()
    return float(counts[CENTRE].sum() / total), float(counts[border].sum() / total), counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=None, help="mnist .npz (x_train, y_train, ...)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--zeta", type=float, default=0.3)
    parser.add_argument("--step-probability", type=float, default=0.02)
    parser.add_argument("--train", type=int, default=None, help="first N training images")
    parser.add_argument("--hidden", type=int, nargs="+", default=[1000, 1000, 1000])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join("demo_output", "set_variants"))
    args = parser.parse_args(argv)

    data = ksm.datasets.load_image_classification(args.data)
    x, y = data.x_train[: args.train], data.y_train[: args.train]
    if x.shape[1] != 784:
        parser.error(f"needs 28x28 images (784 inputs). Received: {x.shape[1]} inputs")
    steps = -(-len(x) // args.batch_size)
    zeta_step = args.zeta / (args.step_probability * steps)
    if not 0 < zeta_step < 1:
        parser.error(f"--step-probability too small for this data: zeta per step {zeta_step:.3g}")
    print(
        f"{data.name}: {len(x)} train / {len(data.x_test)} test, {args.epochs} epochs of {steps} "
        f"steps; SGD 0.01 momentum 0.9; per-step SET: p={args.step_probability:g}, "
        f"zeta={zeta_step:.4f}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, {datetime.date.today()}",
        flush=True,
    )
    random_init = "glorot_uniform"  # SparseDense's kernel initializer
    variants = {
        "static sparse": None,
        "SET per epoch, regrow zeros": dict(zeta=args.zeta, last_epoch="prune"),
        "SET per epoch, regrow random": dict(
            zeta=args.zeta, last_epoch="prune", regrow_initializer=random_init
        ),
        "SET per step, regrow zeros": dict(zeta=zeta_step, probability=args.step_probability),
        "SET per step, regrow random": dict(
            zeta=zeta_step, probability=args.step_probability, regrow_initializer=random_init
        ),
    }
    results, maps = {}, {}
    for name, set_kwargs in variants.items():
        model = build_mlp(
            sparse_layer(EPSILON, args.seed),
            hidden=tuple(args.hidden),
            num_classes=data.num_classes,
            optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
            seed=args.seed,
        )
        log = EpochLog(data.x_test, data.y_test)
        callbacks = [log]
        if set_kwargs is not None:
            callbacks.append(ksm.callbacks.SETEvolution(seed=args.seed, **set_kwargs))
        before = pixel_shares(model.layers[1])
        model.fit(
            x, y, batch_size=args.batch_size, epochs=args.epochs, verbose=0, callbacks=callbacks
        )
        final = float(model.evaluate(data.x_test, data.y_test, verbose=0)[1])
        centre, border, counts = pixel_shares(model.layers[1])
        maps[name] = counts
        results[name] = {
            "curve": log.accuracy,
            "seconds": log.seconds[-1],
            "final": final,
            "connections": model.layers[1].num_connections,
            "centre": (before[0], centre),
            "border": (before[1], border),
        }
        print(
            f"{name}: accuracy by epoch {[round(a, 4) for a in log.accuracy]}, after fit "
            f"{final:.4f}; centre share {before[0]:.3f} -> {centre:.3f}, border share "
            f"{before[1]:.3f} -> {border:.3f}; {log.seconds[-1]:.0f} s",
            flush=True,
        )

    marks = sorted({1, 2, max(1, args.epochs // 2), args.epochs})
    lines = [
        "| variant | "
        + " | ".join(f"acc. epoch {e}" for e in marks)
        + " | after last removal | train time (s) | centre share | border share |",
        "|---|" + "---|" * (len(marks) + 4),
    ]
    for name, r in results.items():
        pruned = f"{r['final']:.4f}" if "per epoch" in name else "–"
        lines.append(
            f"| {name} | "
            + " | ".join(f"{r['curve'][e - 1]:.4f}" for e in marks)
            + f" | {pruned} | {r['seconds']:.0f} | {r['centre'][0]:.3f} → {r['centre'][1]:.3f}"
            f" | {r['border'][0]:.3f} → {r['border'][1]:.3f} |"
        )
    summary = "\n".join(lines)
    print("\n" + summary)
    print(
        "\ncentre: share of the first layer's connections on the central 14x14 pixels (25 % of "
        "the image); border: on the outer 4-pixel frame (49 %). 'after last removal': accuracy "
        "after seed 001's final removal of zeta without regrowth (last_epoch='prune')."
    )
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(summary + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no pictures")
        return results
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results.items():
        ax.plot(np.arange(1, len(r["curve"]) + 1), r["curve"], marker="o", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "convergence.png"), dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, len(maps), figsize=(3.2 * len(maps), 3.2))
    for ax, (name, counts) in zip(np.atleast_1d(axes), maps.items()):
        image = ax.imshow(counts, cmap="viridis")
        ax.set_title(name, fontsize=8)
        ax.axis("off")
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "input_connections.png"), dpi=110)
    plt.close(fig)
    print(f"wrote results.md, convergence.png, input_connections.png to {args.out}")
    return results


if __name__ == "__main__":
    main()
