"""Trials in worker processes of one TensorFlow thread each.

Small models train faster as several one-thread processes, one per core, than as one
process whose TensorFlow thread pools share the cores: their ops are too small to split.
"""

import concurrent.futures
import multiprocessing
import os
import threading
import time

ONE_THREAD = {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}


def in_processes(fn, calls, jobs):
    """Yield ``(i, fn(*calls[i]))`` for every call as it finishes, ``jobs`` calls at a time.

    Each worker is a fresh interpreter ("spawn": no TensorFlow state is forked) that reads
    ``ONE_THREAD`` from its environment when it starts TensorFlow. ``fn`` must be
    importable by name (a module-level function). An exception in a call is raised here.
    Workers exit when this process dies, even killed with no chance to shut the pool down.
    """
    saved = {key: os.environ.get(key) for key in ONE_THREAD}
    os.environ.update(ONE_THREAD)
    try:
        with concurrent.futures.ProcessPoolExecutor(
            jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_exit_with_parent,
            initargs=(os.getpid(),),
        ) as pool:
            futures = {pool.submit(fn, *args): i for i, args in enumerate(calls)}
            for future in concurrent.futures.as_completed(futures):
                yield futures[future], future.result()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _exit_with_parent(parent):
    """In a worker: end this process once ``parent`` is no longer its parent.

    A killed parent cannot shut its pool down, and an idle worker waits on the call queue
    for ever (a sibling holds the queue's write end open); an orphan is adopted by another
    process, which the daemon thread sees within a second.
    """

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
