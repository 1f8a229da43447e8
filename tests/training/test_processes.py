import os

import pytest

from keras_mmfusion.training import in_processes


def test_in_processes_yields_every_call_from_one_thread_workers_and_restores_the_environment(monkeypatch):
    monkeypatch.setenv("TF_NUM_INTRAOP_THREADS", "7")
    monkeypatch.delenv("TF_NUM_INTEROP_THREADS", raising=False)
    calls = [("TF_NUM_INTRAOP_THREADS",), ("TF_NUM_INTEROP_THREADS",), ("MMFUSION_UNSET_VARIABLE",)]
    assert dict(in_processes(os.getenv, calls, 2)) == {0: "1", 1: "1", 2: None}
    assert os.environ["TF_NUM_INTRAOP_THREADS"] == "7" and "TF_NUM_INTEROP_THREADS" not in os.environ
    with pytest.raises(ValueError):
        list(in_processes(int, [("12",), ("not a number",)], 2))
