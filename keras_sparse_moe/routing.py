"""Which expert serves which data: activation-rate tables of a mixture's gate.

The activation rate of expert `e` on a dataset is the mean gate value
`mean_x G(x)_e` over its samples. With one expert per dataset as the goal
(MNIST to one expert, CIFAR to the other), the ideal table is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
from keras import ops

from keras_sparse_moe import validation
from keras_sparse_moe.walk import find_layers

__all__ = ["ActivationTable", "activation_rates", "gate_values_fn"]


@dataclass
class ActivationTable:
    """Mean gate value per row (dataset, or dataset and class) and expert.

    Attributes:
        rows: Row labels, e.g. `["mnist", "cifar"]` or `["mnist/0", ...]`.
        values: `(len(rows), num_experts)` float array of mean gate values.
        counts: Number of tokens behind each row.
    """

    rows: list
    values: np.ndarray
    counts: list

    @property
    def num_experts(self) -> int:
        return int(self.values.shape[1])

    def as_dict(self) -> dict:
        """`{row: [rate of expert 0, rate of expert 1, ...]}`."""
        return {row: [float(v) for v in values] for row, values in zip(self.rows, self.values)}

    def to_markdown(self, digits: int = 3) -> str:
        header = "| data | " + " | ".join(f"expert {e}" for e in range(self.num_experts)) + " |"
        rule = "|---|" + "---|" * self.num_experts
        lines = [header, rule]
        for row, values in zip(self.rows, self.values):
            lines.append(f"| {row} | " + " | ".join(f"{v:.{digits}f}" for v in values) + " |")
        return "\n".join(lines)

    def __str__(self) -> str:
        width = max(len("data"), *(len(str(r)) for r in self.rows))
        header = "data".ljust(width) + "".join(f"  expert {e}" for e in range(self.num_experts))
        lines = [header]
        for row, values in zip(self.rows, self.values):
            lines.append(str(row).ljust(width) + "".join(f"  {v:8.3f}" for v in values))
        return "\n".join(lines)


def _resolve_layer(model, layer, owner):
    """The mixture (or, without one, the gate) of `model` named `layer`."""
    from keras_sparse_moe.layers import Gate, SparseExpertMixture

    candidates = find_layers(model, SparseExpertMixture, include_self=True) or find_layers(
        model, Gate, include_self=True
    )
    if layer is not None:
        name = layer if isinstance(layer, str) else layer.name
        candidates = [lay for lay in candidates if lay.name == name]
    if len(candidates) != 1:
        names = [lay.name for lay in candidates]
        raise ValueError(
            f"`{owner}` needs exactly one `SparseExpertMixture` (or gate) in model "
            f"'{model.name}'; pass `layer=` to choose. Found: {names or 'none'}"
        )
    return candidates[0]


def _slices(inputs, batch_size):
    """Batches of a nested structure of arrays with equal first dimension."""
    flat = keras.tree.flatten(inputs)
    n = len(flat[0])
    for start in range(0, n, batch_size):
        part = [np.asarray(a[start : start + batch_size]) for a in flat]
        yield keras.tree.pack_sequence_as(inputs, part)


def _keras_mask(tensor):
    """The Keras mask a layer attached to `tensor` (`Embedding(mask_zero=True)`,
    `Masking`), as numpy, or None."""
    from keras.src.backend import get_keras_mask  # Keras 3 keeps it off the public API

    mask = get_keras_mask(tensor)
    return None if mask is None else np.asarray(ops.convert_to_numpy(mask))


def gate_values_fn(model_or_gate, layer=None, owner="activation_rates", embedding=False):
    """A function mapping a batch of inputs to `(tokens, num_experts)` gate values.

    `model_or_gate` is a `Gate` (inputs: its input), a `SparseExpertMixture`
    (inputs: `x` or `(x, gate_inputs)`), or a model holding one (inputs: the
    model's inputs; the mixture's own inputs are computed by a sub-model).
    With `embedding=True` the function returns `(gate values, the gate's
    embedding)` (`PTSNEGate`: the raw map points; None for other gates), and
    the resolved gate is its attribute `gate`.
    """
    from keras_sparse_moe.layers import Gate, SparseExpertMixture

    target = model_or_gate
    if isinstance(target, (Gate, SparseExpertMixture)):
        feature_model = None
    elif isinstance(target, keras.Model):
        target = _resolve_layer(model_or_gate, layer, owner)
        node = target._inbound_nodes[0] if target._inbound_nodes else None
        if node is None:
            raise ValueError(
                f"`{owner}`: layer '{target.name}' has not been called inside model "
                f"'{model_or_gate.name}'; build the model on an input first."
            )
        tensors = [node.arguments.args[0]]
        gate_inputs = node.arguments.kwargs.get("gate_inputs")
        if gate_inputs is None and len(node.arguments.args) > 1:
            gate_inputs = node.arguments.args[1]
        if gate_inputs is not None:
            tensors.append(gate_inputs)
        inputs = model_or_gate.inputs
        feature_model = keras.Model(inputs[0] if len(inputs) == 1 else inputs, tensors)
    else:
        raise TypeError(
            f"`{owner}` got an invalid `model_or_gate`. Expected a Keras model, a "
            f"`SparseExpertMixture` or a `Gate`. Received: {model_or_gate!r}"
        )

    def values(batch):
        mask = None
        if feature_model is not None:
            batch = feature_model(batch, training=False)
            batch = batch if isinstance(batch, (list, tuple)) else [batch]
            mask = _keras_mask(batch[0])  # padding of sequence inputs: left out
        if isinstance(target, Gate):
            gate_input = batch[0] if isinstance(batch, (list, tuple)) else batch
            routing = target.route(ops.convert_to_tensor(gate_input), training=False)
            gates, points = routing.gates, routing.embedding
        else:
            args = batch if isinstance(batch, (list, tuple)) else [batch]
            gates = target.gate_values(*args, mask=mask)
            points = target.gate_embedding(*args) if embedding else None
            if points is not None and mask is not None:
                points = ops.convert_to_numpy(points)[np.asarray(mask).reshape(-1).astype(bool)]
        gates = ops.convert_to_numpy(gates)
        if not embedding:
            return gates
        return gates, None if points is None else ops.convert_to_numpy(points)

    values.gate = target if isinstance(target, Gate) else target.gate
    return values


def activation_rates(
    model_or_gate, data, by_class=None, layer=None, batch_size=256, verbose=True
) -> ActivationTable:
    """Mean gate value of every expert on every dataset.

    Args:
        model_or_gate: A Keras model containing a `SparseExpertMixture` (or a
            gate), the mixture itself, or a `Gate`.
        data: Dict `{name: inputs}`; `inputs` is what the model takes (a list
            for a multi-input model), or for a mixture `x` / `(x, gate_inputs)`.
        by_class: Optional dict `{name: labels}` (one label per token) splitting
            each dataset's row into one row per class, named `"name/label"`.
        layer: Name of the mixture to read when the model has several.
            When the mixture's input carries a Keras mask (sequence padding),
            only the real tokens count.
        batch_size: Samples per forward pass.
        verbose: Print the table.

    Returns:
        An `ActivationTable`; `str(table)` is the printed table.

    Examples:

        >>> import numpy as np
        >>> import keras_sparse_moe
        >>> gate = keras_sparse_moe.layers.OracleGate(2)
        >>> table = keras_sparse_moe.routing.activation_rates(
        ...     gate, {"a": np.zeros(4, "int32"), "b": np.ones(3, "int32")}, verbose=False)
        >>> table.values.tolist()
        [[1.0, 0.0], [0.0, 1.0]]
    """
    if not isinstance(data, dict) or not data:
        raise TypeError(
            "`activation_rates` got an invalid `data`. Expected a non-empty dict "
            f"{{name: inputs}}. Received: {type(data).__name__}"
        )
    if by_class is not None and not isinstance(by_class, dict):
        raise TypeError(
            "`activation_rates` got an invalid `by_class`. Expected None or a dict "
            f"{{name: labels}}. Received: {type(by_class).__name__}"
        )
    unknown = sorted(set(by_class or ()) - set(data), key=str)
    if unknown:
        raise ValueError(
            "`activation_rates` got `by_class` names that are not in `data`. "
            f"Expected names from {sorted(data, key=str)}. Received: {unknown}"
        )
    batch_size = validation.check_size("batch_size", batch_size, "activation_rates")
    values_of = gate_values_fn(model_or_gate, layer)
    rows, values, counts = [], [], []
    for name, inputs in data.items():
        gates = np.concatenate([values_of(batch) for batch in _slices(inputs, batch_size)])
        labels = None if by_class is None else by_class.get(name)
        if labels is None:
            rows.append(str(name))
            values.append(gates.mean(axis=0))
            counts.append(len(gates))
            continue
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != len(gates):
            raise ValueError(
                f"`activation_rates` needs one label per token in `by_class[{name!r}]`. "
                f"Received: {len(labels)} labels for {len(gates)} tokens of `data[{name!r}]`"
            )
        for label in np.unique(labels):
            chosen = gates[labels == label]
            rows.append(f"{name}/{label}")
            values.append(chosen.mean(axis=0))
            counts.append(len(chosen))
    table = ActivationTable(rows, np.asarray(values, dtype=np.float64), counts)
    if verbose:
        print(table)
    return table
