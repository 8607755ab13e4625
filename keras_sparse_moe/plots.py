"""Pictures of sparse connectivity and expert usage (matplotlib, the `[plots]` extra)."""

from __future__ import annotations

import numpy as np
from keras import ops

__all__ = ["accuracy_curves", "activation_table", "input_connectivity"]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
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
    mask = np.asarray(ops.convert_to_numpy(layer.mask))
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
        table: A `keras_sparse_moe.metrics.ActivationTable`.
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
