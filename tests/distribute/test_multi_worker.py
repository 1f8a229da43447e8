"""MultiWorkerMirroredStrategy with two worker processes on 127.0.0.1: examples/distributed.py
trains the DEQ classifier, both workers end with the same weights, and the loss falls."""

import json
import os
import socket
import subprocess
import sys


EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples", "distributed.py")


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_two_loopback_workers_train_to_identical_weights(tmp_path):
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    processes = []
    try:
        for index in range(2):
            config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
            env = {**os.environ, "TF_CONFIG": json.dumps(config), "TF_CPP_MIN_LOG_LEVEL": "3"}
            command = [sys.executable, EXAMPLE, "--strategy", "multi-worker", "--epochs", "3", "--samples", "512",
                       "--out", str(tmp_path)]
            processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                              text=True))
        outputs = [p.communicate(timeout=240)[0] for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, output in zip(processes, outputs):
        assert p.returncode == 0, output[-3000:]
    reports = [json.loads((tmp_path / f"worker_{i}.json").read_text()) for i in range(2)]
    assert [r["replicas"] for r in reports] == [2, 2]
    assert reports[0]["weights_sha256"] == reports[1]["weights_sha256"]
    losses = reports[0]["history"]["loss"]
    assert losses[-1] < losses[0], losses
    assert reports[0]["history"]["deq_steps"][-1] <= 50
    assert (tmp_path / "model.keras").is_file()
