import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# XLA compiles the tests' jit-compiled functions with LLVM's optimisation passes off
# (XLA's own HLO passes still run): the tests check what the compiled programs compute
# and which HLO they hold, not how fast their machine code runs, and a DEQ classifier's
# training step then compiles in about 7 s instead of 13 s on the 2-core CI machine.
# XLA reads the variable at a process's first compilation, and the scripts that tests
# run as subprocesses inherit it. A level the caller sets in XLA_FLAGS is kept.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

# TensorFlow's own CPU kernels instead of oneDNN's: on the tests' small tensors they take
# less CPU time (two pairs of test files, on the 2-core CI machine: 15% and 18% less).
# The tests check what the models compute, which both kernel sets compute to float32
# rounding, with one exception: oneDNN's fused MatMul + BiasAdd + Relu kernel maps NaN to
# 0 and TensorFlow's does not. test_non_finite.py checks the classifiers' NaN
# handling in a subprocess with oneDNN on, as users run it. The scripts that tests run as
# subprocesses inherit the setting; a value the caller sets is kept.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import keras  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Grappler's rewrites of a graph that change what it computes by float rounding at most
# are off in the test processes: they cost about a tenth of the CPU time of the files
# that trace and run models in-process (test_deq_fusion.py, and test_basic.py with
# test_mixed_precision.py, on the 2-core CI machine: 12% and 10% less), the arithmetic
# rewrites most of it. The remapper stays on, since its fused kernels are what users'
# graphs run, and so does function inlining. test_reproducibility.py turns the
# arithmetic rewrites back on, as users have them, to test the switch that
# training.fixed_summation_order makes. Scripts that tests run as subprocesses keep
# every rewrite.
tf.config.optimizer.set_experimental_options({option: False for option in (
    "layout_optimizer", "constant_folding", "shape_optimization", "arithmetic_optimization", "dependency_optimization",
    "loop_optimization", "debug_stripper", "pin_to_host_optimization", "implementation_selector",
    "scoped_allocator_optimization", "auto_parallel")})

if os.environ.get("PYTEST_XDIST_WORKER"):
    # The test workers (setup.cfg: three) share the machine's cores: one intra-op thread
    # each, so that the workers' thread pools do not spin-wait for the same cores. The
    # environment variable carries the setting to the scripts that tests run as
    # subprocesses (examples, the CLI, the distributed-training scripts).
    os.environ["TF_NUM_INTRAOP_THREADS"] = "1"
    tf.config.threading.set_intra_op_parallelism_threads(1)


@pytest.fixture(autouse=True)
def _reset_keras_state():
    keras.config.set_dtype_policy("float32")
    keras.utils.set_random_seed(0)
    yield
    keras.config.set_dtype_policy("float32")


# The longest test files, longest first (each 25-245 s in a full run on the 2-core CI
# machine). ``--dist loadfile`` hands out whole files in collection order (setup.cfg
# turns off xdist's reordering by test count), so the long ones start first and no
# worker is left running one of them alone at the end.
LONGEST_FIRST = (
    "layers/test_deq_fusion.py", "test_export.py", "layers/test_basic.py", "test_export_solver.py",
    "test_mixed_precision.py", "distribute/test_mirrored.py", "test_export_quantized.py", "test_cli.py",
    "test_examples.py", "test_benchmarks.py", "test_models.py", "test_cli_runs.py", "test_reference_classifier.py",
    "distribute/test_multi_worker.py", "layers/test_dynamic.py", "equilibrium/test_gradients.py",
    "training/test_processes.py", "test_non_finite.py", "test_training_parity.py", "equilibrium/test_solvers.py",
    "layers/test_modality_mask.py", "layers/test_weight_normalization.py",
)


def pytest_collection_modifyitems(config, items):
    tests = os.path.dirname(os.path.abspath(__file__))
    rank = {os.path.join(tests, name): i for i, name in enumerate(LONGEST_FIRST)}
    missing = [path for path in rank if not os.path.isfile(path)]
    if missing:
        raise pytest.UsageError(f"tests/conftest.py LONGEST_FIRST names files that do not exist: {missing}")
    items.sort(key=lambda item: rank.get(str(item.path), len(rank)))
