"""The format version of saved layers: what a `.keras` file says about the code that wrote it.

Every layer of the library writes `format_version` into its config. Loading
checks it: a file from this format or an earlier one loads (older formats are
migrated here, when one changes); a file written by a newer format, which this
code cannot know how to read, gets a clear error instead of a wrong model.
Files from before versioning have no `format_version` and read as format 0,
whose configs are those of format 1.

Examples:
    >>> import keras_sparse_moe as ksm
    >>> layer = ksm.SparseDense(4, density=0.5, seed=0)
    >>> layer.get_config()["format_version"] == ksm.saving.FORMAT_VERSION
    True
    >>> type(ksm.SparseDense.from_config(layer.get_config())).__name__
    'SparseDense'
"""

from __future__ import annotations

__all__ = ["FORMAT_VERSION", "VersionedConfig", "read_config"]

FORMAT_VERSION = 1


def read_config(config: dict, owner: str) -> dict:
    """`config` without its `format_version`, checked (and migrated, where a format
    changed) for this code; a ValueError for a format newer than `FORMAT_VERSION`."""
    config = dict(config)
    version = config.pop("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ValueError(
            f"`{owner}` config has an invalid `format_version`. Expected an int >= 0. "
            f"Received: format_version={version!r}"
        )
    if version > FORMAT_VERSION:
        raise ValueError(
            f"`{owner}` was saved by a newer keras-sparse-moe (layer format {version}); this "
            f"version reads formats up to {FORMAT_VERSION}. Upgrade keras-sparse-moe to load "
            f"it. Received: format_version={version}"
        )
    return config


class VersionedConfig:
    """Mixin of the library's layers: writes `format_version`, reads it back.

    Placed before `keras.layers.Layer` in the bases; a subclass's own
    `from_config` calls `read_config` first.
    """

    def get_config(self):
        return {**super().get_config(), "format_version": FORMAT_VERSION}

    @classmethod
    def from_config(cls, config):
        return super().from_config(read_config(config, cls.__name__))
