"""How much accuracy does each fusion method keep when omics views are missing at test time?

On ROSMAP (3 omics views: mRNA, DNA methylation, miRNA), every method is trained by the
package's protocol (``keras_mmfusion.training.run_trial`` with the README's recipe:
validation split carved from the training patients, early stopping and best-epoch
selection on the validation loss) with a ``modality_mask`` input, once without and once
with modality dropout in training. The kept model is then evaluated on the test
patients with every view present, with each single view missing, and with each pair of
views missing (one view left). Missing views are fed as NaN with the mask False, as a
user would feed a patient without that assay.

The dropout rate is fixed in advance (``--rates``), not tuned; the validation split has
every view present and selects the epoch only.

    MMFUSION_ROSMAP=/path/to/rosmap python benchmarks/missing_modalities.py \\
        [--seeds 3] [--methods deq concat dmf] [--rates 0 0.3]

It prints a table of mean test accuracy (and standard deviation over seeds) per method,
dropout rate and missing views, writes ``results/missing_modalities.json`` and plots
accuracy against the number of missing views.
"""

import argparse
import itertools
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from keras_mmfusion.training import RECIPE, Settings, classification_metrics, load_splits, run_trial  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import machine, rosmap_available  # noqa: E402
import report  # noqa: E402

VIEWS = ("mRNA", "meth", "miRNA")  # MOGONET's files 1, 2 and 3, in the loader's order


def missing_patterns(count):
    """``(label, missing view indices)``: none, each single view, each pair."""
    patterns = [("none", ())]
    for size in (1, 2):
        for views in itertools.combinations(range(count), size):
            patterns.append(("-" + "-".join(VIEWS[v] for v in views), views))
    return patterns


def evaluate_missing(model, test, missing):
    """Test metrics with the views in ``missing`` fed as NaN and masked out."""
    inputs, labels = test
    count = len(inputs)
    mask = np.ones((len(labels), count), bool)
    mask[:, list(missing)] = False
    fed = [np.full_like(x, np.nan) if i in missing else x for i, x in enumerate(inputs)]
    probabilities = model.predict(fed + [mask], batch_size=256, verbose=0)
    if not np.all(np.isfinite(probabilities)):
        raise RuntimeError(f"non-finite probabilities with views {missing} missing")
    return classification_metrics(labels, probabilities)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    report.add_option(parser)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=["deq", "concat", "dmf"])
    parser.add_argument("--rates", nargs="+", type=float, default=[0.0, 0.3],
                        help="modality dropout rates to train with (0: none)")
    parser.add_argument("--epochs", type=int, default=RECIPE.epochs)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    if not rosmap_available():
        sys.exit("ROSMAP is needed: set MMFUSION_ROSMAP to a folder in MOGONET's layout.")
    splits = load_splits("rosmap")
    patterns = missing_patterns(len(splits.widths))
    runs = []
    started = time.time()
    for method in args.methods:
        for rate in args.rates:
            settings = Settings(**{**vars(RECIPE), "epochs": args.epochs, "modality_mask": True,
                                   "modality_dropout": rate})
            for seed in range(args.seeds):
                model, _, metrics = run_trial(splits, method, seed, settings)
                scores = {label: evaluate_missing(model, splits.test, missing)["accuracy"]
                          for label, missing in patterns}
                runs.append(dict(method=method, rate=rate, seed=seed, best_epoch=metrics["best_epoch"],
                                 best_validation=metrics["best_validation"], accuracy=scores))
                print(f"[{time.time() - started:6.0f} s] {method} rate={rate} seed={seed}: "
                      f"epoch {metrics['best_epoch']}, all views {scores['none']:.3f}, "
                      f"one missing {np.mean([scores[p] for p, m in patterns if len(m) == 1]):.3f}, "
                      f"two missing {np.mean([scores[p] for p, m in patterns if len(m) == 2]):.3f}",
                      flush=True)
    summary = summarise(runs, args.methods, args.rates, patterns)
    print_table(summary, patterns)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "missing_modalities.json")
    with open(path, "w") as f:
        json.dump(dict(machine=machine(), seeds=args.seeds, epochs=args.epochs, runs=runs, summary=summary), f,
                  indent=1)
    print(f"wrote {path}")
    plot(summary, args.methods, args.rates, os.path.join(args.out, "missing_modalities.png"))


def summarise(runs, methods, rates, patterns):
    """Mean and standard deviation over seeds, per method, rate and pattern, plus the
    means over the one-missing and two-missing patterns."""
    summary = []
    for method, rate in itertools.product(methods, rates):
        group = [r for r in runs if r["method"] == method and r["rate"] == rate]
        row = dict(method=method, rate=rate)
        for label, _ in patterns:
            values = [r["accuracy"][label] for r in group]
            row[label] = (float(np.mean(values)), float(np.std(values)))
        for size in (1, 2):
            per_seed = [np.mean([r["accuracy"][p] for p, m in patterns if len(m) == size]) for r in group]
            row[f"{size} missing"] = (float(np.mean(per_seed)), float(np.std(per_seed)))
        summary.append(row)
    return summary


def print_table(summary, patterns):
    columns = [p for p, _ in patterns] + ["1 missing", "2 missing"]
    print(f"{'method':8s} {'dropout':>7s} " + " ".join(f"{c:>14s}" for c in columns))
    for row in summary:
        cells = " ".join(f"{row[c][0]:.3f} +- {row[c][1]:.3f}" for c in columns)
        print(f"{row['method']:8s} {row['rate']:7.2f} {cells}")


def plot(summary, methods, rates, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in summary:
        means = [row["none"][0], row["1 missing"][0], row["2 missing"][0]]
        spreads = [row["none"][1], row["1 missing"][1], row["2 missing"][1]]
        style = "-" if row["rate"] == 0 else "--"
        ax.errorbar([0, 1, 2], means, yerr=spreads, linestyle=style, marker="o", capsize=3,
                    label=f"{row['method']}, modality dropout {row['rate']:g}")
    ax.set_xticks([0, 1, 2])
    ax.set_xlabel("views missing at test time (mean over which)")
    ax.set_ylabel("ROSMAP test accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    report.run(main, "missing_modalities")
