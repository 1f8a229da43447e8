"""Trials in worker processes of one TensorFlow thread each.

Small models train faster as several one-thread processes, one per core, than as one
process whose TensorFlow thread pools share the cores: their ops are too small to split.
"""

import concurrent.futures
import multiprocessing
import os

ONE_THREAD = {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}


def in_processes(fn, calls, jobs):
    """Yield ``(i, fn(*calls[i]))`` for every call as it finishes, ``jobs`` calls at a time.

    Each worker is a fresh interpreter ("spawn": no TensorFlow state is forked) that reads
    ``ONE_THREAD`` from its environment when it starts TensorFlow. ``fn`` must be
    importable by name (a module-level function). An exception in a call is raised here.
    """
    saved = {key: os.environ.get(key) for key in ONE_THREAD}
    os.environ.update(ONE_THREAD)
    try:
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(fn, *args): i for i, args in enumerate(calls)}
            for future in concurrent.futures.as_completed(futures):
                yield futures[future], future.result()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
