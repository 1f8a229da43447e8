"""ROSMAP (Alzheimer's disease vs control, 3 omics views): an honest comparison.

    python examples/rosmap.py [--seeds 5] [--methods deq reference reference_narrow dmf concat single]
                              [--out runs/rosmap] [--progress-every 100] [--jobs 1]

Also reachable as ``mmfusion train --data rosmap`` for a single model.

Protocol, for every seed: 20% of the training split (stratified) is held out for
validation; every feature is standardised with the mean and variance of the remaining
80%; training stops early on the validation loss and keeps the best epoch; the test split
is evaluated once. Fusion models train with a softmax head on every modality's encoder as
well (``modality_weight=1``); only the fused output is evaluated. With ``--refit``, the
validation split only chooses the number of epochs, and a fresh model trained for that
many epochs on the whole training split (standardised with all of it) is the one tested.
Methods: DEQFusion in the standard classifier, DenseFusion, concat fusion and the best
single omics view (chosen by mean validation loss, not by test score), all with
``RECIPE``; and the reference classifier of the DEQ-fusion paper
(``build_reference_classifier``: feature gates, confidence heads, DEQ fusion) with that
paper's ROSMAP recipe, ``REFERENCE_RECIPE``: inputs min-max scaled with the training
part, width 300, full-batch Adam 1e-4 with coupled weight decay, x0.2 after epoch 500,
clipped gradients, all 1000 epochs run and the epoch of lowest validation loss kept;
``reference_narrow`` is the same with a 64-wide DEQ state and 60 solver steps,
``REFERENCE_NARROW_RECIPE``. For every DEQ method the script also prints the fraction of
training samples whose solve converged over the last 10 epochs of each seed's run, and
the same of the adjoint solves of their gradients.
While it runs, it prints a line every 100 epochs of each run (``--progress-every``) and
one when a run ends, with its kept epoch, its validation loss and its test scores.
``--jobs N`` trains N runs at a time, each in a fresh process of one TensorFlow thread: the
models are small, so one process per core finishes sooner than one process on all cores.
The data are MOGONET's preprocessed release (Wang et al., Nature Communications 2021),
read from ``$MMFUSION_ROSMAP`` or downloaded once into the Keras cache (see
``keras_mmfusion.datasets.mogonet_folder``).
"""

import argparse
import json
import os
import sys

from keras_mmfusion_cli import quiet_tensorflow_import  # noqa: E402

# TensorFlow's C++ start-up lines are hidden unless --verbose is given.
quiet_tensorflow_import(verbose="--verbose" in sys.argv)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_mmfusion.training import (  # noqa: E402
    RECIPE, REFERENCE_NARROW_RECIPE, REFERENCE_RECIPE, Settings, converged_keys, in_processes, load_splits, run_trial,
    select_views, summarise,
)

PUBLISHED = {"MOGONET (published)": {"accuracy": 0.815, "f1_binary": 0.821, "auc": 0.874}}
# Chosen on the validation splits of the 5 seeds (mean validation loss at the kept epoch),
# never on test. Every feature is standardised with the statistics of the training part
# (the views are min-max scaled with per-feature spreads of only 0.03-0.05, which left
# the encoders' inputs dominated by their offsets); standardised inputs overfit within
# 5-10 epochs, and dropout 0.5 gave the lowest validation loss of the settings tried.
# A softmax head on every modality's encoder, trained alongside the fusion with weight 1,
# lowered concat fusion's mean validation loss at width 32 from 0.537 to 0.470 and left
# DEQ fusion's level (0.580 without, 0.577 with), so every fusion method trains with one.
# The width (of the encoders, the fusion layer and the head's hidden layer) is the one of
# 4, 8, 16 and 32 with the lowest validation loss averaged over DEQ fusion, DenseFusion and
# concat fusion: 8 (0.492, against 0.527 for 16 and 0.554 for 32; see benchmarks/RESULTS.md).
SETTINGS = RECIPE


def progress(name, seed, seeds, epochs, every):
    """A callback that prints a line every ``every`` epochs of one run: the training and
    validation losses and, for a DEQ model, the fraction of training samples whose solve
    converged in that epoch, and of those whose adjoint solve did. The reference classifier runs 1000 full-batch epochs, several
    minutes a seed, and the lines show how far it is."""

    def report(epoch, logs):
        if every <= 0 or (epoch + 1) % every:
            return
        converged = [logs[k] for k in converged_keys(logs)]
        solves = f", training solves converged {converged[0]:.3f}" if converged else ""
        adjoint = [logs[k] for k in converged_keys(logs, backward=True)]
        solves += f", adjoint solves {adjoint[0]:.3f}" if adjoint else ""
        print(f"  {name}, seed {seed + 1} of {seeds}: epoch {epoch + 1} of {epochs}, loss {logs['loss']:.4f}, "
              f"validation loss {logs['val_loss']:.4f}{solves}", flush=True)

    return keras.callbacks.LambdaCallback(on_epoch_end=report)


def seed_line(name, seed, seeds, metrics):
    """One line per finished run: the kept epoch, its validation loss and the test scores."""
    return (f"{name}, seed {seed + 1} of {seeds}: kept epoch {metrics['best_epoch']} of {metrics['epochs_run']} "
            f"(validation loss {metrics['best_validation']:.4f}), test accuracy {100 * metrics['accuracy']:.1f}, "
            f"AUC {100 * metrics['auc']:.1f}; {metrics['epoch_seconds']:.2f} s an epoch")


def trial(name, model, data, seed, seeds, settings, every):
    """One seed of one method under the protocol: its metrics, with a line when it ends."""
    watch = progress(name, seed, seeds, settings.epochs, every)
    metrics = run_trial(data, model, seed, settings, callbacks=[watch])[2]
    print(seed_line(name, seed, seeds, metrics), flush=True)
    return metrics


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", action="store_true", help="also show TensorFlow's C++ log lines")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"the most epochs (default: {SETTINGS.epochs}; the reference classifier "
                             f"{REFERENCE_RECIPE.epochs})")
    parser.add_argument("--refit", action="store_true",
                        help="retrain on the whole training split for the epochs chosen on validation")
    methods = ["deq", "reference", "reference_narrow", "dmf", "concat", "single"]
    parser.add_argument("--methods", nargs="+", choices=methods, default=methods,
                        help="methods to run ('single': the best single view); default: all")
    parser.add_argument("--out", default="runs/rosmap")
    parser.add_argument("--progress-every", type=int, default=100, metavar="N",
                        help="print a line every N epochs of each run (0: only when a run ends)")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="train N runs at a time, each in a fresh process of one TensorFlow thread "
                             "(the seeds and methods are independent; the results do not depend on N)")
    args = parser.parse_args()
    def settings_of(name):
        recipe = {"reference": REFERENCE_RECIPE, "reference_narrow": REFERENCE_NARROW_RECIPE}.get(name, SETTINGS)
        return Settings(**{**vars(recipe), "epochs": args.epochs or recipe.epochs, "refit": args.refit})

    def model_of(name):
        return "reference" if name.startswith("reference") else name

    splits = load_splits("rosmap")
    seeds = list(range(args.seeds))

    # The units of work: one seed of one method, and of each view for "single".
    tasks = [(name, model_of(name), splits) for name in args.methods if name != "single"]
    if "single" in args.methods:
        tasks += [(f"view {view + 1}", "single", select_views(splits, [view])) for view in range(len(splits.widths))]
    calls = [(name, model, data, seed, len(seeds), settings_of(name),
              args.progress_every) for name, model, data in tasks for seed in seeds]
    if args.jobs > 1:
        done = dict(in_processes(trial, calls, args.jobs))
    else:
        done = {i: trial(*call) for i, call in enumerate(calls)}
    runs_of = {name: [done[i] for i, call in enumerate(calls) if call[0] == name] for name, _, _ in tasks}

    results = {}
    for name in [m for m in args.methods if m != "single"]:
        results[name] = {"runs": runs_of[name], "summary": summarise(runs_of[name])}
    if "single" in args.methods:
        views = {view: runs_of[f"view {view + 1}"] for view in range(len(splits.widths))}
        best = min(views, key=lambda v: np.mean([r["best_validation"] for r in views[v]]))
        results[f"single view {best + 1}"] = {"runs": views[best], "summary": summarise(views[best]),
                                              "chosen_by": "lowest mean validation loss"}

    protocol = "retrained on the whole training split" if args.refit else "best validation epoch"
    print(f"\nROSMAP test split, {len(seeds)} seeds, mean +- std ({protocol})")
    print(f"{'method':<22} {'ACC':>15} {'F1':>15} {'AUC':>15} {'epochs':>7}")
    for name, entry in results.items():
        s = entry["summary"]
        epochs = np.mean([r["epochs_run"] for r in entry["runs"]])
        print(f"{name:<22} " + " ".join(f"{100 * s[k][0]:>7.1f} +- {100 * s[k][1]:4.1f}" for k in ("accuracy", "f1_binary", "auc"))
              + f" {epochs:>7.0f}")
    for name, values in PUBLISHED.items():
        print(f"{name:<22} " + " ".join(f"{100 * values[k]:>7.1f}        " for k in ("accuracy", "f1_binary", "auc")))
    for name, entry in results.items():
        if "converged_last_10" in entry["runs"][0]:
            mean = [r["converged_last_10"] for r in entry["runs"]]
            lowest = min(r["converged_last_10_lowest"] for r in entry["runs"])
            print(f"{name}: training solves converged over the last 10 epochs, per seed "
                  + ", ".join(f"{m:.3f}" for m in mean) + f"; lowest epoch {lowest:.3f}")
        if "backward_converged_last_10" in entry["runs"][0]:
            mean = [r["backward_converged_last_10"] for r in entry["runs"]]
            lowest = min(r["backward_converged_last_10_lowest"] for r in entry["runs"])
            print(f"{name}: adjoint solves converged over the last 10 epochs, per seed "
                  + ", ".join(f"{m:.3f}" for m in mean) + f"; lowest epoch {lowest:.3f}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"settings": {name: vars(settings_of(name)) for name in results}, "seeds": seeds,
                   "results": results}, f, indent=2)
    print(f"wrote {args.out}/results.json")


if __name__ == "__main__":
    main()
