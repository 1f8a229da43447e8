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
