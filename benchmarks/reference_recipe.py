"""The reference classifier trained with the DEQ-fusion paper's ROSMAP recipe, in Keras.

The official PyTorch code of Ni et al. (arXiv 2306.16645) trains its classifier
(``keras_mmfusion.models.build_reference_classifier``) on all 245 training patients:
min-max scaled views, width 300, dropout 0.5, full-batch Adam at 1e-4 with coupled weight
decay 1e-4, the rate times 0.2 after epoch 500, the global gradient norm clipped at 30,
1001 epochs, and DEQ fusion with 4 GroupNorm groups, Jacobian weight 20 and 30/31 solver
evaluations. The test split is scored once, after the last epoch.

The recipe is ``keras_mmfusion.training.REFERENCE_RECIPE``, which trains on that code's
loss with that code's optimiser step and initial draws: ``benchmarks/training_parity.py``
compares, from the same weights, the two codes' steps (every loss term within 2e-8
through step 50 in float64, with dropout off and with the same dropout masks on both
sides; later the two drift apart as runs from weights 1e-12 apart do). It includes the
details that decide whether the recipe works: the loss's per-view weights (3.375 x
cross-entropy, 2.25/1.5/1 x the views' gate and confidence losses), PyTorch's coupled
weight decay added after clipping and its epsilon placement (``CoupledDecayAdam``), the
plain-sum fused injection, and the DEQ reference code's Anderson solves
(``"reference_anderson"``: whole-batch residuals, an adjoint solve from zero, ``f(z*)``
as the training output), whose results the recipe trains on although they do not
converge.

    MMFUSION_ROSMAP=/path/to/rosmap python benchmarks/reference_recipe.py [--seeds 5] [--jobs N]
        [--peer-code DIR [--peer-python PYTHON] [--peer-jobs N] [--official-start]] [--trajectory]
        [--save DIR] [--out DIR] [--record]

It prints a table (accuracy, F1, AUC per seed; mean +- std; the fractions of training
samples whose forward and adjoint solves met their tolerance over the last 10 epochs) and
writes ``results/reference_recipe.json``. With ``--peer-code`` (the official code's
``experiments/BRCA`` folder, see ``official_rosmap.py``) it also runs the official code
itself on the same seeds (``torch.manual_seed(seed)``), scores its last-epoch test
probabilities with the same scorer, and prints both; ``--peer-jobs N`` runs N official
seeds at a time, each in a process of its own (``--peer-threads`` PyTorch threads each).
``--jobs N`` trains N seeds at a time, each in a process of its own with one TensorFlow
thread (small full-batch steps use a second core poorly, so on a 2-core machine two such
processes finish five seeds sooner than one process with two threads). With
``--official-start`` the official code only draws each seed's initial weights (those its
own run of the seed starts from) and every Keras run starts from them
(``training_parity.official_weights_into``); the official code is not trained. The two
codes' runs of a seed then differ only in their training: dropout masks, Jacobian probes
and rounding. With ``--trajectory`` both codes' runs also score the test split after every
50th epoch, where the official ``train()`` scores it, and the script prints each run's
accuracy there: whether a last-epoch score is a lasting state of the run or a passing one
(a diagnostic; the recipe's score is still the last epoch's). This is the paper's fixed
recipe scored at its last epoch, not the package's protocol with validation selection
(``examples/rosmap.py``).
"""

import argparse
import json
import os
import sys
import tempfile
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_mmfusion.training import (  # noqa: E402
    REFERENCE_RECIPE, build_model, classification_metrics, converged_last_10, fit_classifier, fit_options, in_processes,
    load_splits, summarise,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import machine, rosmap_available  # noqa: E402
import official_rosmap  # noqa: E402
import report  # noqa: E402
import training_parity  # noqa: E402

# The official train() scores the test split after every 50th epoch, from the first.
TEST_INTERVAL = 50


class TestCalls(keras.callbacks.Callback):
    """The test probabilities after every ``TEST_INTERVAL``-th epoch (0-based ``epoch %
    TEST_INTERVAL == 0``), where the official ``train()`` calls its ``test_epoch``. Inference
    draws no random numbers, so the training run is the same with and without it."""

    def __init__(self, model, inputs):
        super().__init__()
        self.scored, self.inputs, self.probabilities = model, inputs, []

    def on_epoch_end(self, epoch, logs=None):
        if epoch % TEST_INTERVAL == 0:
            self.probabilities.append(self.scored.predict(self.inputs, batch_size=256, verbose=0).tolist())


def train_once(splits, seed, epochs, initial=None, trajectory=False, save=None):
    """One model trained with the recipe on all training patients, from the weights in the
    npz file ``initial`` (an official ``state_dict``) when given, and saved to ``save``
    (``.keras``) when given; its test metrics, with the converged fractions of its last 10
    epochs' solves (and with ``trajectory`` the test probabilities of every ``TestCalls``
    epoch as ``test_probabilities``), and its training time."""
    keras.utils.set_random_seed(seed)
    settings = REFERENCE_RECIPE
    # Min-max scaled with all training patients, as the official code scales the views.
    model = build_model("reference", splits, settings)
    if initial:
        training_parity.official_weights_into(model, np.load(initial))
    calls = [TestCalls(model, splits.test[0])] if trajectory else []
    started = time.time()
    history, _ = fit_classifier(model, splits.train, epochs, callbacks=calls,
                                **dict(fit_options(settings), batch_size=len(splits.train[1])))
    seconds = time.time() - started
    probabilities = model.predict(splits.test[0], batch_size=256, verbose=0)
    metrics = {**classification_metrics(splits.test[1], probabilities), **converged_last_10(history)}
    if save:
        model.save(save)
    if trajectory:
        metrics["test_probabilities"] = calls[0].probabilities
    return metrics, seconds


def train_seed(seed, epochs, initial=None, trajectory=False, save=None):
    """``train_once`` for one seed, in a worker process: the row of the table."""
    metrics, seconds = train_once(load_splits("rosmap"), seed, epochs, initial, trajectory, save)
    print(f"seed {seed}: accuracy {metrics['accuracy']:.3f} in {seconds:.0f} s", file=sys.stderr, flush=True)
    return {**metrics, "seed": seed, "seconds": seconds}


def train_seeds(seeds, epochs, jobs, initial, trajectory=False, save=None):
    """The rows of ``seeds``, trained ``jobs`` at a time in fresh processes of one thread each;
    ``initial`` maps a seed to its initial weights' npz file, or is empty; with ``save`` (a
    folder) each model is saved there as ``seed<seed>.keras``."""
    done = dict(in_processes(train_seed, [(seed, epochs, initial.get(seed), trajectory, saved_as(save, seed))
                                          for seed in seeds], jobs))
    return [done[i] for i in range(len(seeds))]


def saved_as(folder, seed):
    """Where ``--save`` keeps the model of ``seed``, or None without it."""
    return os.path.join(folder, f"seed{seed}.keras") if folder else None


def official_config():
    """The official code's solver budgets and Jacobian weight, from the recipe."""
    fusion = REFERENCE_RECIPE.fusion_options
    return {"f_thres": fusion["max_iter"], "b_thres": fusion["backward"]["config"]["max_iter"],
            "jacobian_weight": fusion["jacobian_weight"]}


def print_runs(name, runs, keys):
    print(f"{name}")
    print(f"{'seed':>4}  {'ACC':>6}  {'F1':>6}  {'AUC':>6}  {'train s':>8}  {'fwd conv':>8}  {'adj conv':>8}")
    for run in runs:
        converged = "".join(f"  {run.get(k, float('nan')):8.3f}"
                            for k in ("converged_last_10", "backward_converged_last_10"))
        print(f"{run['seed']:>4}  " + "  ".join(f"{100 * run[k]:6.1f}" for k in keys) + f"  {run['seconds']:8.0f}"
              + converged, flush=True)
    summary = summarise(runs, keys)
    print("mean  " + "  ".join(f"{100 * summary[k][0]:4.1f}+-{100 * summary[k][1]:.1f}" for k in keys))
    return summary


def print_trajectory(name, runs, labels):
    """Each run's test accuracy at every ``TestCalls`` epoch, and over the calls after the
    rate's step (epochs 550-1000): the mean accuracy, the share of calls at which one class
    takes at least 90% of the predictions, and the mean change between successive calls."""
    epochs = [TEST_INTERVAL * i for i in range(len(runs[0]["test_probabilities"]))]
    # (runs, calls, patients): the class each call predicts for each test patient.
    predicted = np.array([[np.argmax(p, -1) for p in run["test_probabilities"]] for run in runs])
    accuracy = np.mean(predicted == labels, axis=-1)
    share_of_class_1 = np.mean(predicted, axis=-1)
    one_class = np.maximum(share_of_class_1, 1 - share_of_class_1) >= 0.9
    print(f"{name}, test accuracy after the epochs at which the official train() tests (* one class >= 90%):")
    print("epoch  " + "  ".join(f"{'seed ' + str(run['seed']):>8}" for run in runs))
    for j, epoch in enumerate(epochs):
        print(f"{epoch:>5}  " + "  ".join(f"{100 * accuracy[i, j]:7.1f}{'*' if one_class[i, j] else ' '}"
                                          for i in range(len(runs))))
    # The calls after the rate's step, or every call of a run too short to reach it.
    late = [j for j, epoch in enumerate(epochs) if epoch > 500] or list(range(len(epochs)))
    summary = {"epochs": [epochs[j] for j in late],
               "mean_accuracy": float(np.mean(accuracy[:, late])),
               "one_class_share": float(np.mean(one_class[:, late])),
               # None for a single call (--epochs 50 or fewer): no change to measure.
               "mean_change": float(np.mean(np.abs(np.diff(accuracy[:, late], axis=1)))) if len(late) > 1 else None}
    change = "none to measure" if summary["mean_change"] is None else f"{100 * summary['mean_change']:.1f} points"
    print(f"epochs {epochs[late[0]]}-{epochs[late[-1]]}: mean accuracy {100 * summary['mean_accuracy']:.1f}, "
          f"one class at {100 * summary['one_class_share']:.0f}% of the calls, mean change between calls {change}")
    return summary


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    report.add_option(parser)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=1001)
    parser.add_argument("--jobs", type=int, default=1, help="seeds trained at a time, one thread each (default 1: "
                        "one after another in this process)")
    parser.add_argument("--peer-code", default=None, help="the official code's experiments/BRCA folder")
    parser.add_argument("--peer-python", default=official_rosmap.DEFAULT_PEER_PYTHON,
                        help="a Python with PyTorch for the official code (default: $MMFUSION_PEER_PYTHON)")
    parser.add_argument("--peer-threads", type=int, default=1, help="PyTorch threads of each official run")
    parser.add_argument("--peer-jobs", type=int, default=1,
                        help="official seeds run at a time, each in its own process (default 1: one after another)")
    parser.add_argument("--official-start", action="store_true",
                        help="start every Keras run from the official code's initial weights for its seed "
                             "(drawn with --peer-code, which then trains nothing)")
    parser.add_argument("--trajectory", action="store_true",
                        help=f"also score the test split after every {TEST_INTERVAL}th epoch, as the official train() "
                             "does, and print each run's trajectory (a diagnostic: nothing is selected on it)")
    parser.add_argument("--save", default=None, metavar="DIR",
                        help="save each seed's trained model as DIR/seed<seed>.keras (for training_parity.py "
                             "--evaluate)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    if not rosmap_available():
        sys.exit("ROSMAP is needed: set MMFUSION_ROSMAP to a folder in MOGONET's layout.")
    if args.peer_jobs < 1:
        parser.error(f"--peer-jobs must be at least 1, got {args.peer_jobs}")
    if args.official_start and not args.peer_code:
        parser.error("--official-start draws the weights with the official code: give --peer-code")
    if args.save:
        os.makedirs(args.save, exist_ok=True)
    if args.peer_code:
        official_rosmap.check_peer(args.peer_python, args.peer_code)
    splits = load_splits("rosmap")
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    keys = ("accuracy", "f1_binary", "auc")
    official = []
    initial = {}
    scratch = tempfile.TemporaryDirectory()
    if args.official_start:
        official_rosmap.run_official(
            args.peer_python, args.peer_code, os.environ["MMFUSION_ROSMAP"], "initial", args.peer_threads,
            seeds=seeds, weights=scratch.name, **official_config())
        initial = {seed: os.path.join(scratch.name, f"seed{seed}.npz") for seed in seeds}
    elif args.peer_code:
        # The official runs go on in their subprocesses while the Keras runs train here:
        # --peer-jobs subprocesses, each running its share of the seeds one after another.
        def run_share(share):
            official.append(official_rosmap.run_official(
                args.peer_python, args.peer_code, os.environ["MMFUSION_ROSMAP"], "recipe", args.peer_threads,
                seeds=share, **official_config()))

        shares = [seeds[i::args.peer_jobs] for i in range(min(args.peer_jobs, len(seeds)))]
        peers = [threading.Thread(target=run_share, args=(share,)) for share in shares]
        for peer in peers:
            peer.start()
    if args.jobs > 1:
        runs = train_seeds(seeds, args.epochs, args.jobs, initial, args.trajectory, args.save)
    else:
        runs = []
        for seed in seeds:
            metrics, seconds = train_once(splits, seed, args.epochs, initial.get(seed), args.trajectory,
                                          saved_as(args.save, seed))
            runs.append({**metrics, "seed": seed, "seconds": seconds})
            print(f"seed {seed}: accuracy {metrics['accuracy']:.3f} in {seconds:.0f} s", file=sys.stderr, flush=True)
    scratch.cleanup()
    start = ", from the official code's initial weights of each seed" if args.official_start else ""
    summary = print_runs(f"keras_mmfusion, REFERENCE_RECIPE{start}:", runs, keys)
    result = {"runs": runs, "summary": summary, "epochs": args.epochs, "jobs": args.jobs,
              "official_start": args.official_start, "machine": machine()}
    if args.trajectory:
        result["trajectory"] = print_trajectory("keras_mmfusion", runs, splits.test[1])
    if args.peer_code and not args.official_start:
        for peer in peers:
            peer.join()
        if len(official) < len(peers):
            sys.exit("The official code's runs did not finish; see above.")
        finished = sorted((run for share in official for run in share["runs"]), key=lambda run: run["seed"])
        official = {**official[0], "runs": finished}
        peer_runs = [{**classification_metrics(splits.test[1], np.asarray(run["probabilities"])), "seed": run["seed"],
                      "seconds": run["seconds"], "test_probabilities": run["test_probabilities"]}
                     for run in official["runs"]]
        result["official"] = {"runs": peer_runs, "summary": print_runs(
            f"official code (PyTorch {official['torch']}, {official['threads']} threads), last epoch:", peer_runs,
            keys)}
        if args.trajectory:
            result["official"]["trajectory"] = print_trajectory("official code", peer_runs, splits.test[1])
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "reference_recipe.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    report.run(main, "reference_recipe")
