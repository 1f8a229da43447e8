"""``mmfusion train`` runs end to end: folders that never overwrite each other, a quiet
start-up, .mat data with the test rows recorded, and the width chosen from the data."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import keras_mmfusion_cli as cli


def tree_bytes(folder):
    """``{relative path: bytes}`` of every file below ``folder``."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_train_never_overwrites_a_run_unless_told_to(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--data", "synthetic", "--fusion", "concat", "--epochs", "1", "--out", str(out), "--quiet"]
    assert cli.main(args) == 0
    first = tree_bytes(out)
    assert {"model.keras", "metrics.json"} <= set(first)
    capsys.readouterr()
    assert cli.main(args + ["--seed", "1"]) == 2
    assert f"--out {out} already holds a run; pass --overwrite" in capsys.readouterr().err
    assert tree_bytes(out) == first
    assert cli.main(args + ["--seed", "1", "--overwrite"]) == 0
    assert json.loads((out / "metrics.json").read_text())["seed"] == 1
    # Written beside the target and moved into place: nothing else is left in its parent.
    assert os.listdir(tmp_path) == ["run"]
    # A folder holding anything but a run is never replaced.
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    assert cli.main(args[:-3] + ["--out", str(other), "--overwrite", "--quiet"]) == 2
    assert "holds files that are not an 'mmfusion train' run (todo.txt)" in capsys.readouterr().err
    assert tree_bytes(other) == {"todo.txt": b"mine"}


def test_a_run_stopped_mid_fit_leaves_no_folder(tmp_path):
    out = tmp_path / "run"
    run = subprocess.Popen([sys.executable, "-m", "keras_mmfusion_cli", "train", "--fusion", "concat", "--epochs",
                            "1000", "--patience", "0", "--out", str(out)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        # Keras's progress bar ends each epoch's line; the third epoch has begun.
        for line in run.stdout:
            if line.startswith("Epoch 3/1000"):
                break
        assert run.poll() is None
        assert [p.name[:13] for p in tmp_path.iterdir()] == [".run.partial-"]
        run.send_signal(signal.SIGTERM)
        run.wait(timeout=60)
        assert run.returncode == 128 + signal.SIGTERM, run.stderr.read()[-3000:]
    finally:
        run.kill()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_fit_ends_the_batch_then_stops_fit_and_raises_when_fit_ends(signum, capsys):
    # The handler only records the signal: raising from inside a TensorFlow op (as the
    # dataset iterator's creation at an epoch's start) could abort the process.
    import keras

    termination = cli._Termination()

    class SignalAtBatch2(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 2:
                termination.handle(signum, None)

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    with pytest.raises(SystemExit) as stop:
        model.fit(np.zeros((40, 3)), np.zeros(40), batch_size=4, epochs=5, verbose=0,
                  callbacks=[SignalAtBatch2(), termination.callback()])
    assert stop.value.code == 128 + signum
    assert int(model.optimizer.iterations) == 3  # batch 2 ran to its end, no batch after it
    assert f"mmfusion: {signal.Signals(signum).name}: stopping at the end of the current batch" in (
        capsys.readouterr().err)
    with pytest.raises(SystemExit) as again:  # a second signal raises at once
        termination.handle(signum, None)
    assert again.value.code == 128 + signum


def test_train_handles_sigterm_and_ctrl_c_while_it_runs_and_restores_the_handlers(monkeypatch):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    during = {}

    def fake_train(args):
        during.update({s: signal.getsignal(s) for s in before})

    monkeypatch.setitem(cli.COMMANDS, "train", fake_train)
    assert cli.main(["train", "--out", "unused"]) == 0
    assert during == {s: cli._termination.handle for s in before}
    assert {s: signal.getsignal(s) for s in before} == before


def test_the_cli_starts_without_tensorflows_log_lines(tmp_path):
    # A user's environment: no TF_CPP_MIN_LOG_LEVEL of their own. (Without the quiet import,
    # absl's "All log messages before absl::InitializeLog()" and the CUDA-driver lines
    # come first; --verbose shows them.)
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    done = subprocess.run([sys.executable, "-m", "keras_mmfusion_cli", "train", "--fusion", "concat", "--epochs", "1",
                           "--out", str(tmp_path / "run"), "--quiet"], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and "accuracy" in done.stdout
    assert done.stderr == ""


def test_a_child_of_a_quiet_process_imports_tensorflow_quietly_too():
    # The parent's level is its own, not the user's: a child that calls the quiet import
    # (a "spawn" worker of examples/rosmap.py --jobs re-runs the script's top level) hides
    # the start-up lines as well, and says nothing else on stderr.
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", cli._QUIET_MARK)}
    child = "import keras_mmfusion_cli as cli; cli.quiet_tensorflow_import()"
    parent = (f"import subprocess, sys\n{child}\n"
              f"done = subprocess.run([sys.executable, '-c', {child!r}], capture_output=True, text=True)\n"
              "print(done.returncode, repr(done.stderr))")
    done = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, env=env)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.strip() == "0 ''"


def write_views_mat(path, labels, seed=0, widths=(6, 4)):
    """A two-view .mat file as the multi-view benchmarks ship them: views in a cell array
    X (the second stored transposed), labels Y."""
    import scipy.io

    rng = np.random.default_rng(seed)
    views = [rng.normal(size=(len(labels), w)) + labels[:, None] for w in widths]
    views[1] = views[1].T
    cells = np.empty((1, 2), dtype=object)
    cells[0, 0], cells[0, 1] = views
    scipy.io.savemat(path, {"X": cells, "Y": labels.reshape(-1, 1).astype(float)})


def test_a_mat_file_trains_and_evaluates_on_the_same_drawn_test_rows(tmp_path, capsys):
    from keras_mmfusion.training import load_splits

    data = tmp_path / "views.mat"
    write_views_mat(data, np.arange(150) % 3 + 1)
    out = tmp_path / "run"
    args = ["train", "--data", str(data), "--fusion", "concat", "--epochs", "2", "--out", str(out), "--quiet"]
    # Labels 1..3 are refused with the option that shifts them, never shifted silently.
    assert cli.main(args) == 2
    assert "labels in 'Y' are 1..3; labels are class indices from 0. Pass label_base=1 (mmfusion: --label-base 1)" in (
        capsys.readouterr().err)
    assert cli.main(args + ["--label-base", "1", "--test-fraction", "0.3", "--split-seed", "5"]) == 0
    assert "105 train / 45 test samples (test split: 0.3 of each class, --split-seed 5)" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["data_label_base"], metrics["data_test_fraction"], metrics["data_split_seed"]) == (1, 0.3, 5)
    rows = load_splits(str(data), seed=5, label_base=1, test_fraction=0.3).test_rows
    assert len(rows) == 45 and metrics["data_test_rows_sha256"] == cli._test_rows_digest(
        load_splits(str(data), seed=5, label_base=1, test_fraction=0.3))
    # Another seed draws other rows.
    assert not np.array_equal(load_splits(str(data), seed=6, label_base=1, test_fraction=0.3).test_rows, rows)
    # evaluate reads the data, the label base and the split from the record: the same rows.
    assert cli.main(["evaluate", "--model", str(out / "model.keras"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["samples"] == 45 and printed["accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-6)
    # Data changed since training draws other test rows, and evaluate says so.
    write_views_mat(data, np.roll(np.arange(150) % 3 + 1, 1))
    assert cli.main(["evaluate", "--model", str(out / "model.keras")]) == 2
    assert "differ from those the model was tested on, as recorded in metrics.json" in capsys.readouterr().err


def test_train_chooses_the_width_from_the_data_and_records_it(tmp_path, capsys):
    labels = np.arange(200) % 10
    data = tmp_path / "ten.mat"
    write_views_mat(data, labels, widths=(40, 30))
    out = tmp_path / "run"
    assert cli.main(["train", "--data", str(data), "--fusion", "concat", "--epochs", "1", "--out", str(out),
                     "--quiet"]) == 0
    assert "width of the encoders, fusion and head: 64 (chosen from the data: 10 classes, widest view 40" in (
        capsys.readouterr().out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["units"] == 64 and metrics["units_chosen_by"] == "units_for"
    assert cli.main(["train", "--data", str(data), "--fusion", "concat", "--epochs", "1", "--out", str(out),
                     "--quiet", "--overwrite", "--units", "16"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["units"] == 16 and metrics["units_chosen_by"] == "--units"
