"""`sparsify`: turn the `Dense` and convolution layers of a Keras 3 model into sparse ones."""

from __future__ import annotations

import math
import warnings

import keras
import numpy as np
from keras import ops

from keras_sparse_moe import topologies
from keras_sparse_moe.layers import SparseConv1D, SparseConv2D, SparseDense, SparseKernelLayer
from keras_sparse_moe.layers.sparse_kernel import KERAS_POSITIONAL
from keras_sparse_moe.walk import find_layers, own_trainable_weights

__all__ = ["convert_implementation", "sparsify", "strip"]

# Keras layer type -> the sparse layer standing for it (exact types: subclasses
# may compute something else with their kernel).
CONVERTIBLE = {
    keras.layers.Dense: SparseDense,
    keras.layers.Conv1D: SparseConv1D,
    keras.layers.Conv2D: SparseConv2D,
}
# The arguments a converted layer keeps: its own, Keras' shared ones, the base layer's.
_SHARED = (
    "units",
    "filters",
    "kernel_size",
    "strides",
    "padding",
    "data_format",
    "dilation_rate",
    "groups",
    *KERAS_POSITIONAL,
    "name",
    "dtype",
    "trainable",
)
DISTRIBUTIONS = ("uniform", "erk")
# Sparse layer type -> the Keras built-in layer `strip` puts in its place.
BUILT_IN = {sparse: dense for dense, sparse in CONVERTIBLE.items()}


def sparsify(
    model,
    density=None,
    epsilon=None,
    topology="erdos_renyi",
    include=None,
    exclude=None,
    distribution="uniform",
    seed=None,
    implementation="masked",
):
    """Returns a copy of `model` whose `Dense`, `Conv1D` and `Conv2D` layers are sparse.

    Each converted layer (`SparseDense`, `SparseConv1D`, `SparseConv2D`)
    keeps the original kernel wherever its connections (drawn from
    `topology` at `density` or SET's `epsilon`) lie and zero elsewhere;
    every other layer keeps its weights. The Keras 3 counterpart of tfmot's
    `prune_low_magnitude`: follow it with `MagnitudePruning` (start from
    `density=1.0`), `SETEvolution` or `RigL`. Works for Sequential and
    Functional models, nested ones included (Keras' `clone_model`).

    Layers with a kernel that cannot be converted (depthwise, separable,
    transposed or 3-D convolutions, grouped convolutions, `EinsumDense`,
    recurrent cells, layers inside custom layers) stay as they are and are
    named in a warning; `keras_sparse_moe.constraints.MaskConstraint` puts a
    fixed mask on any of them.

    Args:
        model: A built Sequential or Functional Keras model.
        density, epsilon, topology, implementation: As in `SparseDense`
            (`implementation="sparse"` stores only the kept connections).
        include: Layers to convert (names, or Keras layer classes such as
            `keras.layers.Conv2D`); default all convertible ones.
        exclude: Layers to keep dense (names or classes), e.g. the first
            convolution and the classifier.
        distribution: `"uniform"` (every layer at `density`) or `"erk"`:
            `density` is the global fraction of the converted layers'
            weights, spread by RigL's Erdős–Rényi-Kernel rule (kernel
            dimensions count; layers it would make denser than 1 are dense
            and the rest shared by the others; the connection counts add up
            to the global density exactly, see `topologies.erk_counts`).
        seed: Optional int; layer `i` uses `seed + i`.

    Examples:
        >>> import keras, keras_sparse_moe
        >>> dense = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(16, 3),
        ...     keras.layers.Flatten(), keras.layers.Dense(16), keras.layers.Dense(2)])
        >>> sparse = keras_sparse_moe.sparsify(dense, density=0.5, exclude=[dense.layers[-1].name])
        >>> [type(layer).__name__ for layer in sparse.layers]
        ['SparseConv2D', 'Flatten', 'SparseDense', 'Dense']
    """
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"`sparsify` expects a Keras 3 model. Received: model of type {type(model).__name__}"
        )
    if distribution not in DISTRIBUTIONS:
        raise ValueError(
            f"`sparsify` got an invalid `distribution`. Expected one of {DISTRIBUTIONS}. "
            f"Received: distribution={distribution!r}"
        )
    if distribution == "erk" and density is None:
        raise ValueError(
            "`sparsify(distribution='erk')` spreads a global `density` over the layers: pass "
            f"`density`. Received: density=None, epsilon={epsilon}"
        )
    # What `clone_model` reaches: layers of (nested) Sequential and Functional models.
    reachable = _reachable(model)
    convertible = [x for x in reachable if _convertible(x)]
    chosen = _choose(convertible, include, exclude, reachable, model.name)
    skipped = [
        x
        for x in find_layers(model)
        if x not in convertible
        and not isinstance(x, SparseKernelLayer)
        and not _is_container(x)
        and any(len(w.shape) >= 2 for w in own_trainable_weights(x))
    ]
    if skipped:
        warnings.warn(
            f"`sparsify` keeps these layers of model '{model.name}' dense (it converts "
            "Dense, Conv1D and Conv2D with groups=1 of Sequential and Functional models, not "
            "layers inside other layers): "
            + ", ".join(f"'{x.name}' ({type(x).__name__})" for x in skipped)
            + ". Use `keras_sparse_moe.constraints.MaskConstraint` for a fixed mask on them.",
            stacklevel=2,
        )
    if not chosen:
        raise ValueError(
            f"`sparsify` found no layer to convert in model '{model.name}' (convertible: "
            f"{[x.name for x in convertible]}, include: {_names(include)}, exclude: "
            f"{_names(exclude)}). It converts `keras.layers.Dense`, `Conv1D` and `Conv2D`."
        )
    densities = {x.name: density for x in chosen}
    if distribution == "erk":  # whole counts that add up to the global density exactly
        shapes = [tuple(x.kernel.shape) for x in chosen]
        counts = topologies.erk_counts(shapes, density)
        densities = {
            x.name: count / math.prod(shape) for x, shape, count in zip(chosen, shapes, counts)
        }
    index = {x.name: i for i, x in enumerate(chosen)}

    def make(layer):
        if layer.name not in index:
            return None
        return dict(
            density=densities[layer.name],
            epsilon=epsilon,
            topology=topology,
            seed=None if seed is None else seed + index[layer.name],
            implementation=implementation,
        )

    return replace_layers(model, make)


def _is_container(layer):
    return isinstance(layer, (keras.Model, keras.layers.InputLayer))


def _reachable(model):
    """The layers `clone_model(recursive=True)` rebuilds: those of `model` and of the
    Sequential and Functional models nested in it (not those inside other layers)."""
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found.extend(_reachable(layer))
        elif not isinstance(layer, keras.layers.InputLayer):
            found.append(layer)
    return found


def _convertible(layer):
    return type(layer) in CONVERTIBLE and getattr(layer, "groups", 1) == 1


def _names(choice):
    if choice is None:
        return None
    return [x if isinstance(x, str) else getattr(x, "__name__", repr(x)) for x in choice]


def _choose(convertible, include, exclude, layers, model_name):
    """The convertible layers `include` and `exclude` (names or classes) select."""
    known = {x.name for x in layers}
    selections = {}
    for argument, value in (("include", include), ("exclude", exclude)):
        if value is None:
            selections[argument] = None
            continue
        if isinstance(value, (str, type)):
            value = [value]
        value = list(value)
        for item in value:
            if isinstance(item, type) and issubclass(item, keras.layers.Layer):
                continue
            if not isinstance(item, str):
                raise TypeError(
                    f"`sparsify` got an invalid `{argument}`. Expected layer names or Keras "
                    f"layer classes. Received: {argument}={value!r}"
                )
            if item not in known:
                raise ValueError(
                    f"`sparsify` got `{argument}` names that match no layer of model "
                    f"'{model_name}'. Received: {argument}={sorted(map(str, value))}; "
                    f"layers: {sorted(known)}"
                )
        selections[argument] = value

    def selected(layer, value):
        return any(
            (isinstance(item, str) and item == layer.name)
            or (isinstance(item, type) and type(layer) is item)
            for item in value
        )

    chosen = convertible
    if selections["include"] is not None:
        chosen = [x for x in chosen if selected(x, selections["include"])]
    if selections["exclude"] is not None:
        chosen = [x for x in chosen if not selected(x, selections["exclude"])]
    return chosen


def convert_implementation(model, implementation):
    """Returns a copy of `model` whose sparse layers (`SparseDense`, `SparseConv1D`,
    `SparseConv2D`) use `implementation`.

    Connections, weights and biases are kept exactly (masked to sparse and
    back); every other layer keeps its weights. A sparse layer has as many
    slots as its configuration draws, so a masked layer converted to sparse
    must not hold more connections than that (pruned layers hold fewer: the
    rest of the slots are parked). Top-level layers of Sequential and
    Functional models are converted (not those inside other layers).

    Examples:
        >>> import keras, numpy as np, keras_sparse_moe
        >>> masked = keras.Sequential([keras.Input((8,)),
        ...     keras_sparse_moe.layers.SparseDense(16, density=0.25, seed=0)])
        >>> sparse = keras_sparse_moe.convert_implementation(masked, "sparse")
        >>> x = np.ones((2, 8), "float32")
        >>> sparse.layers[0].implementation, bool(np.allclose(sparse(x), masked(x), atol=1e-6))
        ('sparse', True)
    """
    if not isinstance(model, keras.Model):
        raise TypeError(
            "`convert_implementation` expects a Keras 3 model. Received: model of type "
            f"{type(model).__name__}"
        )
    if implementation not in ("masked", "sparse"):
        raise ValueError(
            "`convert_implementation` got an invalid `implementation`. Expected 'masked' or "
            f"'sparse'. Received: implementation={implementation!r}"
        )

    def convert(layer):
        config = layer.get_config()
        if isinstance(layer, SparseKernelLayer):
            config["implementation"] = implementation
        return layer.__class__.from_config(config)

    return _clone(model, convert)


def strip(model):
    """Returns a copy of `model` made of Keras' built-in layers only, for serving.

    Each `SparseDense` becomes a `keras.layers.Dense` and each `SparseConv1D`
    or `SparseConv2D` a `Conv1D` or `Conv2D` holding the masked kernel
    (zeros off the connections; checked equal after the copy), the bias and
    the activation; every other layer keeps its weights. The copy can be
    saved, loaded and exported where this package is not installed, like
    tfmot's `strip_pruning`. Regularizers, constraints and initializers of
    this package are left out (they act in training only). Top-level layers
    of Sequential and Functional models are converted.

    A `SparseExpertMixture` (or a gate) has no built-in equivalent: `strip`
    raises for it. Export such a model as it is (`model.export(path,
    format=...)`, every format), or save it as `.keras` and load it where
    this package is installed.

    Examples:
        >>> import keras, numpy as np, keras_sparse_moe
        >>> sparse = keras.Sequential([keras.Input((8,)),
        ...     keras_sparse_moe.layers.SparseDense(4, density=0.25, seed=0)])
        >>> plain = keras_sparse_moe.strip(sparse)
        >>> x = np.ones((2, 8), "float32")
        >>> type(plain.layers[0]).__name__, bool(np.allclose(plain(x), sparse(x), atol=1e-6))
        ('Dense', True)
    """
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"`strip` expects a Keras 3 model. Received: model of type {type(model).__name__}"
        )
    reachable = set(map(id, _reachable(model)))
    for layer in find_layers(model):
        own = type(layer).__module__.startswith("keras_sparse_moe")
        if own and not (type(layer) in BUILT_IN and id(layer) in reachable):
            raise ValueError(
                f"`strip` cannot turn layer '{layer.name}' ({type(layer).__name__}) of model "
                f"'{model.name}' into Keras built-in layers: it turns SparseDense, SparseConv1D "
                "and SparseConv2D of Sequential and Functional models into Dense and Conv. "
                "Export a mixture as it is: model.export(path, format='tf_saved_model', "
                "'onnx', 'litert' or 'openvino')."
            )

    def convert(layer):
        if type(layer) not in BUILT_IN:
            return layer.__class__.from_config(layer.get_config())
        config = layer.get_config()
        kwargs = {
            k: config[k]
            for k in _SHARED
            if k in config and "keras_sparse_moe" not in repr(config[k])
        }
        return BUILT_IN[type(layer)](**kwargs)

    return _clone(model, convert)


def _clone(model, clone_function):
    """`model` cloned by `clone_function`, every layer's weights copied over: a
    sparse layer's connections (or a dense kernel's entries at the new sparse
    layer's connections) and bias, any other layer's weights as they are."""
    try:
        clone = keras.models.clone_model(model, clone_function=clone_function, recursive=True)
    except ValueError as error:
        raise ValueError(
            "Converting works on Sequential and Functional models; rebuild a subclassed "
            f"model with sparse layers instead. Keras said: {error}"
        ) from error
    for old, new in zip(find_layers(model), find_layers(clone)):
        if _is_container(old):
            continue
        if isinstance(new, SparseKernelLayer):
            if isinstance(old, SparseKernelLayer):
                new.assign_connections(
                    *old.connection_indices(), ops.convert_to_numpy(old.connection_values())
                )
            else:
                new.assign_dense_kernel(ops.convert_to_numpy(old.kernel))
            if old.use_bias:
                new.bias.assign(ops.convert_to_numpy(old.bias))
        elif isinstance(old, SparseKernelLayer):  # `strip`: a built-in layer
            kernel = np.asarray(ops.convert_to_numpy(old.dense_kernel()))
            new.kernel.assign(kernel)
            if not np.array_equal(np.asarray(ops.convert_to_numpy(new.kernel)), kernel):
                raise RuntimeError(f"`strip` could not copy the kernel of layer '{old.name}'.")
            if old.use_bias:
                new.bias.assign(ops.convert_to_numpy(old.bias))
        elif old.weights:
            new.set_weights([np.asarray(ops.convert_to_numpy(w)) for w in old.weights])
    return clone


def replace_layers(model, sparse_arguments):
    """Clones `model` (nested Sequential and Functional models too), turning each
    convertible layer (`Dense`, `Conv1D`, `Conv2D`) for which
    `sparse_arguments(layer)` returns a dict (density, mask, ...) into its sparse
    counterpart; None keeps it. Weights are copied; converted kernels keep
    only their connections."""

    def convert(layer):
        if _convertible(layer):
            arguments = sparse_arguments(layer)
            if arguments is not None:
                config = layer.get_config()
                kwargs = {k: config[k] for k in _SHARED if k in config}
                return CONVERTIBLE[type(layer)](density_aware_init=False, **arguments, **kwargs)
        return layer.__class__.from_config(layer.get_config())

    return _clone(model, convert)
