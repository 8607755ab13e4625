"""One rule for bad arguments, tested on every public class: a wrong type raises
`TypeError`, a wrong value `ValueError`, and both name the argument and the value."""

import numpy as np
import pytest

from keras_sparse_moe import validation
from keras_sparse_moe.callbacks import ActivationRateLogger, MagnitudePruning, RigL, SETEvolution
from keras_sparse_moe.layers import (
    NoisyTopKGate,
    OracleGate,
    PTSNEGate,
    SoftmaxGate,
    SparseConv1D,
    SparseConv2D,
    SparseDense,
    SparseExpertMixture,
)
from keras_sparse_moe.schedules import ConstantSparsity, PolynomialDecay
from keras_sparse_moe.topologies import BlockPattern

MIXTURE = dict(units=3, num_experts=4)
DATA = {"data": (np.zeros((4, 3), "float32"), np.zeros((4, 1), "float32"))}
# (class, the other arguments it needs, argument, a value of the wrong type, a wrong value)
CASES = [
    (SparseDense, {}, "units", "8", 0),
    (SparseDense, {"units": 4}, "density", "0.1", 1.5),
    (SparseDense, {"units": 4}, "epsilon", "20", -1.0),
    (SparseDense, {"units": 4}, "seed", 1.5, -1),
    (SparseDense, {"units": 4}, "implementation", 1, "dense"),
    (SparseDense, {"units": 4}, "topology", 1, "ring"),
    (SparseDense, {"units": 4}, "topology_kwargs", [1], None),
    (SparseDense, {"units": 4}, "density_aware_init", 1, None),
    (SparseConv2D, {"kernel_size": 3}, "filters", 2.0, -2),
    (SparseConv2D, {"filters": 2}, "kernel_size", "3", 0),
    (SparseConv2D, {"filters": 2, "kernel_size": 3}, "strides", "1", 0),
    (SparseConv2D, {"filters": 2, "kernel_size": 3}, "padding", 1, "full"),
    (SparseConv1D, {"filters": 2, "kernel_size": 3}, "data_format", 1, "nhwc"),
    (SparseExpertMixture, MIXTURE, "top_k", 1.5, 9),
    (SparseExpertMixture, MIXTURE, "expert_units", "8", 0),
    (SparseExpertMixture, MIXTURE, "expert_density", "0.1", 2.0),
    (SparseExpertMixture, MIXTURE, "route_density", "0.1", 1.0),
    (SparseExpertMixture, {**MIXTURE, "top_k": 2}, "capacity_factor", "1", 0.0),
    (SparseExpertMixture, MIXTURE, "implementation", 1, "dense"),
    (SparseExpertMixture, MIXTURE, "dispatch", 1, "sorted"),
    (SparseExpertMixture, {"units": 3}, "num_experts", 2.0, 0),
    (SoftmaxGate, {}, "num_experts", "4", 0),
    (OracleGate, {}, "num_experts", 4.0, 0),
    (NoisyTopKGate, {"num_experts": 4}, "top_k", 1.5, 5),
    (NoisyTopKGate, {"num_experts": 4, "top_k": 2}, "noise_epsilon", "0.1", -0.1),
    (PTSNEGate, {"num_experts": 4}, "perplexity", "30", -1.0),
    (PTSNEGate, {"num_experts": 4}, "n_components", 2.5, 0),
    (PTSNEGate, {"num_experts": 4}, "temperature", "1", 0.0),
    (SETEvolution, {}, "zeta", "0.3", 1.5),
    (SETEvolution, {}, "update_every", 1.5, 0),
    (SETEvolution, {}, "probability", "0.5", 1.5),
    (SETEvolution, {}, "last_epoch", 1, "never"),
    (RigL, DATA, "drop_fraction", "0.3", 1.5),
    (RigL, DATA, "update_every", 1.5, 0),
    (RigL, DATA, "end_step", 1.5, -5),
    (RigL, DATA, "batch_size", 1.5, 0),
    (RigL, DATA, "decay", 1, "linear"),
    (RigL, DATA, "growth_candidates", "10", -1.0),
    (MagnitudePruning, {}, "schedule", 0.5, None),
    (ActivationRateLogger, {}, "every", 1.5, 0),
    (ActivationRateLogger, {}, "batch_size", 1.5, 0),
    (ConstantSparsity, {}, "target_sparsity", "0.5", 1.5),
    (ConstantSparsity, {"target_sparsity": 0.5}, "frequency", 1.5, 0),
    (
        PolynomialDecay,
        {"initial_sparsity": 0.0, "final_sparsity": 0.5, "end_step": 10},
        "begin_step",
        1.5,
        -1,
    ),
    (
        PolynomialDecay,
        {"initial_sparsity": 0.0, "final_sparsity": 0.5, "begin_step": 0, "end_step": 10},
        "power",
        "3",
        -1.0,
    ),
    (BlockPattern, {}, "blocks", "1", None),
]


def _ids(case):
    return f"{case[0].__name__}-{case[2]}"


@pytest.mark.parametrize(
    "cls, others, name, wrong_type, wrong_value", CASES, ids=[_ids(c) for c in CASES]
)
def test_bad_arguments_follow_the_rule(cls, others, name, wrong_type, wrong_value):
    with pytest.raises(TypeError) as error:
        cls(**others, **{name: wrong_type})
    assert f"{name}={wrong_type!r}" in str(error.value), str(error.value)
    assert cls.__name__ in str(error.value)
    if wrong_value is None:
        return
    with pytest.raises(ValueError) as error:
        cls(**others, **{name: wrong_value})
    assert f"{name}=" in str(error.value) and str(wrong_value) in str(error.value), str(error.value)


@pytest.mark.parametrize("value", [np.int64(3), np.int32(3), np.uint8(3), 3])
def test_integer_like_numpy_scalars_are_ints(value):
    assert validation.check_int("units", value, "SparseDense") == 3
    assert type(SparseDense(value).units) is int
    assert SETEvolution(update_every=value).update_every == 3


def test_bools_are_not_numbers():
    with pytest.raises(TypeError, match="units=True"):
        validation.check_int("units", True, "SparseDense")
    with pytest.raises(TypeError, match="density=False"):
        validation.check_density(False, "SparseDense")
    with pytest.raises(ValueError, match="nan"):
        validation.check_density(float("nan"), "SparseDense")
