"""Every `>>>` example in the package's docstrings runs and prints what it shows."""

import doctest
import importlib
import pkgutil

import pytest

import keras_sparse_moe

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(keras_sparse_moe.__path__, "keras_sparse_moe.")
    if not info.name.startswith("keras_sparse_moe.interop")  # needs the tfmot extra
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
