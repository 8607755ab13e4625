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
# Every program, however quick to compile: the ops that tests and model building run
# eagerly are compiled one by one, per shape, in each process, and the other worker and
# the subprocesses then read them (the JAX run: 422 -> 379 s).
# The first process (the xdist controller) makes the folder; workers and the tests'
# subprocesses inherit it through the environment.
_JAX_CACHE = "JAX_COMPILATION_CACHE_DIR"
_OWNS_CACHE = _JAX_CACHE not in os.environ
if _OWNS_CACHE:
    os.environ[_JAX_CACHE] = tempfile.mkdtemp(prefix="ksm-tests-jax-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
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


def _build_before_tracing(trainer_class):
    """`fit`, `evaluate` and `train_on_batch`/`test_on_batch` build the model, its
    metrics and the optimizer before tracing their step, as Keras does under a
    `tf.distribute` strategy.

    Without a strategy Keras' TensorFlow trainer builds them inside the first trace;
    a trace that creates variables is traced again, so each new model's first step
    was traced twice (about a sixth of the TensorFlow run: 10.7 -> 9.1 min). Tests marked
    `keras_deferred_build` keep Keras' own order.
    """
    import tensorflow as tf

    deferred = trainer_class._maybe_symbolic_build

    def build_first(self, iterator=None, data_batch=None):
        if self._distribute_strategy is not None:
            return deferred(self, iterator=iterator, data_batch=data_batch)
        self._distribute_strategy = tf.distribute.get_strategy()  # the default one
        try:
            return deferred(self, iterator=iterator, data_batch=data_batch)
        finally:
            self._distribute_strategy = None

    return build_first


@pytest.fixture(autouse=True)
def _tracing_once(request, monkeypatch):
    if keras.backend.backend() == "tensorflow" and not request.node.get_closest_marker(
        "keras_deferred_build"
    ):
        from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

        monkeypatch.setattr(
            TensorFlowTrainer, "_maybe_symbolic_build", _build_before_tracing(TensorFlowTrainer)
        )
    yield


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
