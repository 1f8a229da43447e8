import os
import signal
import subprocess
import sys
import time

import pytest

from keras_mmfusion.training import in_processes


def test_in_processes_yields_every_call_from_one_thread_workers_and_restores_the_environment(monkeypatch):
    monkeypatch.setenv("TF_NUM_INTRAOP_THREADS", "7")
    monkeypatch.delenv("TF_NUM_INTEROP_THREADS", raising=False)
    calls = [("TF_NUM_INTRAOP_THREADS",), ("TF_NUM_INTEROP_THREADS",), ("MMFUSION_UNSET_VARIABLE",)]
    assert dict(in_processes(os.getenv, calls, 2)) == {0: "1", 1: "1", 2: None}
    assert os.environ["TF_NUM_INTRAOP_THREADS"] == "7" and "TF_NUM_INTEROP_THREADS" not in os.environ
    with pytest.raises(ValueError):
        list(in_processes(int, [("12",), ("not a number",)], 1))


def _children(pid):
    """The pids of the processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_workers_exit_when_the_process_that_started_them_is_killed():
    """A killed parent (`kill -9`) leaves no worker behind: the worker is in its first call,
    with a second call queued."""
    script = ("import time; from keras_mmfusion.training import in_processes; "
              "list(in_processes(time.sleep, [(120,), (0,)], 1))")
    parent = subprocess.Popen([sys.executable, "-c", script])
    workers = []
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not workers:
            time.sleep(0.2)
            workers = [p for p in _children(parent.pid) if "spawn_main" in open(f"/proc/{p}/cmdline").read()]
        assert len(workers) == 1, "the pool did not start its worker"
        time.sleep(1.0)  # the worker is starting (importing TensorFlow) or in its call
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        # The watch starts once the worker has imported the package, which takes several
        # times longer on a loaded machine than the watch's one second.
        deadline = time.time() + 90
        while time.time() < deadline and any(_alive(p) for p in workers):
            time.sleep(0.2)
        assert not any(_alive(p) for p in workers), "workers outlived their parent"
    finally:
        parent.kill()
        for p in workers:
            if _alive(p):
                os.kill(p, signal.SIGKILL)
