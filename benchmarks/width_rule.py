"""The width rule of ``mmfusion train`` against the fixed width 8 it replaced.

``keras_mmfusion.training.units_for`` chooses the width of the standard classifier's
encoders, fusion and head from the number of classes and the views' widths. For each
dataset and fusion (concat and DEQ fusion), this script runs the protocol of
``mmfusion train`` (``training.RECIPE``: a stratified validation split of the training
data, early stopping, the test split scored once) at width 8 and at the rule's width,
and prints the test accuracy (mean +- std over the seeds). Where the rule gives 8, one
run serves both columns.

Datasets: the built-in synthetic data, ROSMAP (``$MMFUSION_ROSMAP``) and Scene15
(``$MMFUSION_SCENE15``, a folder in MOGONET's layout); a source checkout's
``../shared/data`` folders are found by themselves.

    python benchmarks/width_rule.py [--seeds 2] [--datasets synthetic rosmap scene15] [--record]
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from keras_mmfusion.training import RECIPE, Settings, load_splits, run_trial, units_for  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import machine, rosmap_available  # noqa: E402
import report  # noqa: E402

OLD_UNITS = 8
SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")


def data_spec(name):
    """The ``load_splits`` argument for ``name``, or ``None`` when its files are absent."""
    if name == "synthetic":
        return "synthetic"
    if name == "rosmap":
        return "rosmap" if rosmap_available() else None
    folder = os.environ.get("MMFUSION_SCENE15", os.path.join(SHARED, "scene15"))
    return folder if os.path.isdir(folder) else None


def accuracies(splits, fusion, units, seeds):
    settings = Settings(**{**vars(RECIPE), "units": units})
    with report.unrecorded():
        return [run_trial(splits, fusion, seed, settings)[2]["accuracy"] for seed in range(seeds)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    report.add_option(parser)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--datasets", nargs="+", default=["synthetic", "rosmap", "scene15"])
    parser.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                        "width_rule.json"))
    args = parser.parse_args()
    rows = []
    print(f"{'dataset':<10} {'classes':>7} {'views':>12} {'fusion':<7} {'width 8':>13} {'rule':>5} "
          f"{'rule width':>13} {'minutes':>7}")
    for name in args.datasets:
        spec = data_spec(name)
        if spec is None:
            print(f"{name}: files not found, skipped")
            continue
        splits = load_splits(spec)
        units = units_for(splits.num_classes, splits.widths)
        for fusion in ("concat", "deq"):
            started = time.time()
            old = accuracies(splits, fusion, OLD_UNITS, args.seeds)
            new = old if units == OLD_UNITS else accuracies(splits, fusion, units, args.seeds)
            cell = lambda values: f"{100 * np.mean(values):5.1f} +- {100 * np.std(values):4.1f}"  # noqa: E731
            widths = ",".join(map(str, splits.widths))
            print(f"{name:<10} {splits.num_classes:>7} {widths:>12} {fusion:<7} {cell(old):>13} {units:>5} "
                  f"{'(same run)' if units == OLD_UNITS else cell(new):>13} {(time.time() - started) / 60:7.1f}",
                  flush=True)
            rows.append({"dataset": name, "classes": splits.num_classes, "widths": splits.widths, "fusion": fusion,
                         "rule_units": units, "accuracy_width_8": old, "accuracy_rule": new})
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"seeds": args.seeds, "rows": rows, "machine": machine()}, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    report.run(main, "width_rule")
