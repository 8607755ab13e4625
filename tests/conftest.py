"""Shared fixtures: quiet logs, seeded state, and a clean dtype policy per test."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402

if keras.backend.backend() == "tensorflow":
    # Two logical CPUs for the tf.distribute tests (tests/distribution); every
    # other test runs on the first, as before. Must happen before TF starts.
    import tensorflow as tf

    try:
        tf.config.set_logical_device_configuration(
            tf.config.list_physical_devices("CPU")[0],
            [tf.config.LogicalDeviceConfiguration()] * 2,
        )
    except RuntimeError:  # TF already started (e.g. a plugin ran an op first)
        pass


@pytest.fixture(autouse=True)
def _reset_keras_state():
    keras.utils.set_random_seed(1234)
    yield
    keras.mixed_precision.set_global_policy("float32")
    keras.backend.clear_session()


def pytest_report_header(config):
    return f"keras {keras.__version__}, backend {keras.backend.backend()}"
