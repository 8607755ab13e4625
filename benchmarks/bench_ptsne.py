"""2-D embedding quality of `ParametricTSNE` beside its peers, on MNIST and Fashion-MNIST.

Every method is fitted on the training points (all, or the first `--train`)
and embeds the test points (all 10,000, or the first `--test`). Quality, as in
the ParametricUMAP paper: 1-NN accuracy in 2-D (scikit-learn's kNN fitted on
the training embedding, scored on the test embedding) and trustworthiness
with k=5 (`sklearn.manifold.trustworthiness`, test points). Wall time covers
fit and transform. Peers, measured the same way in the same run:
- openTSNE (fits the training set, `transform` places the test points);
- scikit-learn's `TSNE` fitted on the test points themselves (not parametric:
  an upper reference for trustworthiness; 1-NN by leave-one-out on the test set);
- umap-learn's `ParametricUMAP`, when it imports.
Peers come from the `bench` extra: `pip install -e ".[bench]"`.

    python benchmarks/bench_ptsne.py --data ../shared/data [--datasets mnist fashion_mnist]
        [--train 60000] [--test 10000] [--epochs 30] [--methods ptsne opentsne sklearn]
        [--variants default batch ...]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np
from sklearn.manifold import trustworthiness
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from keras_sparse_moe import ParametricTSNE

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from common import load_named  # noqa: E402

# Published 2-D figures (ParametricUMAP paper), 1-NN / trustworthiness(5).
ANCHORS = {
    ("mnist", "parametric t-SNE (paper)"): (0.912, 0.966),
    ("mnist", "openTSNE (paper)"): (0.941, 0.987),
    ("fashion_mnist", "parametric t-SNE (paper)"): (0.683, 0.983),
    ("fashion_mnist", "openTSNE (paper)"): (0.783, 0.991),
}

# ParametricTSNE recipes compared (keyword overrides of the defaults).
VARIANTS = {
    "default": {},
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
    return knn, trustworthiness(x_test, test_emb, n_neighbors=5)


def run_ptsne(args, variant, x_train, x_test):
    options = {"epochs": args.epochs, "seed": args.seed, "verbose": 2, **VARIANTS[variant]}
    model = ParametricTSNE(**options).fit(x_train)
    return model.transform(x_train), model.transform(x_test)


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
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=["ptsne", "opentsne", "sklearn"])
    parser.add_argument("--variants", nargs="+", default=["default"], choices=sorted(VARIANTS))
    args = parser.parse_args()
    print(f"# {platform.node()} {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')}")
    rows = []
    for name in args.datasets:
        x_train, y_train, x_test, y_test = load(args.data, name, args.train, args.test)
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
                if variant is None:
                    train_emb, test_emb = fn(args, x_train, x_test)
                else:
                    train_emb, test_emb = fn(args, variant, x_train, x_test)
            except ImportError as error:
                print(f"{label}: skipped ({error})")
                continue
            seconds = time.perf_counter() - start
            knn, trust = score(train_emb, y_train, test_emb, y_test, x_test)
            rows.append((name, label, knn, trust, seconds))
            print(f"{name:14s} {label:36s} 1-NN {knn:.3f}  trust {trust:.3f}  {seconds:7.1f} s")
        for (dataset, label), (knn, trust) in ANCHORS.items():
            if dataset == name:
                rows.append((name, label, knn, trust, None))
    print(f"\ntrain {args.train}, test {args.test}, epochs {args.epochs}, seed {args.seed}\n")
    print("| data | method | 1-NN | trust. (k=5) | wall time |")
    print("|---|---|---|---|---|")
    for name, label, knn, trust, seconds in rows:
        wall = "-" if seconds is None else f"{seconds:.0f} s"
        print(f"| {name} | {label} | {knn:.3f} | {trust:.3f} | {wall} |")


if __name__ == "__main__":
    main()
