"""Files keep loading: every golden set under `tests/data/golden/` (models saved by an
earlier format, see `tests/golden.py`) loads with its outputs; a newer format is refused."""

import glob
import os

import keras
import numpy as np
import pytest

import keras_sparse_moe as ksm
from tests.golden import HERE, models
from tests.test_case import compiled_call, to_numpy

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
    got = compiled_call(model, saved["x"])
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


PRE_SPLIT = os.path.join(os.path.dirname(HERE), "legacy", "pre_split")


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(PRE_SPLIT) if n.endswith(".keras")))
def test_pre_split_mixture_names_its_upgrade_and_then_loads_with_its_outputs(name, tmp_path):
    """Mixtures saved before the expert bank was a layer (see tests/data/legacy/make_pre_split.py)."""
    old = tmp_path / name
    with open(os.path.join(PRE_SPLIT, name), "rb") as f:
        old.write_bytes(f.read())
    before = old.read_bytes()
    if name != "user_experts.keras":  # user layers fail with Keras' own message
        with pytest.raises(ValueError, match=r"format 0.*upgrade_file\(path\)"):
            keras.saving.load_model(old)
    upgraded = ksm.saving.upgrade_file(old)
    assert upgraded == str(tmp_path / name.replace(".keras", "_upgraded.keras"))
    assert old.read_bytes() == before  # the old file is left as it is
    saved = np.load(os.path.join(PRE_SPLIT, name.replace(".keras", ".npz")))
    got = compiled_call(keras.saving.load_model(upgraded), saved["x"])
    np.testing.assert_allclose(got, saved["y"], rtol=1e-4, atol=1e-5)


def test_upgrade_file_refuses_what_it_cannot_or_need_not_convert(tmp_path):
    current = os.path.join(HERE, f"format_{ksm.saving.FORMAT_VERSION}", "routed_mixture.keras")
    with pytest.raises(ValueError, match="needs no upgrade"):
        ksm.saving.upgrade_file(current, tmp_path / "out.keras")
    assert not (tmp_path / "out.keras").exists()
    with pytest.raises(ValueError, match="`output` must differ from `path`"):
        ksm.saving.upgrade_file(current, current)


def test_format_0_gate_configs_are_migrated():
    config = ksm.layers.NoisyTopKGate(4, 2).get_config()
    old = {k: v for k, v in config.items() if k not in ("format_version", "top_k")}
    assert ksm.layers.NoisyTopKGate.from_config({**old, "k": 3}).top_k == 3
    with pytest.raises(TypeError):  # format 1 has no `k`
        ksm.layers.NoisyTopKGate.from_config({**old, "k": 3, "format_version": 1})
