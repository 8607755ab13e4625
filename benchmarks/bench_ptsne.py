"""2-D embedding quality of `ParametricTSNE` beside its peers, on MNIST and Fashion-MNIST.

Every method is fitted on the training points (all, or the first `--train`)
and embeds the test points (all 10,000, or the first `--test`). Quality, as in
the ParametricUMAP paper: 1-NN accuracy in 2-D (scikit-learn's kNN fitted on
the training embedding, scored on the test embedding) and trustworthiness
with k=5 (`sklearn.manifold.trustworthiness`) on the test points, and on the
map of a random sample of training points (`--train-sample`, 10,000 by
default, the same sample for every method; 0 leaves it out). Wall time covers
fit and transform. With `--kl`, also the exact t-SNE loss `KL(P‖Q)` of each
method's map of the training points, under the same `P`
(`keras_sparse_moe.manifold.knn_affinities`, perplexity 30): how well each
optimised the objective itself (O(n²) time; about 30 s at 60,000 points).
With `--scales`, the training map's trustworthiness also at k=15 and k=50
and its 5-NN recall (the share of each point's 5 nearest neighbours in the
input that are among its 5 nearest on the map): at which scale a map keeps
or loses its neighbourhoods.
Peers, measured the same way in the same run:
- openTSNE (fits the training set, `transform` places the test points);
- scikit-learn's `TSNE` fitted on the test points themselves (not parametric:
  an upper reference for trustworthiness; 1-NN by leave-one-out on the test set);
- umap-learn's `ParametricUMAP`, when it imports.
Peers come from the `bench` extra: `pip install -e ".[bench]"`.
With `--backup DIR`, a long ParametricTSNE fit backs itself up after every
epoch (`keras.callbacks.BackupAndRestore`); the same command run again after an
interruption resumes it, and its wall time is the sum of the runs.
A method listed twice runs twice: `--methods opentsne ptsne opentsne` times
openTSNE before and after a long fit, and the `/ openTSNE` column divides by
the mean of its runs on that dataset.

    python benchmarks/bench_ptsne.py --data ../shared/data [--datasets mnist fashion_mnist]
        [--train 60000] [--test 10000] [--epochs 270] [--methods ptsne opentsne sklearn]
        [--variants default batch ...] [--train-sample 10000] [--kl] [--scales] [--backup DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import keras
import numpy as np
from sklearn.manifold import trustworthiness
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

from keras_sparse_moe import ParametricTSNE
from keras_sparse_moe.manifold import knn_affinities

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from common import load_named  # noqa: E402

# Published 2-D figures (ParametricUMAP paper), 1-NN / trustworthiness(5). The trustworthiness is
# the training map's: openTSNE's map of 10,000 sampled training points reproduces the paper's
# figures within 0.001 (0.986, 0.990), its test points do not (0.972, 0.986). docs/benchmarks.md.
ANCHORS = {
    ("mnist", "parametric t-SNE (paper)"): (0.912, 0.966),
    ("mnist", "openTSNE (paper)"): (0.941, 0.987),
    ("fashion_mnist", "parametric t-SNE (paper)"): (0.683, 0.983),
    ("fashion_mnist", "openTSNE (paper)"): (0.783, 0.991),
}

# ParametricTSNE recipes compared (keyword overrides of the defaults).
VARIANTS = {
    "default": {},
    # The default until 2026-12-05: the paper's network on the standardised pixels.
    "paper": {"hidden": (500, 500, 2000), "network_input": "raw"},
    "raw": {"network_input": "raw"},
    "batch512": {"batch_size": 512},
    "batch2048": {"batch_size": 2048},
    # The demo's gate map (`examples/ptsne_gated_mose.py`, --epochs 5), on the PCA and the pixels.
    "gate": {"hidden": (128,)},
    "gate_raw": {"hidden": (128,), "network_input": "raw"},
    "gate_256": {"hidden": (256,)},
    "gate_2x128": {"hidden": (128, 128)},
    "batch": {"affinities": "batch"},
    "exaggeration": {"early_exaggeration": 4.0, "exaggeration_epochs": 5},
    "small": {"hidden": (256, 256)},
    "dropout": {"dropout": 0.1},
}


def load(data_dir, name, train, test):
    data = load_named(data_dir, name, train, test)
    return data.x_train, data.y_train, data.x_test, data.y_test


def score(train_emb, y_train, test_emb, y_test, x_test):
    if train_emb is None:  # embedded the test set itself: leave-one-out-like 1-NN
        knn = float(np.mean(cross_val_score(KNeighborsClassifier(1), test_emb, y_test, cv=10)))
    else:
        knn = KNeighborsClassifier(1).fit(train_emb, y_train).score(test_emb, y_test)
    return knn, trustworthiness(x_test.reshape(len(x_test), -1), test_emb, n_neighbors=5)


# Neighbourhood sizes of `--scales` beyond k=5, and the k of the recall.
SCALES = (15, 50)
RECALL_K = 5


def train_trust(x_train, train_emb, sample, scales=()):
    """The training map on the rows `sample`: trustworthiness at k=5, then at each of `scales`,
    then (with `scales`) the `RECALL_K`-NN recall. None when not measured."""
    if train_emb is None or sample is None:
        return None
    x = x_train[sample].reshape(len(sample), -1)
    emb = np.asarray(train_emb)[sample]
    figures = [trustworthiness(x, emb, n_neighbors=k) for k in (5, *scales)]
    if scales:
        near = [NearestNeighbors(n_neighbors=RECALL_K).fit(v).kneighbors() for v in (x, emb)]
        (_, high), (_, low) = near
        figures.append(float(np.mean(high[:, :, None] == low[:, None, :]) * RECALL_K))
    return figures


def exact_kl(p, embedding, block=1000):
    """`KL(P‖Q)` of a map (Student-t, one degree of freedom) under sparse joint affinities `p`.

    `Z = Σ_{i≠j} w_ij` is summed over blocks of rows: O(n²) time, O(n · block) memory.
    """
    y = np.asarray(embedding, dtype="float64")
    p = p.tocoo()
    norms = np.einsum("ij,ij->i", y, y)
    z = 0.0
    for start in range(0, len(y), block):
        rows = y[start : start + block]
        d2 = np.maximum(norms[start : start + block, None] + norms[None] - 2.0 * rows @ y.T, 0.0)
        d2[np.arange(len(rows)), np.arange(start, start + len(rows))] = np.inf  # leave out i == j
        z += float(np.sum(1.0 / (1.0 + d2)))
    d2 = np.sum(np.square(y[p.row] - y[p.col]), axis=1)
    return float(np.sum(p.data * (np.log(p.data) + np.log1p(d2))) + np.log(z))


class FitSeconds(keras.callbacks.Callback):
    """Training seconds summed over the runs of a resumed fit (`--backup`), kept in the file `path`.

    Written at each epoch's end, as `BackupAndRestore` saves: an epoch cut short is redone and
    counted once. `earlier` is what the runs before this one took.
    """

    def __init__(self, path):
        super().__init__()
        self.path = path
        self.earlier = 0.0
        if os.path.exists(path):
            with open(path) as file:
                self.earlier = float(file.read())

    def on_train_begin(self, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        with open(self.path, "w") as file:
            file.write(str(self.earlier + time.perf_counter() - self.start))

    def on_train_end(self, logs=None):  # finished: the next run starts afresh, as the backup's
        if os.path.exists(self.path):
            os.remove(self.path)


def run_ptsne(args, variant, name, x_train, x_test):
    """Fits and embeds; returns the two maps and the seconds of earlier runs of a resumed fit."""
    options = {"seed": args.seed, "verbose": 2, **VARIANTS[variant]}
    if args.epochs is not None:
        options["epochs"] = args.epochs
    model, callbacks, earlier = ParametricTSNE(**options), [], 0.0
    if args.backup:
        run = f"{name}-{variant}-{len(x_train)}-{model.epochs}-seed{args.seed}"
        seconds = FitSeconds(os.path.join(args.backup, f"{run}.seconds"))
        callbacks = [keras.callbacks.BackupAndRestore(os.path.join(args.backup, run)), seconds]
        earlier = seconds.earlier
        if earlier:
            print(f"{run}: resuming from {args.backup} ({earlier:.0f} s of training before)")
    model.fit(x_train, callbacks=callbacks)
    return model.transform(x_train), model.transform(x_test), earlier


def run_opentsne(args, x_train, x_test):
    import openTSNE

    emb = openTSNE.TSNE(n_jobs=os.cpu_count(), random_state=args.seed).fit(x_train)
    return np.asarray(emb), np.asarray(emb.transform(x_test))


def run_sklearn(args, x_train, x_test):
    from sklearn.manifold import TSNE

    return None, TSNE(init="pca", random_state=args.seed).fit_transform(x_test)


def run_parametric_umap(args, x_train, x_test):
    from umap.parametric_umap import ParametricUMAP

    model = ParametricUMAP(random_state=args.seed)
    return model.fit_transform(x_train), model.transform(x_test)


PEERS = {
    "opentsne": ("openTSNE", run_opentsne),
    "sklearn": ("sklearn TSNE (test set itself)", run_sklearn),
    "parametric_umap": ("ParametricUMAP", run_parametric_umap),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="../shared/data", help="folder with <dataset>.npz")
    parser.add_argument("--datasets", nargs="+", default=["mnist", "fashion_mnist"])
    parser.add_argument("--train", type=int, default=60000)
    parser.add_argument("--test", type=int, default=10000)
    parser.add_argument(
        "--epochs", type=int, default=None, help="ParametricTSNE epochs (default: its own, 270)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=["ptsne", "opentsne", "sklearn"])
    parser.add_argument("--variants", nargs="+", default=["default"], choices=sorted(VARIANTS))
    parser.add_argument(
        "--train-sample",
        type=int,
        default=10000,
        help="training points whose map's trustworthiness is measured (0: none)",
    )
    parser.add_argument("--kl", action="store_true", help="also the exact KL of each training map")
    parser.add_argument(
        "--scales",
        action="store_true",
        help=f"also the training map's trustworthiness at k={SCALES} and its {RECALL_K}-NN recall",
    )
    parser.add_argument(
        "--backup",
        default=None,
        help="folder where ParametricTSNE's fit backs itself up each epoch: run the same "
        "command again after an interruption to resume (wall time sums the runs)",
    )
    args = parser.parse_args()
    print(f"# {platform.node()} {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')}")
    rows = []
    for name in args.datasets:
        x_train, y_train, x_test, y_test = load(args.data, name, args.train, args.test)
        perplexity = ParametricTSNE().perplexity  # the default the KL is measured under
        p = knn_affinities(x_train, perplexity, seed=args.seed)[0] if args.kl else None
        count = min(args.train_sample, len(x_train))
        rng = np.random.default_rng(args.seed)
        sample = np.sort(rng.choice(len(x_train), count, replace=False)) if count > 0 else None
        runs = []
        for method in args.methods:
            if method == "ptsne":
                runs += [(f"ParametricTSNE ({v})", run_ptsne, v) for v in args.variants]
            elif method in PEERS:
                runs.append((PEERS[method][0], PEERS[method][1], None))
            else:
                parser.error(f"unknown method {method!r}; expected ptsne or one of {list(PEERS)}")
        for label, fn, variant in runs:
            start = time.perf_counter()
            try:
                earlier = 0.0
                if variant is None:
                    train_emb, test_emb = fn(args, x_train, x_test)
                else:
                    train_emb, test_emb, earlier = fn(args, variant, name, x_train, x_test)
            except ImportError as error:
                print(f"{label}: skipped ({error})")
                continue
            seconds = earlier + time.perf_counter() - start
            knn, trust = score(train_emb, y_train, test_emb, y_test, x_test)
            fitted = train_trust(x_train, train_emb, sample, SCALES if args.scales else ())
            kl = None if p is None or train_emb is None else exact_kl(p, train_emb)
            rows.append((name, label, knn, trust, fitted, seconds, kl))
            fitted_text = (
                "" if fitted is None else "  trust(train) " + " ".join(f"{v:.3f}" for v in fitted)
            )
            kl_text = "" if kl is None else f"  KL {kl:.3f}"
            quality = f"1-NN {knn:.3f}  trust {trust:.3f}{fitted_text}{kl_text}"
            print(f"{name:14s} {label:36s} {quality}  {seconds:7.1f} s")
        for (dataset, label), (knn, trust) in ANCHORS.items():
            if dataset == name:
                rows.append((name, label, knn, None, [trust], None, None))
    print(
        f"\ntrain {args.train}, test {args.test}, epochs {args.epochs or ParametricTSNE().epochs}, "
        f"seed {args.seed}, "
        f"training map's trustworthiness on {max(args.train_sample, 0)} sampled points at most\n"
    )
    kl_head, kl_rule = (" KL (training map) |", "---|") if args.kl else ("", "")
    trust_head = "trust. (k=5, test points) | trust. (training map)"
    scale_heads = [f"trust. k={k} (training map)" for k in SCALES] + [f"{RECALL_K}-NN recall"]
    columns = 1 + len(scale_heads) if args.scales else 1  # training-map figures
    scale_head = "".join(f" {head} |" for head in scale_heads) if args.scales else ""
    # Wall time against openTSNE's in the same run (the mean of its runs on that data:
    # `--methods opentsne ptsne opentsne` brackets a long fit on a noisy machine).
    peer = {}
    for name, label, *_, seconds, _ in rows:
        if label == PEERS["opentsne"][0] and seconds is not None:
            peer.setdefault(name, []).append(seconds)
    print(f"| data | method | 1-NN | {trust_head} |{scale_head}{kl_head} wall time | / openTSNE |")
    print(f"|---|---|---|---|---|{'---|' * (columns - 1)}{kl_rule}---|---|")
    for name, label, knn, trust, fitted, seconds, kl in rows:
        wall = "-" if seconds is None else f"{seconds:.0f} s"
        ratio = "-"
        if seconds is not None and name in peer:
            ratio = f"{seconds / np.mean(peer[name]):.2f}"
        fitted = (fitted or []) + [None] * (columns - len(fitted or []))
        trust_cell = "-" if trust is None else f"{trust:.3f}"
        fitted_cells = "".join(" - |" if v is None else f" {v:.3f} |" for v in fitted)
        kl_cell = "" if not args.kl else (" - |" if kl is None else f" {kl:.3f} |")
        cells = f"{trust_cell} |{fitted_cells}{kl_cell} {wall} | {ratio}"
        print(f"| {name} | {label} | {knn:.3f} | {cells} |")


if __name__ == "__main__":
    main()
