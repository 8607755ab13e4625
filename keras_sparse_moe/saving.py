"""The format version of saved layers: what a `.keras` file says about the code that wrote it.

Every layer of the library writes `format_version` into its config. Loading
checks it: a file from this format or an earlier one loads (older formats are
migrated here, when one changes); a file written by a newer format, which this
code cannot know how to read, gets a clear error instead of a wrong model.
Files from before versioning have no `format_version` and read as format 0.
Format 0 configs are migrated on loading (`NoisyTopKGate`'s early `k` reads as
`top_k`). Format 0 mixtures saved before the expert bank became a layer of its
own (before 2026-11-29) keep the bank's weights one level up in the file;
loading one names `upgrade_file`, which moves them once. Format 2
(2026-12-05) keeps one int32 position per connection of a sparse-storage
layer where formats 0 and 1 kept a row and a column: those are packed on
loading (`SlotStorage.read_store`), and a format 1 reader refuses a format 2
file instead of failing on its variable count.

Examples:
    >>> import keras_sparse_moe as ksm
    >>> layer = ksm.SparseDense(4, density=0.5, seed=0)
    >>> layer.get_config()["format_version"] == ksm.saving.FORMAT_VERSION
    True
    >>> type(ksm.SparseDense.from_config(layer.get_config())).__name__
    'SparseDense'
"""

from __future__ import annotations

import io
import os
import zipfile

__all__ = ["FORMAT_VERSION", "VersionedConfig", "read_config", "upgrade_file"]

FORMAT_VERSION = 2

# Format 0 arguments renamed since: owner -> {old name: new name}.
_FORMAT_0_RENAMES = {"NoisyTopKGate": {"k": "top_k"}}


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
    if version == 0:
        for old, new in _FORMAT_0_RENAMES.get(owner, {}).items():
            if old in config and new not in config:
                config[new] = config.pop(old)
    return config


# What a mixture held directly before its expert bank became a layer of its own.
_BANK_PARTS = ("expert_hidden", "expert_output", "expert_routes", "expert_list")
_WEIGHTS = "model.weights.h5"


def upgrade_file(path, output=None) -> str:
    """Converts a `.keras` file whose mixtures predate the expert-bank layer.

    Mixtures saved before 2026-11-29 (layer format 0) keep their experts'
    weights beside the gate, where this version looks for them inside the
    `expert_bank` layer; loading such a file fails with a message naming
    this function. The converted file (`output`, by default `path` with
    `_upgraded` before its extension) loads with the same outputs. `path`
    is left as it is. Returns the converted file's path.

    Examples:
        >>> import keras_sparse_moe as ksm
        >>> ksm.saving.upgrade_file("old_mixture.keras")  # doctest: +SKIP
        'old_mixture_upgraded.keras'
    """
    import h5py

    path = os.fspath(path)
    if output is None:
        stem, ext = os.path.splitext(path)
        output = f"{stem}_upgraded{ext}"
    output = os.fspath(output)
    if os.path.abspath(output) == os.path.abspath(path):
        raise ValueError(
            "`upgrade_file` writes a new file and leaves the old one as it is: `output` "
            f"must differ from `path`. Received: path={path!r}, output={output!r}"
        )
    with zipfile.ZipFile(path) as source:
        if _WEIGHTS not in source.namelist():
            raise ValueError(
                f"`upgrade_file` reads `.keras` files with their weights in `{_WEIGHTS}`. "
                f"Received: path={path!r} holding {source.namelist()}"
            )
        weights = io.BytesIO(source.read(_WEIGHTS))
        with h5py.File(weights, "r+") as h5:
            mixtures = []

            def find(name, item):  # a mixture's group, its experts beside its gate
                if isinstance(item, h5py.Group) and "gate" in item and "expert_bank" not in item:
                    if any(part in item for part in _BANK_PARTS):
                        mixtures.append(name)

            h5.visititems(find)
            if not mixtures:
                raise ValueError(
                    "`upgrade_file` found no mixture with its experts' weights beside its gate: "
                    f"the file needs no upgrade. Received: path={path!r}"
                )
            for name in mixtures:
                for part in _BANK_PARTS:
                    if part in h5[name]:
                        h5.move(f"{name}/{part}", f"{name}/expert_bank/{part}")
        with zipfile.ZipFile(output, "w") as target:
            for info in source.infolist():
                data = weights.getvalue() if info.filename == _WEIGHTS else source.read(info)
                target.writestr(info, data)
    return output


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
