"""Does DEQ fusion with its defaults train as well as the baselines, and stay at an equilibrium?

Tasks:

- ``xor``: 3 modalities of 8 standard-normal features; the label is
  ``(a[:, 0] > 0) xor (b[:, 0] > 0)``, so no single modality and no linear model can
  predict it. 1536 samples train, 512 test; Adam 3e-3, batch 64.
- ``xor_hard``: 5 modalities of 16 features; the same label, read through noise of
  standard deviation 0.3 on the two informative features, so the label is not a
  function of what is observed.
- ``rosmap``: the standard classifier (``keras_mmfusion.models.build_classifier``,
  standardised inputs, dropout 0.5, Adam 1e-3, batch 32) on ROSMAP, when the data are
  found. The curve's accuracy is on a validation split carved from the training
  patients; the test patients are not read.

Models on the synthetic tasks: ``DEQFusion(units=32)`` with every other argument at its
default, followed by ``Dense(2)``; the concatenated inputs through one ReLU layer; and
``DenseFusion``; the last two sized to about the DEQ model's parameter count.

Per epoch it records the training loss, the held-out accuracy and, for DEQ, the
forward steps, the residual and the fraction of samples whose training solve
converged. It also counts the evaluations of the update in one training step with the
Jacobian penalty on. It prints a table, writes JSON and plots the curves.

    python benchmarks/deq_trainability.py [--seeds 3] [--epochs 40] [--tasks xor xor_hard rosmap]
"""

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_mmfusion as mmf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import machine, rosmap_available  # noqa: E402
import report  # noqa: E402

DEQ_KEYS = ("deq_steps", "deq_residual", "deq_converged")


def xor_task(seed, modalities=3, width=8, noise=0.0, train=1536, test=512):
    """``(train, test)`` of the cross-modal XOR; each is ``(list of arrays, labels)``."""
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal((train + test, width)).astype("float32") for _ in range(modalities)]
    labels = ((xs[0][:, 0] > 0) ^ (xs[1][:, 0] > 0)).astype("int32")
    for x in xs[:2]:
        x[:, 0] += noise * rng.standard_normal(len(x)).astype("float32")
    return ([x[:train] for x in xs], labels[:train]), ([x[train:] for x in xs], labels[train:])


def deq_model(widths, units=32):
    inputs = [keras.Input((w,), name=f"modality_{i}") for i, w in enumerate(widths)]
    fused = mmf.DEQFusion(units=units, name="deq_fusion")(inputs)
    return keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(fused))


def concat_model(widths, hidden):
    inputs = [keras.Input((w,)) for w in widths]
    h = keras.layers.Dense(hidden, activation="relu")(keras.layers.Concatenate()(inputs))
    return keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(h))


def dmf_model(widths, units):
    inputs = [keras.Input((w,)) for w in widths]
    return keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(mmf.DenseFusion(units, depth=2)(inputs)))


def matched_size(build, widths, target):
    """The size for ``build(widths, size)`` whose parameter count is closest to ``target``."""
    return min(range(4, 404, 4), key=lambda size: abs(build(widths, size).count_params() - target))


class Curves(keras.callbacks.Callback):
    """Held-out accuracy and the logged losses and solver statistics after every epoch."""

    def __init__(self, held_out):
        super().__init__()
        self.held_out = held_out
        self.rows = []

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        accuracy = self.model.evaluate(*self.held_out, verbose=0, return_dict=True)["accuracy"]
        row = {"epoch": epoch + 1, "loss": float(logs["loss"]), "accuracy": float(accuracy)}
        row.update({k: float(logs[k]) for k in DEQ_KEYS if k in logs})
        self.rows.append(row)


def train_synthetic(kind, task, seed, epochs):
    train, test = task
    widths = [x.shape[1] for x in train[0]]
    keras.utils.set_random_seed(seed)
    model = deq_model(widths)
    if kind != "deq":
        build = concat_model if kind == "concat" else dmf_model
        size = matched_size(build, widths, model.count_params())
        keras.utils.set_random_seed(seed)
        model = build(widths, size)
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    curves = Curves(test)
    model.fit(*train, batch_size=64, epochs=epochs, verbose=0, callbacks=[curves])
    return {"params": model.count_params(), "curve": curves.rows}


def train_rosmap(kind, seed, epochs):
    from keras_mmfusion.datasets import stratified_split
    from keras_mmfusion.training import load_splits

    splits = load_splits("rosmap")
    x, y = splits.train
    keep, held = stratified_split(y, 0.2, seed)
    train = ([a[keep] for a in x], y[keep])
    validation = ([a[held] for a in x], y[held])
    keras.utils.set_random_seed(seed)
    fusion = None if kind == "single" else mmf.models.make_fusion(kind, 32, num_modalities=len(x))
    model = mmf.models.build_classifier(fusion, splits.widths, splits.num_classes, dropout=0.5,
                                        standardize_with=train[0])
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    curves = Curves(validation)
    model.fit(*train, batch_size=32, epochs=epochs, verbose=0, callbacks=[curves])
    return {"params": model.count_params(), "curve": curves.rows}


def update_evaluations_per_training_step():
    """``(forward steps, evaluations of the update)`` in one eager training step with the penalty on."""
    train, _ = xor_task(0, train=64, test=0)
    keras.utils.set_random_seed(0)
    model = deq_model([8, 8, 8])
    layer = model.get_layer("deq_fusion")
    model.compile("adam", "sparse_categorical_crossentropy", run_eagerly=True)
    model.train_on_batch(*train)  # builds everything
    calls = []
    update = layer._equilibrium_map
    layer._equilibrium_map = lambda z, x: calls.append(1) or update(z, x)
    model.train_on_batch(*train)
    return int(layer.last_stats["steps"]), len(calls)


def summarise(results):
    lines = []
    header = f"{'task':9s} {'model':7s} {'params':>7s} {'acc @15':>14s} {'acc @last':>14s} {'last':>5s} " \
             f"{'steps':>6s} {'residual':>9s} {'conv last 10':>13s}"
    lines.append(header)
    for task, models in results.items():
        for kind, runs in models.items():
            def acc_at(epoch):
                values = [r["curve"][min(epoch, len(r["curve"])) - 1]["accuracy"] for r in runs]
                return f"{np.mean(values):.3f} +- {np.std(values):.3f}"

            last = len(runs[0]["curve"])
            row = f"{task:9s} {kind:7s} {runs[0]['params']:7d} {acc_at(15):>14s} {acc_at(last):>14s} {last:5d} "
            if "deq_steps" in runs[0]["curve"][0]:
                last = [e for r in runs for e in r["curve"][-10:]]
                row += f"{np.mean([e['deq_steps'] for e in last]):6.1f} " \
                       f"{np.max([e['deq_residual'] for e in last]):9.1e} " \
                       f"{np.min([e['deq_converged'] for e in last]):13.4f}"
            lines.append(row)
    return "\n".join(lines)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results)
    fig, axes = plt.subplots(2, len(tasks), figsize=(5 * len(tasks), 7), squeeze=False)
    for column, task in enumerate(tasks):
        for kind, runs in results[task].items():
            curve = np.mean([[e["accuracy"] for e in r["curve"]] for r in runs], axis=0)
            axes[0][column].plot(np.arange(1, len(curve) + 1), curve, label=kind)
            if "deq_converged" in runs[0]["curve"][0]:
                conv = np.mean([[e["deq_converged"] for e in r["curve"]] for r in runs], axis=0)
                axes[1][column].plot(np.arange(1, len(conv) + 1), conv, label=f"{kind} converged fraction")
        axes[0][column].set_title(f"{task}: held-out accuracy (mean over seeds)")
        axes[1][column].set_title(f"{task}: DEQ training solves converged")
        axes[1][column].set_xlabel("epoch")
        for ax in axes[:, column]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    report.add_option(parser)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--rosmap-epochs", type=int, default=100)
    parser.add_argument("--tasks", nargs="+", default=["xor", "xor_hard", "rosmap"])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    results = {}
    tasks = {"xor": dict(), "xor_hard": dict(modalities=5, width=16, noise=0.3)}
    for task in args.tasks:
        if task == "rosmap":
            if not rosmap_available():
                print("rosmap: skipped")
                continue
            results[task] = {kind: [train_rosmap(kind, s, args.rosmap_epochs) for s in range(args.seeds)]
                             for kind in ("deq", "concat", "dmf")}
        else:
            results[task] = {}
            for kind in ("deq", "concat", "dmf"):
                results[task][kind] = [
                    train_synthetic(kind, xor_task(s, **tasks[task]), s, args.epochs) for s in range(args.seeds)
                ]
        print(f"{task}: done", flush=True)
    steps, evaluations = update_evaluations_per_training_step()
    info = machine()
    print(f"machine: {info}")
    print(f"DEQFusion defaults: {keras.saving.serialize_keras_object(mmf.DEQFusion(units=32))['config']}")
    print(f"seeds: {args.seeds}; synthetic epochs: {args.epochs}; rosmap epochs: {args.rosmap_epochs} "
          "(rosmap accuracy is on the validation split)")
    print(summarise(results))
    print(f"one training step with the Jacobian penalty: {evaluations} evaluations of the update for "
          f"{steps} forward solver steps ({evaluations - steps} at the solution, shared by the penalty "
          "and the implicit backward pass)")
    with open(os.path.join(args.out, "deq_trainability.json"), "w") as f:
        json.dump({"machine": info, "seeds": args.seeds, "results": results,
                   "training_step": {"forward_steps": steps, "update_evaluations": evaluations}}, f, indent=1)
    plot(results, os.path.join(args.out, "deq_trainability.png"))
    print(f"wrote {os.path.join(args.out, 'deq_trainability.json')} and deq_trainability.png")


if __name__ == "__main__":
    report.run(main, "deq_trainability")
