"""Every fusion layer inside the same encoder and head, on synthetic data and ROSMAP.

    python benchmarks/fusion_zoo.py [--datasets synthetic rosmap] [--seeds 5] [--quick]
                                    [--out benchmarks/results/fusion_zoo.json]

Protocol, per dataset and seed (``keras_mmfusion.training.run_trial``): 20% of the
training split (stratified) is held out for validation; training stops early on the
validation loss and keeps the best epoch; the test split is evaluated once. The table
gives mean +- std over seeds (5 on ROSMAP, 3 on synthetic data) of accuracy, F1 and
(ROSMAP) AUC, the parameter count, MACs per sample (see ``keras_mmfusion.costs``;
for DEQ fusion the solver loop is counted at its mean number of steps on the test
split) and the median training time per epoch.

DenseFusion against late fusion: both are trained for a fixed number of epochs on the
synthetic data (no early stopping), their training-loss curves are plotted to a PNG and
the first epoch whose training loss is below a fixed level is recorded. "Late" fusion
uses the same per-modality stacks as DenseFusion and concatenates their tops.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from timing import machine as describe_machine, rosmap_available  # noqa: E402
import report  # noqa: E402

FUSIONS = ["concat", "sum", "gated", "tensor", "lowrank", "dmf", "deq"]
LOSS_LEVEL = 0.3


def late_fusion(units, depth=2):
    """Per-modality Dense stacks of ``depth`` layers, concatenated at the top."""
    import keras

    import keras_mmfusion as mmf

    concat = mmf.ConcatFusion(units, activation="relu", name="late_fusion")

    def fuse(encoded):
        tops = []
        for i, h in enumerate(encoded):
            for level in range(depth):
                h = keras.layers.Dense(units, activation="relu", name=f"late_{i}_{level}")(h)
            tops.append(h)
        return concat(tops)

    return fuse


def run_one(splits, fusion_name, seed, settings):
    import keras_mmfusion as mmf
    from keras_mmfusion.costs import count_macs
    from keras_mmfusion.training import run_trial

    model, _, metrics = run_trial(splits, fusion_name, seed, settings)
    deq = [l for l in model._flatten_layers(include_self=False) if isinstance(l, mmf.DEQFusion)]
    # The solver loop, one update evaluation per trip, is counted at the mean steps of
    # the test-split prediction.
    trips = max(int(round(float(deq[0].last_stats["steps"]))), 1) if deq else 1
    metrics.update(macs=count_macs(model, splits.widths, loop_trips=trips))
    return metrics


def loss_curves(epochs, out_png, seeds):
    import keras

    import keras_mmfusion as mmf

    from keras_mmfusion.training import load_splits

    x, y = load_splits("synthetic").train
    widths = [a.shape[1] for a in x]
    curves = {"dmf": [], "late": []}
    for seed in seeds:
        for name in curves:
            keras.utils.set_random_seed(seed)
            fusion = mmf.DenseFusion(32, depth=2) if name == "dmf" else late_fusion(32)
            model = mmf.models.build_classifier(fusion, widths, 2, encoder_units=32, head_units=32)
            model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
            history = model.fit(x, y, epochs=epochs, batch_size=64, verbose=0)
            curves[name].append(history.history["loss"])
    result = {}
    for name, runs in curves.items():
        runs = np.asarray(runs)
        reached = [next((i + 1 for i, v in enumerate(r) if v < LOSS_LEVEL), None) for r in runs]
        result[name] = {
            "mean_loss": runs.mean(0).tolist(),
            "final_loss": [float(r[-1]) for r in runs],
            "epochs_to_loss": reached,
        }
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, label in (("dmf", "DenseFusion (DMF)"), ("late", "late fusion")):
        runs = np.asarray(curves[name])
        epochs_axis = np.arange(1, runs.shape[1] + 1)
        ax.plot(epochs_axis, runs.mean(0), label=label)
        ax.fill_between(epochs_axis, runs.min(0), runs.max(0), alpha=0.2)
    ax.axhline(LOSS_LEVEL, color="grey", linestyle=":", label=f"loss {LOSS_LEVEL}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title(f"Synthetic data, {len(seeds)} seeds (band: min-max)")
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return result


def summarise(rows):
    from keras_mmfusion.training import summarise as mean_and_std

    out = mean_and_std(rows)
    out["params"] = rows[0]["params"]
    out["macs"] = float(np.mean([r["macs"] for r in rows]))
    out["epoch_s"] = float(np.median([r["epoch_seconds"] for r in rows]))
    out["epochs_run"] = float(np.mean([r["epochs_run"] for r in rows]))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    report.add_option(parser)
    parser.add_argument("--datasets", nargs="+", default=["synthetic", "rosmap"], choices=["synthetic", "rosmap"])
    parser.add_argument("--fusions", nargs="+", default=FUSIONS, choices=FUSIONS)
    parser.add_argument("--seeds", type=int, default=5, help="seeds per dataset (ROSMAP)")
    parser.add_argument("--synthetic-seeds", type=int, default=3, help="at most this many seeds on synthetic data")
    parser.add_argument("--quick", action="store_true", help="2 seeds and short training")
    parser.add_argument("--out", default="benchmarks/results/fusion_zoo.json")
    args = parser.parse_args()

    from keras_mmfusion.training import Settings, load_splits

    seeds = list(range(2 if args.quick else args.seeds))
    settings = {
        "synthetic": Settings(units=32, lr=3e-3, batch_size=64, patience=8, epochs=15 if args.quick else 40),
        "rosmap": Settings(units=32, dropout=0.5, l2=1e-3, lr=1e-3, batch_size=32, patience=20,
                           epochs=60 if args.quick else 200),
    }
    dataset_seeds = {"synthetic": seeds[: args.synthetic_seeds], "rosmap": seeds}
    machine = describe_machine()
    print(f"machine: {machine}", flush=True)
    datasets = [d for d in args.datasets if d != "rosmap" or rosmap_available()]
    if "rosmap" in args.datasets and "rosmap" not in datasets:
        print("skipping rosmap", file=sys.stderr)
    results = {"machine": machine, "seeds": dataset_seeds, "settings": {k: vars(v) for k, v in settings.items()},
               "tables": {}}
    for dataset in datasets:
        splits = load_splits(dataset)
        table = {}
        for name in args.fusions:
            rows = [run_one(splits, name, seed, settings[dataset]) for seed in dataset_seeds[dataset]]
            table[name] = {"summary": summarise(rows), "runs": rows}
            s = table[name]["summary"]
            print(f"  {dataset:<9} {name:<8} acc {s['accuracy'][0]:.3f} +- {s['accuracy'][1]:.3f}", flush=True)
        results["tables"][dataset] = table

    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    png = os.path.splitext(args.out)[0] + "_dmf_vs_late.png"
    results["dmf_vs_late"] = loss_curves(20 if args.quick else 50, png, dataset_seeds["synthetic"])
    results["dmf_vs_late"]["loss_level"] = LOSS_LEVEL
    results["dmf_vs_late"]["plot"] = png

    for dataset, table in results["tables"].items():
        print(f"\n{dataset} ({len(dataset_seeds[dataset])} seeds, test split once per seed; mean +- std)")
        print(f"{'fusion':<8} {'accuracy':>15} {'F1':>15} {'AUC':>15} {'params':>8} {'MACs/sample':>12} {'s/epoch':>8} {'epochs':>7}")
        for name, entry in table.items():
            s = entry["summary"]
            cells = " ".join(f"{s[k][0]:>7.3f} +- {s[k][1]:.3f}" for k in ("accuracy", "f1_binary", "auc"))
            print(f"{name:<8} {cells} {s['params']:>8} {s['macs']:>12.0f} {s['epoch_s']:>8.3f} {s['epochs_run']:>7.1f}")
    print(f"\nDenseFusion vs late fusion on synthetic data: epochs until training loss < {LOSS_LEVEL} (per seed)")
    for name in ("dmf", "late"):
        entry = results["dmf_vs_late"][name]
        finals = ", ".join(f"{v:.3f}" for v in entry["final_loss"])
        print(f"{name:<5} epochs: {entry['epochs_to_loss']}  final loss: {finals}")
    print(f"loss curves: {png}")
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    report.run(main, "fusion_zoo")
