"""The examples end to end on tiny made-up data (their plumbing, not their accuracy)."""

import importlib.util
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def _example(name):
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(ROOT, "examples", f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_data(folder):
    rng = np.random.default_rng(0)
    for name, shape in (("mnist", (28, 28)), ("cifar10", (32, 32, 3))):
        arrays = {
            f"x_{split}": rng.integers(0, 256, (n, *shape), dtype=np.uint8)
            for split, n in (("train", 24), ("test", 8))
        }
        arrays.update(
            {f"y_{split}": rng.integers(0, 10, n) for split, n in (("train", 24), ("test", 8))}
        )
        np.savez(os.path.join(folder, f"{name}.npz"), **arrays)


def test_moe_example_runs_every_gate_and_loss(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the example draws its pictures with matplotlib")
    _fake_data(tmp_path)
    out = tmp_path / "out"
    results = _example("moe_mnist_cifar").main(
        [
            "--data-dir",
            str(tmp_path),
            "--epochs",
            "1",
            "--filters",
            "2",
            "--batch-size",
            "16",
            "--gates",
            "oracle",
            "dense",
            "--losses",
            "none",
            "entropy",
            "--gate-lr-multiplier",
            "3",
            "--out",
            str(out),
        ]
    )
    names = [row[0] for row in results]
    assert names == [
        "oracle gate, no gate loss",
        "dense gate, no gate loss",
        "dense gate, entropy loss",
    ]
    oracle_table = results[0][4]  # test images, then training images
    assert oracle_table.rows == ["mnist", "cifar", "mnist (train)", "cifar (train)"]
    np.testing.assert_array_equal(oracle_table.values, np.tile(np.eye(2), (2, 1)))  # exact routing
    assert (out / "results.md").read_text().count("\n") == 5
    assert (out / "accuracy.png").exists() and len(list(out.glob("rates_*.png"))) == 3
    assert "activation rates" in capsys.readouterr().out


def test_moe_example_routing_modes(tmp_path):
    _fake_data(tmp_path)
    args = ["--data-dir", str(tmp_path), "--epochs", "1", "--filters", "2", "--batch-size", "16"]
    args += ["--gates", "dense", "--losses", "entropy", "--out", str(tmp_path / "out")]
    args += ["--routings", "top_k", "bias", "expert_choice", "shared"]
    results = _example("moe_mnist_cifar").main(args)
    assert [row[0] for row in results] == [
        "top k: dense gate, entropy loss",
        "bias: dense gate, no gate loss",
        "expert choice: dense gate, no gate loss",
        "shared: dense gate, entropy loss",
    ]
    loads = {row[0].split(":")[0]: row[7] for row in results}
    for name in ("top k", "bias", "shared"):  # top-1: every image to exactly one expert
        assert loads[name].sum() == pytest.approx(1.0)
    # Expert choice: each expert takes exactly half of every batch of 16.
    np.testing.assert_array_equal(loads["expert choice"], [0.5, 0.5])
    assert all(row[8] > 0 for row in results)  # median ms per step


def test_moe_example_with_sparse_experts_evolved_by_set(tmp_path, capsys):
    _fake_data(tmp_path)
    args = ["--data-dir", str(tmp_path), "--epochs", "2", "--filters", "2", "--batch-size", "16"]
    args += ["--gates", "oracle", "--losses", "none", "--out", str(tmp_path / "out")]
    args += ["--mixing", "probabilities"]
    results = _example("moe_mnist_cifar").main([*args, "--expert-density", "0.3", "--expert-set"])
    np.testing.assert_array_equal(results[0][4].values, np.tile(np.eye(2), (2, 1)))
    assert "sparse experts at 0.3 of their weights (ERK), SET, probabilities" in (
        capsys.readouterr().out
    )


def test_ptsne_gated_mose_example_end_to_end(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the example draws its pictures with matplotlib")
    _fake_data(tmp_path)
    out = tmp_path / "out"
    rows, tables = _example("ptsne_gated_mose").main(
        [
            "--data",
            str(tmp_path / "mnist.npz"),
            "--epochs",
            "1",
            "--batch-size",
            "12",
            "--experts",
            "3",
            "--expert-units",
            "4",
            "--perplexity",
            "3",
            "--gate-hidden",
            "8",
            "--map-epochs",
            "1",
            "--min-steps",
            "0",
            "--out",
            str(out),
        ]
    )
    assert [row[1] for row in rows] == [
        "PTSNE-gated sparse experts",
        "softmax-gated sparse experts",
        "dense MLP",
    ]
    # Weights and FLOPs: the dense MLP's are exact; the sparse mixtures use fewer expert weights.
    dense = rows[2]
    assert dense[3] == 784 * 12 + 12 + 12 * 10 + 10 and dense[4] == 2 * (784 * 12 + 12 * 10)
    (table,) = tables
    with np.load(tmp_path / "mnist.npz") as data:
        classes = np.unique(data["y_test"])
    assert table.rows == [f"mnist/{c}" for c in classes]  # a row per class of the test set
    assert table.values.shape == (len(classes), 3)  # a column per expert
    np.testing.assert_allclose(table.values.sum(axis=1), 1.0, atol=1e-4)
    assert (out / "gate_map_mnist.png").exists() and (out / "activation_rates_mnist.png").exists()
    assert (out / "ptsne_mose_mnist.keras").exists()
    printed = capsys.readouterr().out
    assert "reloaded, max |difference|" in printed and (out / "results.md").exists()


def test_scaling_out_example_spreads_over_two_devices(tmp_path):
    # Its own process: the example sets up its devices before the backend starts.
    import subprocess
    import sys

    _fake_data(tmp_path)
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "examples", "scaling_out.py"),
            "--devices",
            "2",
            "--data",
            str(tmp_path / "mnist.npz"),
            "--epochs",
            "1",
            "--batch-size",
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")][1:]
    names = [row.split("|")[1].strip() for row in rows]
    assert names[0] == "1 device" and len(names) == (2 if "tensorflow" in result.stdout else 3)
    for row in rows[1:]:
        # Three steps from the same weights: the same run up to float summation order.
        assert float(row.split("|")[4]) < 1e-4, row


def test_topology_study_sweeps_and_measures(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the example draws its pictures with matplotlib")
    _fake_data(tmp_path)
    out = tmp_path / "out"
    rows = _example("topology_study").main(
        ["--data", str(tmp_path / "mnist.npz"), "--degrees", "4", "--depths", "1", "2"]
        + ["--dropouts", "0.2", "--topologies", "random", "structured regular", "Fibonacci"]
        + ["--units", "12", "--epochs", "1", "--batch-size", "8", "--out", str(out)]
    )
    # A fully connected reference per setting, then every topology at every degree.
    assert len(rows) == 2 + 1 * 2 * 3
    from keras_sparse_moe import topologies

    for row in rows:
        if row["topology"] == "structured regular":
            # Degree d of 12 outputs, offsets 12/d apart: the graph splits into
            # 12/d components, so it is disconnected.
            assert row["algebraic connectivity"] == pytest.approx(0.0, abs=1e-9)
        if row["topology"] == "Fibonacci" and row["depth"] == 1:
            mask = topologies.fibonacci(784, 12, degree=row["degree"])
            assert row["spectral gap"] == pytest.approx(topologies.spectral_gap(mask), rel=1e-6)
            assert row["density"] == pytest.approx(row["degree"] / 12)
    printed = capsys.readouterr().out
    assert "Correlation of test accuracy" in printed and "| network | weights |" in printed
    for name in ("results.md", "accuracy_vs_connectivity.png", "weight_distribution.png"):
        assert (out / name).exists()
