"""Helpers shared by the benchmark scripts: timing and a description of the machine."""

import os
import platform
import time

import numpy as np


def median_seconds(fn, repeats, warmup=2):
    """The median wall time of ``fn()`` over ``repeats`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def median_ratio(fn, reference, repeats, warmup=2):
    """Time ``fn`` against ``reference`` over ``repeats`` alternating pairs of calls.

    Timing the two side by side, pair after pair, cancels most of the drift a shared
    machine adds to two separate medians.

    Returns:
        ``(ratio, seconds)``: the median of ``time(fn()) / time(reference())`` over the
        pairs, and the median time of ``fn()``.
    """
    for _ in range(warmup):
        fn()
        reference()
    ratios, times = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        middle = time.perf_counter()
        reference()
        times.append(middle - start)
        ratios.append(times[-1] / (time.perf_counter() - middle))
    return float(np.median(ratios)), float(np.median(times))


def training_step_peak_mib(model, x, y, steps=3):
    """The largest over ``steps`` training steps of the peak memory TensorFlow's CPU
    allocator reports during the step, above what is in use before it, in MiB.

    Call it after warm-up steps have traced the step and built the optimizer.
    """
    import tensorflow as tf

    peaks = []
    for _ in range(steps):
        tf.config.experimental.reset_memory_stats("CPU:0")
        before = tf.config.experimental.get_memory_info("CPU:0")["current"]
        model.train_on_batch(x, y)
        peaks.append((tf.config.experimental.get_memory_info("CPU:0")["peak"] - before) / 2**20)
    return max(peaks)


def rosmap_available():
    """Whether ROSMAP can be read: from ``$MMFUSION_ROSMAP``, from the data folder beside a
    source checkout (``../shared/data/rosmap``, which then becomes ``$MMFUSION_ROSMAP``),
    or by a download into the Keras cache."""
    from keras_mmfusion.datasets import DataError, mogonet_folder

    checkout = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "rosmap")
    if "MMFUSION_ROSMAP" not in os.environ and os.path.isdir(checkout):
        os.environ["MMFUSION_ROSMAP"] = checkout
    try:
        mogonet_folder("rosmap")
    except DataError as error:
        print(f"ROSMAP not available: {error}")
        return False
    return True


def machine():
    """Cores, library versions, GPUs and platform, recorded with every result."""
    import keras
    import tensorflow as tf

    return {
        "cpu_cores": os.cpu_count(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "gpu": [d.name for d in tf.config.list_physical_devices("GPU")] or None,
        "platform": platform.platform(),
    }
