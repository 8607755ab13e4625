"""The documentation site builds strictly: a broken link, anchor or API reference fails here."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_docs_build_strictly(tmp_path):
    pytest.importorskip(
        "mkdocstrings", reason="the docs extra (pip install -e '.[docs]') is missing"
    )
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # Every guide page and the API reference are in the site.
    for page in ["guide/sparse-layers", "guide/mixtures", "api/layers", "benchmarks"]:
        assert (tmp_path / "site" / page / "index.html").exists(), page
    api = (tmp_path / "site" / "api" / "layers" / "index.html").read_text()
    assert "SparseDense" in api and "growth_probe" in api


def test_readme_stays_short():
    """The README is what a newcomer reads first; the rest lives in the docs site."""
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= 200, f"README.md has {lines} lines"


@pytest.mark.slow
def test_readme_tour_runs(tmp_path, monkeypatch):
    """The README's tour runs as written (MNIST replaced by 256 random images)."""
    import keras
    import numpy as np

    text = (ROOT / "README.md").read_text()
    tour = text.split("## A tour", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (256, 28, 28)).astype("uint8")
    labels = rng.integers(0, 10, 256).astype("uint8")
    monkeypatch.setattr(
        keras.datasets.mnist, "load_data", lambda: ((images, labels), (images, labels))
    )
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(tour, "README.md", "exec"), namespace)
    model = namespace["model"]
    assert (tmp_path / "model.keras").exists()
    assert model.layers[0].num_connections < 0.05 * 784 * 1000
