"""Pictures of sparse connectivity and expert usage (matplotlib, the `[plots]` extra)."""

from __future__ import annotations

import numpy as np
from keras import ops

__all__ = ["accuracy_curves", "activation_table", "gate_map", "input_connectivity"]


def _pyplot():
    # The backend is the user's choice (or matplotlib's default): a library leaves it alone.
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "keras_sparse_moe.plots needs matplotlib: pip install keras-sparse-moe[plots]"
        ) from error
    return plt


def input_connectivity(layer, image_shape, ax=None, path=None, title=None):
    """Heatmap of the connections each input pixel keeps (SET paper, Fig. 5).

    Args:
        layer: A built `SparseDense` layer whose inputs are flattened images.
        image_shape: `(height, width)` of the images (`prod == input_dim`).
        ax: Optional matplotlib axes to draw on.
        path: Optional file to save the figure to.
        title: Optional title.

    Returns:
        The `(height, width)` array of per-pixel connection counts.
    """
    from keras_sparse_moe.layers import SparseDense

    if not isinstance(layer, SparseDense):
        raise TypeError(
            "`input_connectivity` draws the inputs of a `SparseDense` layer fed flattened images "
            f"(a convolution's kernel has no per-pixel inputs). Received: {type(layer).__name__}"
        )
    mask = layer.dense_mask()
    if int(np.prod(image_shape)) != mask.shape[0]:
        raise ValueError(
            f"`image_shape` must multiply to the layer's input size {mask.shape[0]}. "
            f"Received: image_shape={tuple(image_shape)}"
        )
    counts = mask.sum(axis=1).reshape(image_shape)
    plt = _pyplot()
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(4, 3.6))
    image = ax.imshow(counts, cmap="viridis")
    ax.figure.colorbar(image, ax=ax, label="connections kept")
    ax.set_title(title or f"{layer.name}: connections per input")
    ax.set_xticks([])
    ax.set_yticks([])
    if path is not None:
        ax.figure.savefig(path, dpi=120, bbox_inches="tight")
    if fig is not None:
        plt.close(fig)
    return counts


def activation_table(table, ax=None, path=None, title=None):
    """Heatmap of an `ActivationTable` (rows: data, columns: experts), values written in.

    Args:
        table: A `keras_sparse_moe.routing.ActivationTable`.
        ax: Optional matplotlib axes to draw on.
        path: Optional file to save the figure to.
        title: Optional title.

    Returns:
        The matplotlib axes drawn on.
    """
    values = np.asarray(table.values)
    plt = _pyplot()
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * values.shape[1], 0.8 + 0.45 * values.shape[0]))
    ax.imshow(values, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    for (i, j), value in np.ndenumerate(values):
        ax.text(
            j,
            i,
            f"{value:.2f}",
            ha="center",
            va="center",
            color="white" if value > 0.6 else "black",
            fontsize=8,
        )
    ax.set_xticks(range(values.shape[1]), [f"expert {e}" for e in range(values.shape[1])])
    ax.set_yticks(range(values.shape[0]), [str(r) for r in table.rows])
    ax.set_title(title or "activation rates")
    if path is not None:
        ax.figure.savefig(path, dpi=120, bbox_inches="tight")
    if fig is not None:
        plt.close(fig)
    return ax


def accuracy_curves(histories, path=None, ax=None, key="val_accuracy", ylabel="test accuracy"):
    """One line per run of `histories[name][key]` against the epoch.

    Args:
        histories: Dict `{run name: History.history}`.
        path: Optional file to save the figure to.
        ax: Optional matplotlib axes to draw on.
        key: The logged value to draw.
        ylabel: Label of the y axis.

    Returns:
        The matplotlib axes drawn on.
    """
    plt = _pyplot()
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, history in histories.items():
        epochs = np.arange(1, len(history[key]) + 1)
        ax.plot(epochs, history[key], marker="o", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if path is not None:
        ax.figure.tight_layout()
        ax.figure.savefig(path, dpi=120)
    if fig is not None:
        plt.close(fig)
    return ax


def gate_map(model_or_gate, x, y=None, layer=None, ax=None, path=None, title=None, batch_size=512):
    """The 2-D map of a `PTSNEGate`: points coloured by class, expert positions and regions.

    Every input is placed on the gate's standardised map (the units of the
    expert positions); the background colours each expert's region (where
    its gate value is the largest: the Voronoi cells of the positions), and
    the numbered markers are the experts' positions.

    Args:
        model_or_gate: A `PTSNEGate`, a `SparseExpertMixture` using one, or a
            Keras model holding such a mixture (its inputs are the model's).
        x: Inputs (what `model_or_gate` takes).
        y: Optional integer labels colouring the points.
        layer: Name of the mixture when the model has several.
        ax: Optional matplotlib axes to draw on.
        path: Optional file to save the figure to.
        title: Optional title.
        batch_size: Batch size of the forward passes.

    Returns:
        The `(n, 2)` standardised map points drawn.
    """
    from keras_sparse_moe.layers import PTSNEGate
    from keras_sparse_moe.routing import _slices, gate_values_fn

    values_of = gate_values_fn(model_or_gate, layer, owner="gate_map", embedding=True)
    gate = values_of.gate
    if not isinstance(gate, PTSNEGate) or gate.n_components != 2:
        raise TypeError(
            "`gate_map` draws the 2-D map of a `PTSNEGate` (n_components=2). Received a "
            f"model or layer whose gate is {gate!r}"
        )
    points = np.concatenate([values_of(batch)[1] for batch in _slices(x, batch_size)])
    z = ops.convert_to_numpy(gate.standardise(points))
    positions = np.asarray(ops.convert_to_numpy(gate.positions))
    low = np.minimum(z.min(axis=0), positions.min(axis=0))
    high = np.maximum(z.max(axis=0), positions.max(axis=0))
    pad = 0.05 * (high - low + 1e-6)
    low, high = low - pad, high + pad
    axes = [np.linspace(low[i], high[i], 300) for i in (0, 1)]
    grid_x, grid_y = np.meshgrid(*axes)
    mesh = np.stack([grid_x.ravel(), grid_y.ravel()], axis=1)
    owner = ((mesh[:, None, :] - positions[None]) ** 2).sum(-1).argmin(axis=1)
    plt = _pyplot()
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.5, 6))
    experts = len(positions)
    ax.imshow(
        owner.reshape(grid_x.shape),
        origin="lower",
        extent=(low[0], high[0], low[1], high[1]),
        cmap="Pastel2" if experts <= 8 else "tab20",
        alpha=0.45,
        aspect="auto",
        interpolation="nearest",
    )
    colours = None if y is None else np.asarray(y).reshape(-1)
    scatter = ax.scatter(z[:, 0], z[:, 1], c=colours, s=2, cmap="tab10", alpha=0.8, linewidths=0)
    if colours is not None:
        handles, labels = scatter.legend_elements(num=len(np.unique(colours)))
        ax.legend(handles, labels, title="class", fontsize=7, markerscale=0.8, loc="best")
    for e, (px, py) in enumerate(positions):
        ax.scatter([px], [py], s=180, c="white", edgecolors="black", zorder=3)
        ax.annotate(str(e), (px, py), ha="center", va="center", fontsize=8, zorder=4)
    ax.set_xlim(low[0], high[0])
    ax.set_ylim(low[1], high[1])
    ax.set_title(title or f"{gate.name}: experts' regions of the t-SNE map")
    if path is not None:
        ax.figure.savefig(path, dpi=120, bbox_inches="tight")
    if fig is not None:
        plt.close(fig)
    return z
