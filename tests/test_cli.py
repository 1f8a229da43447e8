import json
import os
import re
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest

import keras_mmfusion_cli as cli


def run_cli(*args):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", "keras_mmfusion_cli", *args], capture_output=True, text=True, env=env)


def own_lines(stderr):
    """stderr without TensorFlow's import-time log lines, which TF prints before
    absl logging is initialised whatever TF_CPP_MIN_LOG_LEVEL says."""
    noise = ("WARNING: All log messages before absl", "I0000 ", "W0000 ")
    return [line for line in stderr.strip().splitlines() if not line.startswith(noise)]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    code = cli.main(["train", "--data", "synthetic", "--fusion", "deq", "--fusion-options", '{"max_iter": 40}',
                     "--epochs", "1", "--out", str(out), "--quiet"])
    assert code == 0
    return out


def test_train_writes_model_history_metrics_and_plots(trained_run):
    files = set(os.listdir(trained_run))
    assert {"model.keras", "history.json", "metrics.json", "training_curves.png", "solver_residuals.png"} <= files
    history = json.loads((trained_run / "history.json").read_text())
    assert len(history["loss"]) == 1 and "val_loss" in history and "deq_steps" in history
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert 0 <= metrics["accuracy"] <= 1 and metrics["fusion"] == "deq" and metrics["epochs_run"] == 1
    # --fusion-options reaches the layer: in the recorded settings and the saved model's config.
    assert metrics["settings"]["fusion_options"] == {"max_iter": 40}
    with zipfile.ZipFile(trained_run / "model.keras") as archive:
        layers = json.loads(archive.read("config.json"))["config"]["layers"]
    assert [layer["config"]["max_iter"] for layer in layers if layer["class_name"] == "DEQFusion"] == [40]
    trace = next(iter(metrics["solver_residual_trace"].values()))
    assert len(trace) >= 2 and trace[-1] < trace[0]
    for png in ("training_curves.png", "solver_residuals.png"):
        assert (trained_run / png).read_bytes()[:4] == b"\x89PNG"


def test_evaluate_reloads_the_model(trained_run, capsys):
    assert cli.main(["evaluate", "--model", str(trained_run / "model.keras"), "--data", "synthetic", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((trained_run / "metrics.json").read_text())
    assert printed["samples"] == 1000
    assert printed["accuracy"] == pytest.approx(saved["accuracy"], abs=1e-6)


def test_export_subcommand_writes_a_tflite_file(trained_run, capsys):
    out = trained_run / "model.tflite"
    out.write_bytes(b"an earlier file")
    args = ["export", "--model", str(trained_run / "model.keras"), "--format", "tflite", "--out", str(out)]
    # An existing output is refused before any conversion, then replaced with --overwrite.
    assert cli.main(args) == 2
    assert f"{out} exists; pass overwrite=True (mmfusion export --overwrite)" in capsys.readouterr().err
    assert out.read_bytes() == b"an earlier file"
    assert cli.main(args + ["--overwrite"]) == 0
    printed = capsys.readouterr().out
    assert "WHILE" in printed and out.stat().st_size > 1000
    # int8 calibrates on the data it is given, never on a stand-in.
    assert cli.main(args + ["--quantize", "int8"]) == 2
    assert "--quantize int8 needs calibration data: pass --data" in capsys.readouterr().err


def test_export_verifies_the_artefact_on_the_recorded_data(trained_run, capsys, monkeypatch):
    # The data comes from the metrics.json that 'train' wrote next to the model.
    args = ["export", "--model", str(trained_run / "model.keras"), "--format", "onnx", "--diagnostics",
            "--out", str(trained_run / "verified.onnx")]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "verified on 256 test samples of synthetic: max abs difference" in printed
    steps = re.search(r"deq_fusion: (\d+) solver steps, Keras (\d+)", printed)
    # A sample whose residual lands within float rounding of the tolerance may converge one
    # step apart in ONNX Runtime; the command allows that one step and no more.
    assert steps and abs(int(steps.group(1)) - int(steps.group(2))) <= 1, printed
    # Outside its tolerances, the command fails and says why: here an output difference and
    # a solve two steps longer than Keras's.
    from keras_mmfusion import export

    run_export = export.run_export

    def two_steps_more(path, feed):
        got = run_export(path, feed)
        return dict(got, deq_fusion_steps=got["deq_fusion_steps"] + 2)

    monkeypatch.setattr(export, "run_export", two_steps_more)
    monkeypatch.setitem(cli.EXPORT_TOLERANCES, None, {"max_abs": -1.0})
    assert cli.main(args + ["--overwrite"]) == 1
    err = capsys.readouterr().err
    assert "verification failed: max_abs" in err
    steps = re.search(r"deq_fusion took (\d+) solver steps, Keras (\d+)", err)
    assert steps and int(steps.group(1)) - int(steps.group(2)) >= 2, err


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--fusion", "magic"], "invalid choice: 'magic'"),
        (["train", "--data", "/nonexistent/folder"], "/nonexistent/folder: data folder not found"),
        (["evaluate", "--model", "/nonexistent/model.keras"], "model file not found: /nonexistent/model.keras"),
    ],
)
def test_errors_are_one_line_with_nonzero_exit(args, message):
    done = run_cli(*args)
    assert done.returncode == 2
    lines = own_lines(done.stderr)
    assert len(lines) == 1 and lines[0].startswith("mmfusion") and message in lines[0], done.stderr
    assert "Traceback" not in done.stderr


def test_modality_heads_train_but_are_not_saved(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--data", "synthetic", "--fusion", "concat", "--epochs", "2", "--modality-weight", "0.5"]
    assert cli.main([*args, "--out", str(out), "--quiet"]) == 0
    history = json.loads((out / "history.json").read_text())
    for prefix in ("", "val_"):
        assert len(history[f"{prefix}total_loss"]) == 2 and f"{prefix}modality_2_loss" in history
    model = keras.saving.load_model(out / "model.keras")
    assert len(model.outputs) == 1 and not [l for l in model.layers if l.name.startswith("modality_head")]


def test_negative_modality_weight_is_one_line():
    done = run_cli("train", "--fusion", "concat", "--modality-weight", "-1", "--epochs", "1")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    lines = own_lines(done.stderr)
    assert len(lines) == 1 and "--modality-weight must be >= 0, got -1.0" in lines[0], done.stderr


def test_unreadable_model_file_is_one_line(tmp_path):
    bad = tmp_path / "broken.keras"
    bad.write_bytes(b"not a zip file")
    done = run_cli("evaluate", "--model", str(bad))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = own_lines(done.stderr)
    assert len(lines) == 1 and f"mmfusion: error: {bad} is not a valid .keras archive" in lines[0], done.stderr


def test_help_lists_every_subcommand_and_option():
    done = run_cli("--help")
    assert all(c in done.stdout for c in ("train", "evaluate", "export", "bench"))
    train_help = run_cli("train", "--help").stdout
    for option in ("--data", "--fusion", "--epochs", "--seed", "--jit", "--no-standardize", "--modality-weight",
                   "--out", "dynmm", "lowrank"):
        assert option in train_help


# Each argument error, and the message that names it.
ARGUMENT_ERRORS = [
    (["train", "--fusion", "nope"], "argument --fusion: invalid choice: 'nope'"),
    (["train", "--data", "/nonexistent/folder"], "/nonexistent/folder: data folder not found"),
    (["train", "--seeds", "0"], "--seeds must be at least 1, got 0"),
    (["train", "--fusion-options", "{max_iter: 40}"], "--fusion-options is not valid JSON"),
    (["train", "--fusion-options", "[40]"], "--fusion-options must be a JSON object of keyword arguments, got [40]"),
    (["train", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["train", "--patience", "-1"], "--patience must be >= 0 (0: no early stopping), got -1"),
    (["train", "--lr", "0"], "--lr must be > 0, got 0.0"),
    (["train", "--dropout", "1"], "--dropout must be in [0, 1), got 1.0"),
    (["train", "--modality-dropout", "-0.1"], "--modality-dropout must be in [0, 1), got -0.1"),
    (["train", "--test-fraction", "1"], "--test-fraction must be in (0, 1), got 1.0"),
    (["train", "--data", "/nonexistent/views.mat"], "/nonexistent/views.mat: file not found"),
    (["evaluate", "--model", "/nonexistent/model.keras"], "model file not found: /nonexistent/model.keras"),
    (["export", "--model", "/nonexistent/model.keras", "--format", "onnx"],
     "model file not found: /nonexistent/model.keras"),
]


def test_help_and_argument_errors_answer_without_importing_tensorflow(tmp_path):
    bad = tmp_path / "broken.keras"
    bad.write_bytes(b"not a zip file")
    errors = ARGUMENT_ERRORS + [(["export", "--model", str(bad), "--format", "tflite", "--data", "synthetic"],
                                 f"{bad} is not a valid .keras archive")]
    argvs = [["--help"], ["train", "--help"], ["export", "--help"]] + [argv for argv, _ in errors]
    code = ("import sys\n"
            "import keras_mmfusion_cli as cli\n"
            f"for argv in {argvs!r}:\n"
            "    try:\n"
            "        code = cli.main(argv)\n"
            "    except SystemExit as stop:\n"
            "        code = stop.code\n"
            "    print('exit', code, file=sys.stderr)\n"
            "print('imported', sorted(m for m in ('tensorflow', 'keras', 'keras_mmfusion') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.splitlines()[-1] == "imported []", done.stderr
    lines = done.stderr.splitlines()
    assert lines.count("exit 0") == 3 and lines[-1] == "exit 2", done.stderr
    # After the helps, each error is one line, then its exit status.
    pairs = lines[-2 * len(errors):]
    for (argv, message), line, status in zip(errors, pairs[::2], pairs[1::2]):
        assert line.startswith("mmfusion") and message in line and status == "exit 2", (argv, line, status)


def test_the_recipe_file_lists_every_fusion_method():
    from keras_mmfusion.models import fusion_names

    assert cli._recipe()["fusions"] == fusion_names()


def test_generic_folder_is_accepted(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        np.save(tmp_path / f"{name}.npy", rng.normal(size=(40, 3)).astype("float32"))
    np.save(tmp_path / "labels.npy", (np.arange(40) % 2).astype("float32"))
    from keras_mmfusion.training import load_splits

    splits = load_splits(str(tmp_path))
    assert splits.widths == [3, 3] and len(splits.train[1]) == 32 and len(splits.test[1]) == 8


def test_train_help_shows_a_plain_percent_sign(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"])
    assert exit_info.value.code == 0
    description = " ".join(capsys.readouterr().out.split())
    assert "20% of the training split" in description and "%%" not in description


@pytest.mark.parametrize("content", [b"", b"not a zip archive", b"PK\x03\x04truncated"])
def test_a_file_that_is_not_a_keras_archive_is_named(content, tmp_path, capsys):
    path = tmp_path / "model.keras"
    path.write_bytes(content)
    for command in (["evaluate", "--model", str(path)], ["export", "--model", str(path), "--format", "onnx"]):
        assert cli.main(command) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert lines == [f"mmfusion: error: {path} is not a valid .keras archive (a .keras file is a zip archive "
                         "written by model.save)"], lines


def test_evaluate_reads_the_data_recorded_with_the_model(trained_run, tmp_path, capsys):
    assert cli.main(["evaluate", "--model", str(trained_run / "model.keras"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((trained_run / "metrics.json").read_text())
    assert saved["data_source"] == "synthetic" and printed["accuracy"] == pytest.approx(saved["accuracy"], abs=1e-6)
    alone = tmp_path / "model.keras"
    alone.write_bytes((trained_run / "model.keras").read_bytes())
    assert cli.main(["evaluate", "--model", str(alone)]) == 2
    assert "pass --data: the data to evaluate on" in capsys.readouterr().err


def test_train_with_several_seeds_and_refit_reports_mean_and_spread(tmp_path, capsys):
    out = tmp_path / "runs"
    args = ["train", "--data", "synthetic", "--fusion", "concat", "--epochs", "2", "--seeds", "2", "--seed", "3",
            "--refit", "--out", str(out), "--quiet"]
    assert cli.main(args) == 0
    runs = [json.loads((out / f"seed_{s}" / "metrics.json").read_text()) for s in (3, 4)]
    assert [r["seed"] for r in runs] == [3, 4] and all(r["settings"]["refit"] for r in runs)
    assert all((out / f"seed_{s}" / "model.keras").is_file() for s in (3, 4))
    summary = json.loads((out / "summary.json").read_text())
    for key in ("accuracy", "f1_binary", "auc"):
        values = [r[key] for r in runs]
        assert summary["summary"][key] == pytest.approx([np.mean(values), np.std(values)])
    printed = capsys.readouterr().out
    assert "test split, 2 seeds (refit on all training data), mean +- std" in printed
    assert f"accuracy   {np.mean([r['accuracy'] for r in runs]):.4f} +- " in printed


def test_train_defaults_are_the_readme_recipe():
    from keras_mmfusion.training import RECIPE

    from keras_mmfusion.training import units_for

    args = cli.build_parser().parse_args(["train"])
    # The width comes from the data; for ROSMAP's two classes and 200-wide views, the recipe's.
    assert args.units is None and units_for(2, [200, 200, 200]) == RECIPE.units
    chosen = dict(dropout=args.dropout, modality_weight=args.modality_weight, lr=args.lr,
                  batch_size=args.batch_size, epochs=args.epochs, patience=args.patience,
                  standardize=not args.no_standardize)
    assert chosen == {k: getattr(RECIPE, k) for k in chosen}
    assert (RECIPE.dropout, RECIPE.modality_weight, RECIPE.epochs, RECIPE.patience) == (0.5, 1.0, 200, 30)
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    assert (f"uses the same encoder width ({RECIPE.units}), dropout 0.5, Adam 1e-3, batch 32, at most 200 "
            "epochs and\npatience 30") in readme
    assert "each view's encoder as well (`modality_weight=1`)" in readme


def test_header_rows_are_refused_without_header_and_skipped_with_it_also_when_evaluating(tmp_path, capsys):
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    labels = np.arange(60) % 2
    for name in ("a", "b"):
        rows = rng.normal(size=(60, 3)).round(4) + labels[:, None]
        (data / f"{name}.csv").write_text("x,y,z\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n")
    (data / "labels.csv").write_text("label\n" + "\n".join(map(str, labels)) + "\n")
    out = tmp_path / "run"
    train = ["train", "--data", str(data), "--fusion", "concat", "--epochs", "1", "--out", str(out), "--quiet"]
    assert cli.main(train) == 2
    assert "a.csv: row 1, column 1: cannot read 'x' as a number. It looks like a header" in capsys.readouterr().err
    assert cli.main(train + ["--header"]) == 0
    captured = capsys.readouterr()
    assert "skipped the header row of every CSV file (--header)" in captured.err
    assert ("2 modalities of widths [3, 3], 48 train / 12 test samples (test split: 0.2 of each class, --split-seed 0),"
            " 2 classes") in captured.out
    assert json.loads((out / "metrics.json").read_text())["data_header"] is True
    assert cli.main(["evaluate", "--model", str(out / "model.keras"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 12


def test_modality_dropout_trains_a_masked_model_that_evaluates_and_exports(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--data", "synthetic", "--fusion", "dmf", "--epochs", "2", "--modality-dropout", "0.3"]
    assert cli.main([*args, "--out", str(out), "--quiet"]) == 0
    model = keras.saving.load_model(out / "model.keras")
    assert model.inputs[-1].name == "modality_mask" and model.get_layer("modality_dropout").rate == 0.3
    assert json.loads((out / "metrics.json").read_text())["settings"]["modality_dropout"] == 0.3
    capsys.readouterr()
    assert cli.main(["evaluate", "--model", str(out / "model.keras"), "--json"]) == 0
    assert 0.0 <= json.loads(capsys.readouterr().out)["accuracy"] <= 1.0
    assert cli.main(["export", "--model", str(out / "model.keras"), "--format", "onnx"]) == 0
    assert "verified on" in capsys.readouterr().out
    assert cli.main([*args[:-1], "1.5", "--out", str(tmp_path / "bad")]) == 2
    assert "--modality-dropout must be in [0, 1), got 1.5" in capsys.readouterr().err


def test_an_unknown_fusion_option_is_named_in_one_line(tmp_path, capsys):
    argv = ["train", "--fusion", "deq", "--fusion-options", '{"max_iters": 40}', "--epochs", "1", "--out", str(tmp_path)]
    assert cli.main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == ["mmfusion: error: Unrecognized keyword arguments passed to DEQFusion: {'max_iters': 40}"], lines

