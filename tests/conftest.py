"""Shared fixtures: quiet logs, seeded state, and a clean dtype policy per test."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _reset_keras_state():
    keras.utils.set_random_seed(1234)
    yield
    keras.mixed_precision.set_global_policy("float32")
    keras.backend.clear_session()


def pytest_report_header(config):
    return f"keras {keras.__version__}, backend {keras.backend.backend()}"
