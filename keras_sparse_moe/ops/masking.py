"""Backend-agnostic mask primitives: gradient masking and compact mask encoding."""

from __future__ import annotations

import base64

import numpy as np
from keras import ops

__all__ = ["decode_mask", "encode_mask", "mask_gradient"]


@ops.custom_gradient
def _identity_with_masked_gradient(kernel, mask):
    def grad(*args, upstream=None):
        if upstream is None:
            (upstream,) = args
        # A select, not a product: a NaN or inf gradient must not reach a masked entry.
        masked = ops.where(mask > 0, upstream, ops.zeros_like(upstream))
        return masked, ops.zeros_like(mask)

    return ops.copy(kernel), grad


def mask_gradient(kernel, mask):
    """Returns `kernel` unchanged; its gradient is multiplied by `mask`.

    Where the mask is 0 the gradient is exactly 0 (even where the incoming
    gradient is NaN or inf), so an optimizer step (SGD,
    momentum, Adam, AdamW, RMSprop, ...) leaves a zero weight at zero. The
    forward pass costs nothing and the backward multiply fuses into the
    optimizer's elementwise update under XLA.
    """
    # `copy` reads variables into tensors, so the custom gradient sees plain
    # tensor inputs on every backend (TF refuses captured variables there).
    return _identity_with_masked_gradient(ops.copy(kernel), ops.copy(mask))


def encode_mask(mask) -> dict:
    """Packs a binary mask into a small JSON-friendly dict (for `get_config`)."""
    mask = np.asarray(mask) != 0
    return {
        "shape": list(mask.shape),
        "bits": base64.b64encode(np.packbits(mask.ravel())).decode("ascii"),
    }


def decode_mask(encoded) -> np.ndarray:
    """Inverse of `encode_mask`; arrays and nested lists pass through."""
    if isinstance(encoded, dict) and set(encoded) == {"shape", "bits"}:
        shape = tuple(encoded["shape"])
        bits = np.frombuffer(base64.b64decode(encoded["bits"]), dtype=np.uint8)
        flat = np.unpackbits(bits)[: int(np.prod(shape))]
        return flat.reshape(shape).astype(np.float32)
    return np.asarray(encoded)
