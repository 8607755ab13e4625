"""Backend-agnostic primitives written with `keras.ops`."""

from keras_sparse_moe.ops import dispatch, tsne
from keras_sparse_moe.ops.masking import decode_mask, encode_mask, mask_gradient

__all__ = ["decode_mask", "dispatch", "encode_mask", "mask_gradient", "tsne"]
