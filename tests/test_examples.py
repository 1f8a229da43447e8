"""The examples run as a user would run them: the main job (quickstart) and the two-stage DynMM recipe."""

import json
import os
import subprocess
import sys

import keras
import numpy as np

import keras_mmfusion  # noqa: F401  (registers the layers for safe-mode loading)

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples")


def test_dynmm_two_stage_example_writes_a_model_that_reloads_to_its_reported_metrics(tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, "dynmm_two_stage.py"), "--epochs", "2", "--cost-weight", "0.3",
         "--out", str(tmp_path)],
        capture_output=True, text=True, env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert {"model.keras", "metrics.json"} <= set(os.listdir(tmp_path))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    cheap_macs, expensive_macs = metrics["costs_macs"]
    assert 0 < cheap_macs < expensive_macs

    sys.path.insert(0, EXAMPLES)
    try:
        import dynmm_two_stage as recipe
    finally:
        sys.path.remove(EXAMPLES)
    _, _, test = recipe.make_data(0)
    model = keras.saving.load_model(tmp_path / "model.keras", safe_mode=True)
    probabilities, route = recipe.predict_with_routing(model, model.get_layer("dynmm"), test[0])
    # Every test sample has its routing (the layer keeps only its last call's), and the
    # batched probabilities are predict's.
    assert route.shape == (len(test[1]),) and set(np.unique(route)) <= {0, 1}
    np.testing.assert_allclose(probabilities, model.predict(test[0], batch_size=256, verbose=0), atol=1e-6)
    # The reloaded model reproduces the accuracy and the routing the example reported.
    assert np.mean(probabilities.argmax(-1) == test[1]) == metrics["accuracy_routed"]
    assert np.mean(route == 0) == metrics["fraction_to_cheap"]
    relative = np.mean(np.where(route == 0, cheap_macs, expensive_macs)) / expensive_macs
    np.testing.assert_allclose(relative, metrics["realised_macs_relative_to_expensive_path"], rtol=1e-6)


def test_quickstart_trains_a_converged_model_and_exports_it_in_three_runtimes_that_match(tmp_path):
    # Run as a user runs it: no TF_CPP_MIN_LOG_LEVEL of their own.
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    done = subprocess.run([sys.executable, os.path.join(EXAMPLES, "quickstart.py"), "--epochs", "3", "--out",
                           str(tmp_path)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    # Neither TensorFlow's C++ start-up lines nor the SavedModel loader's custom-gradient
    # warnings reach the user.
    noise = ("absl", "I0000", "W0000", "E0000", "cuda", "oneDNN", "custom gradient")
    assert not [line for line in done.stderr.splitlines() if any(n in line for n in noise)], done.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] > 0.7, metrics["test"]  # chance is 0.5
    assert metrics["solver"]["converged"] and metrics["test"]["deq_converged"] == 1.0, metrics
    assert set(metrics["exports"]) == {"saved_model", "tflite", "onnx"}
    for name, check in metrics["exports"].items():
        assert check["max_rel"] < 1e-5, (name, check)
    # The saved model loads in safe mode, and the quickstart uses the layer's own defaults.
    model = keras.saving.load_model(tmp_path / "model.keras", safe_mode=True)
    config, defaults = model.get_layer("deq_fusion").get_config(), keras_mmfusion.DEQFusion().get_config()
    for key in ("solver", "max_iter", "tol", "jacobian_weight", "num_groups", "backward"):
        assert config[key] == defaults[key], key


def test_rosmap_example_reports_progress_during_and_after_each_run(capsys):
    import keras_mmfusion as mmf
    from keras_mmfusion.training import fit_classifier

    sys.path.insert(0, EXAMPLES)
    try:
        import rosmap
    finally:
        sys.path.remove(EXAMPLES)
    x, y = mmf.make_synthetic(96, num_modalities=2, widths=[5, 7], seed=0)
    model = mmf.models.build_classifier(mmf.DEQFusion(8), [5, 7], 2, encoder_units=8, head_units=8)
    train, val = ([a[:64] for a in x], y[:64]), ([a[64:] for a in x], y[64:])
    # Modality heads rename the logs (ClassifierLogs); the lines read the classifier's names.
    history, _ = fit_classifier(model, train, 4, val, modality_weight=1.0,
                                callbacks=[rosmap.progress("deq", 0, 5, 4, every=2)])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["  deq, seed 1 of 5"] * 2
    for line, epoch in zip(lines, (2, 4)):
        assert (f"epoch {epoch} of 4, loss {history['loss'][epoch - 1]:.4f}, validation loss "
                f"{history['val_loss'][epoch - 1]:.4f}, training solves converged "
                f"{history['deq_converged'][epoch - 1]:.3f}, adjoint solves "
                f"{history['deq_backward_converged'][epoch - 1]:.3f}") in line
    metrics = dict(best_epoch=3, epochs_run=4, best_validation=0.5, accuracy=0.8123, auc=0.9, epoch_seconds=0.25)
    assert rosmap.seed_line("deq", 1, 5, metrics) == (
        "deq, seed 2 of 5: kept epoch 3 of 4 (validation loss 0.5000), test accuracy 81.2, AUC 90.0; 0.25 s an epoch")
