"""Scaling out: expert parallelism with `keras.distribution`.

Data parallelism needs nothing from this module: `SparseDense`, the mixture,
its gates and losses, and the connectivity callbacks run under
`tf.distribute.MirroredStrategy` / `MultiWorkerMirroredStrategy` (TensorFlow)
and `keras.distribution.DataParallel` (JAX) as they are, and rewiring leaves
every replica with the same connections. Expert parallelism shards the
built-in experts of each `SparseExpertMixture` across one axis of a device
mesh: `expert_layout_map` gives the `LayoutMap` for
`keras.distribution.ModelParallel`.
"""

from __future__ import annotations

import keras

from keras_sparse_moe.walk import find_layers

__all__ = ["EXPERT_AXIS", "expert_layout_map", "expert_variable_layouts"]

EXPERT_AXIS = "model"
OWNER = "expert_layout_map"

# The built-in bank's variables, wherever the mixture sits and whatever it is
# called: kernels and masks are (fan_in, E * width), biases (E * width,), and
# expert e owns the e-th block of columns. Sharding the columns gives each
# device whole experts. Shared experts (`.../shared_experts/...`, which every
# token visits) do not match (LayoutMap keys match whole paths): replicated.
_BANK = r"(?:.*/)?experts/expert_(?:hidden|output|routes)/"
_PATTERNS = {_BANK + r"(?:kernel|mask)": (None, EXPERT_AXIS), _BANK + r"bias": (EXPERT_AXIS,)}


def _mixtures(model):
    from keras_sparse_moe.layers import SparseExpertMixture

    return find_layers(model, SparseExpertMixture, include_self=True)


def expert_layout_map(model, mesh, axis=EXPERT_AXIS, layout_map=None):
    """A `keras.distribution.LayoutMap` sharding the experts of `model`'s mixtures over `axis`.

    Each `SparseExpertMixture` with built-in experts stores expert `e`'s
    weights in the `e`-th block of columns of its `expert_hidden`,
    `expert_output` and `expert_routes` layers; the map shards those columns
    (kernel, mask, bias) over the mesh axis `axis`, so each device along it
    holds `num_experts / mesh.shape[axis]` whole experts, and their optimizer
    slots follow. Everything else stays replicated (or as `layout_map` already
    says). The keys are patterns on variable paths, so the map also applies to
    a fresh copy of the model built under the distribution:

        mesh = keras.distribution.DeviceMesh((2, 2), ["batch", "model"])
        layout_map = expert_layout_map(make_model(), mesh)
        with keras.distribution.ModelParallel(layout_map=layout_map,
                                              batch_dim_name="batch").scope():
            model = make_model()  # experts sharded over "model"

    Args:
        model: A Keras model (or layer) holding `SparseExpertMixture` layers
            with built-in experts (`num_experts=...`, masked storage).
        mesh: A `keras.distribution.DeviceMesh` with an axis named `axis`.
        axis: The mesh axis the experts are spread over (default `"model"`).
        layout_map: Optional `LayoutMap` on `mesh` to add the expert entries to.

    Returns:
        The `LayoutMap`.

    Raises:
        ValueError: no mixture with built-in experts in `model`; `axis` not an
            axis of `mesh`; its size does not divide a mixture's `num_experts`;
            a mixture with user experts or sparse storage (whose columns are
            not per-expert arrays).

    Examples:

        >>> import keras
        >>> import keras_sparse_moe
        >>> from keras_sparse_moe.distribution import expert_layout_map
        >>> model = keras.Sequential([
        ...     keras.Input((12,)),
        ...     keras_sparse_moe.layers.SparseExpertMixture(units=8, num_experts=4, seed=0)])
        >>> mesh = keras.distribution.DeviceMesh(
        ...     (1, 1), ["batch", "model"], keras.distribution.list_devices()[:1])
        >>> layouts = expert_layout_map(model, mesh)
        >>> layouts[model.layers[0].expert_bank.expert_hidden.kernel.path].axes
        (None, 'model')
    """
    if not isinstance(mesh, keras.distribution.DeviceMesh):
        raise TypeError(
            f"`{OWNER}` needs a `keras.distribution.DeviceMesh`. Received: mesh={mesh!r}"
        )
    if axis not in mesh.axis_names:
        raise ValueError(
            f"`{OWNER}` shards the experts over the mesh axis `axis`={axis!r}, which the "
            f"mesh does not have. Received: mesh axis_names={list(mesh.axis_names)}"
        )
    size = mesh.shape[list(mesh.axis_names).index(axis)]
    mixtures = _mixtures(model)
    if not mixtures:
        raise ValueError(
            f"`{OWNER}` found no `SparseExpertMixture` in '{model.name}': there are no "
            "experts to shard."
        )
    for mixture in mixtures:
        _check_shardable(mixture, axis, size)
    if layout_map is None:
        layout_map = keras.distribution.LayoutMap(mesh)
    elif not isinstance(layout_map, keras.distribution.LayoutMap):
        raise TypeError(
            f"`{OWNER}` got an invalid `layout_map`. Expected a "
            f"`keras.distribution.LayoutMap`. Received: layout_map={layout_map!r}"
        )
    for pattern, axes in _PATTERNS.items():
        layout_map[pattern] = tuple(axis if a == EXPERT_AXIS else a for a in axes)
    return layout_map


def _check_shardable(mixture, axis, size):
    from keras_sparse_moe.layers.experts import SparseExperts

    bank = mixture.expert_bank
    if not isinstance(bank, SparseExperts):
        raise ValueError(
            f"`{OWNER}` shards built-in experts, and '{mixture.name}' holds user experts "
            f"({bank.num_experts} separate layers), which `ModelParallel` cannot place one "
            "per device. Use built-in experts (`num_experts=...`), or give the user "
            "experts' own weights layouts in a `LayoutMap`."
        )
    if not bank.expert_hidden.storage.stores_dense:  # one list for all experts
        raise ValueError(
            f"`{OWNER}` shards the experts' columns, and '{mixture.name}' stores its "
            f"experts with implementation={bank.implementation!r}: one connection list for "
            "all experts, with no per-expert block to shard. Use implementation='masked' "
            "(or keep this mixture replicated)."
        )
    if bank.num_experts % size:
        raise ValueError(
            f"`{OWNER}`: the mesh axis {axis!r} of size {size} does not divide the "
            f"{bank.num_experts} experts of '{mixture.name}'. Use a mesh whose {axis!r} "
            f"axis divides num_experts={bank.num_experts}."
        )


def expert_variable_layouts(model, layout_map):
    """`{variable path: axes}` for the variables of `model` that `layout_map` shards.

    A quick check of what a layout map will do before building the model
    under `ModelParallel`.
    """
    found = {}
    for variable in model.variables:
        layout = layout_map[variable.path]
        if layout is not None:
            found[variable.path] = tuple(layout.axes)
    return found
