"""Shared fixtures: quiet logs, seeded state, and a clean dtype policy per test."""

import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One BLAS thread per test process (see `threadpool_limits` below): libraries loaded from
# here on read the variable, those already loaded are limited by threadpoolctl.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# JAX keeps compiled programs on disk for the session: the suite builds the same small
# models again and again (fresh models, the same programs), and a cached program costs
# a file read instead of an XLA compilation (a ParametricTSNE fit: 0.4 s instead of 2.4 s).
# The first process (the xdist controller) makes the folder; workers and the tests'
# subprocesses inherit it through the environment.
_JAX_CACHE = "JAX_COMPILATION_CACHE_DIR"
_OWNS_CACHE = _JAX_CACHE not in os.environ
if _OWNS_CACHE:
    os.environ[_JAX_CACHE] = tempfile.mkdtemp(prefix="ksm-tests-jax-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# The suite's programs are tiny: XLA's CPU backend without LLVM's optimisation passes
# compiles them faster (TF's `jit_compile` and JAX alike, ~15 % of the suite's time) and
# runs them no slower that matters. Benchmarks and users keep XLA's defaults.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

import keras  # noqa: E402
import pytest  # noqa: E402
import threadpoolctl  # noqa: E402

# One BLAS thread per test process: the two xdist workers already fill the cores, and
# OpenBLAS's thread pool once hung a worker for good (its main thread spinning in
# `exec_blas`, waiting on pool threads that never ran, inside PCA's 64x64 `eigh`) in a
# worker that had run the export tests (their runtimes bring thread pools of their own).
threadpoolctl.threadpool_limits(1, user_api="blas")

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
    # No full garbage collection after every test (1-5 s each on TensorFlow, a third of
    # the suite's time): Python's own collector still runs.
    keras.backend.clear_session(free_memory=False)


def pytest_collection_modifyitems(config, items):
    # Tests marked `slow` first (in their order, the others after): xdist hands tests
    # out in this order, so the two workers end together instead of one waiting while
    # the other runs a long test collected last.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_report_header(config):
    return f"keras {keras.__version__}, backend {keras.backend.backend()}"


def pytest_unconfigure(config):
    if _OWNS_CACHE and not hasattr(config, "workerinput"):
        shutil.rmtree(os.environ[_JAX_CACHE], ignore_errors=True)
