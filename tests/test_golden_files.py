"""Files keep loading: every golden set under `tests/data/golden/` (models saved by an
earlier format, see `tests/golden.py`) loads with its outputs; a newer format is refused."""

import glob
import os

import keras
import numpy as np
import pytest

import keras_sparse_moe as ksm
from tests.golden import HERE, models
from tests.test_case import to_numpy

FILES = sorted(glob.glob(os.path.join(HERE, "format_*", "*.keras")))


def test_every_model_has_a_golden_file_in_the_current_format():
    current = os.path.join(HERE, f"format_{ksm.saving.FORMAT_VERSION}")
    assert sorted(os.listdir(current)) == sorted(
        f"{name}{ext}" for name in models() for ext in (".keras", ".npz")
    )


@pytest.mark.parametrize("path", FILES, ids=lambda p: os.path.relpath(p, HERE))
def test_golden_file_loads_with_its_outputs(path):
    model = keras.saving.load_model(path)
    saved = np.load(path.replace(".keras", ".npz"))
    got = to_numpy(model(saved["x"], training=False))
    np.testing.assert_allclose(got, saved["y"], rtol=1e-4, atol=1e-5)
    # Masked weights are still exactly zero after loading.
    for layer in ksm.find_layers(model, ksm.layers.SparseKernelLayer):
        if layer.storage.stores_dense:
            kernel, mask = to_numpy(layer.kernel), to_numpy(layer.mask)
            assert np.all(kernel[mask == 0] == 0)


@pytest.mark.parametrize(
    "cls, args",
    [
        (ksm.SparseDense, {"units": 4}),
        (ksm.SparseExpertMixture, {"units": 3, "num_experts": 2, "top_k": 1}),
        (ksm.layers.SoftmaxGate, {"num_experts": 3}),
        (ksm.layers.PTSNEGate, {"num_experts": 3}),
    ],
)
def test_configs_carry_the_format_and_a_newer_one_is_refused(cls, args):
    config = cls(**args).get_config()
    assert config["format_version"] == ksm.saving.FORMAT_VERSION
    assert cls.from_config({k: v for k, v in config.items() if k != "format_version"})  # format 0
    newer = {**config, "format_version": ksm.saving.FORMAT_VERSION + 1}
    with pytest.raises(ValueError, match=r"newer keras-sparse-moe .* Upgrade"):
        cls.from_config(newer)
    with pytest.raises(ValueError, match="format_version='1'"):
        cls.from_config({**config, "format_version": "1"})
