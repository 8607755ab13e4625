"""expert_layout_map: what it refuses, with errors naming the argument and the value."""

import keras
import pytest

import keras_sparse_moe as ksm
from keras_sparse_moe.distribution import expert_layout_map
from tests.distribution import common


def _mesh(model_axis, names=("batch", "model")):
    # Only the mesh's shape matters here: no variable is placed on a device.
    return keras.distribution.DeviceMesh((1, model_axis), list(names), ["cpu:0"] * model_axis)


def test_axis_that_does_not_divide_the_experts():
    with pytest.raises(
        ValueError, match=r"axis 'model' of size 3 does not divide the 4 experts of 'moe'"
    ):
        expert_layout_map(common.mixture(), _mesh(3))


def test_mesh_without_the_axis():
    with pytest.raises(ValueError, match=r"`axis`='model'.*axis_names=\['batch', 'experts'\]"):
        expert_layout_map(common.mixture(), _mesh(2, ("batch", "experts")))
    # The axis is an argument.
    layout_map = expert_layout_map(common.mixture(), _mesh(2, ("batch", "experts")), axis="experts")
    assert layout_map["moe/experts/expert_hidden/kernel"].axes == (None, "experts")


def test_user_experts_and_sparse_storage_are_refused_naming_the_layer():
    with pytest.raises(ValueError, match="'moe' holds user experts"):
        expert_layout_map(common.user_expert_mixture(), _mesh(2))
    with pytest.raises(ValueError, match="'moe' stores its experts with implementation='sparse'"):
        expert_layout_map(common.mixture(implementation="sparse"), _mesh(2))


def test_model_without_mixture_and_bad_arguments():
    with pytest.raises(ValueError, match="found no `SparseExpertMixture` in 'mlp'"):
        expert_layout_map(common.mlp(), _mesh(2))
    with pytest.raises(TypeError, match="DeviceMesh"):
        expert_layout_map(common.mixture(), "model")
    with pytest.raises(TypeError, match="layout_map"):
        expert_layout_map(common.mixture(), _mesh(2), layout_map={"x": (None,)})


def test_adds_to_a_given_layout_map_and_leaves_other_variables_alone():
    assert ksm.distribution.expert_layout_map is expert_layout_map  # the public path
    mesh = _mesh(2)
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map["head/kernel"] = (None, "model")
    model = common.mixture(route_density=0.2)
    assert expert_layout_map(model, mesh, layout_map=layout_map) is layout_map
    assert layout_map["head/kernel"].axes == (None, "model")
    assert layout_map["moe/experts/expert_routes/mask"].axes == (None, "model")
    assert layout_map["moe/experts/expert_output/bias"].axes == ("model",)
    # The gate, shared experts and anything else: no entry (replicated).
    shared = common.mixture(num_shared_experts=1).get_layer("moe")
    for variable in shared.gate.variables + shared.shared_bank.variables:
        assert layout_map[variable.path] is None
    assert layout_map[shared.expert_bank.expert_hidden.kernel.path].axes == (None, "model")
    # A mixture nested in another model, under any name, matches too.
    outer = keras.Sequential(
        [keras.Input((20,)), ksm.layers.SparseExpertMixture(units=4, num_experts=2, name="inner")]
    )
    assert layout_map[outer.layers[0].expert_bank.expert_hidden.kernel.path].axes == (None, "model")
