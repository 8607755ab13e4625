"""Small loaders for the examples: a given .npz, Keras' cache, or bundled digits.

The library never assumes a data folder: callers pass a path, and without one
the loader tries Keras' MNIST (its cache, or a download), then falls back to
scikit-learn's bundled 8x8 digits so examples also run offline.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import numpy as np

__all__ = ["Dataset", "load_image_classification"]

logger = logging.getLogger(__name__)


@dataclass
class Dataset:
    """Flattened float32 images in [0, 1] with int32 labels, and where they came from."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    image_shape: tuple

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1


def _flatten(x, scale):
    return x.reshape(len(x), -1).astype("float32") / scale


def _from_arrays(name, x_train, y_train, x_test, y_test, scale=255.0):
    return Dataset(
        name=name,
        x_train=_flatten(x_train, scale),
        y_train=np.asarray(y_train).astype("int32").ravel(),
        x_test=_flatten(x_test, scale),
        y_test=np.asarray(y_test).astype("int32").ravel(),
        image_shape=tuple(x_train.shape[1:]),
    )


def load_image_classification(path: str | None = None, timeout: float = 10.0) -> Dataset:
    """Loads MNIST-like data for the examples.

    Args:
        path: An `.npz` file with `x_train`, `y_train`, `x_test`, `y_test`
            (uint8 images). When None, Keras' MNIST is used (cache or download)
            and, failing that, scikit-learn's bundled digits.
        timeout: Seconds to wait for a download before falling back.

    Returns:
        A `Dataset` with flattened images scaled to [0, 1].
    """
    if path is not None:
        if not os.path.exists(path):
            raise ValueError(f"No data file at `path`. Received: path={path!r}")
        with np.load(path) as data:
            missing = {"x_train", "y_train", "x_test", "y_test"} - set(data.files)
            if missing:
                raise ValueError(
                    f"The data file lacks the arrays {sorted(missing)}. "
                    f"Received: path={path!r} with arrays {sorted(data.files)}"
                )
            arrays = [data[k] for k in ("x_train", "y_train", "x_test", "y_test")]
        return _from_arrays(os.path.basename(path), *arrays)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        import keras

        (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
        return _from_arrays("mnist (Keras)", x_train, y_train, x_test, y_test)
    except Exception as error:  # offline: no cache and no download
        logger.warning("MNIST unavailable (%s); using scikit-learn's digits.", error)
    finally:
        socket.setdefaulttimeout(previous)
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.images, digits.target, test_size=0.25, random_state=0, stratify=digits.target
    )
    return _from_arrays("digits (scikit-learn, offline)", x_train, y_train, x_test, y_test, 16.0)
