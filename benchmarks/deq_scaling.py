"""How the cost of a DEQ fusion training step grows: time and peak memory against the
batch, the width, the number of modalities and ``max_iter``.

    python benchmarks/deq_scaling.py [--quick] [--json FILE] [--plot FILE] [--no-xla] [--record]

From a base case (batch 256, width 256, 3 modalities, ``max_iter`` 30), one quantity
varies at a time: the batch (64 to 4096), the width (32 to 1024), the modalities (2 to
8) and ``max_iter`` (10 to 100). DEQ fusion runs with an absolute tolerance no solve can
meet (1e-30), so every forward solve makes ``max_iter`` evaluations of the update and
every implicit backward solve ``max_iter`` adjoint steps (the table's ``steps`` is the
forward count the layer reports); the Jacobian penalty is on (weight 20, 1 probe), as in
training. Concat fusion and DMF are the references, at about DEQ
fusion's parameter count for the same width and modalities: concat fusion projects the
concatenation to the width and adds ``N + 2`` hidden Dense layers (1.0 times DEQ
fusion's parameters); DMF has depth 2 and modality stacks half the width (0.75 to 0.85
times). ``max_iter`` does not apply to them.

The model is ``N`` inputs of the width, the fusion layer and a 2-class softmax head,
compiled with ``jit_compile=True`` (``--no-xla``: without), trained with Adam on random
data. ``train_ms`` is the median of ``--repeats`` ``train_on_batch`` calls after two
warm-up calls. ``peak_bytes`` is the peak of TensorFlow's CPU allocator statistics
(``tf.config.experimental.get_memory_info("CPU:0")["peak"]``, reset before the step)
above what was in use before the step, the largest over three steps, with TensorFlow's
BFC allocator on the CPU (``TF_CPU_ALLOCATOR_USE_BFC=true``, set by the script: the
default CPU allocator keeps no statistics). XLA's compiled steps take their buffers from
the same allocator.

The table gives each case; the slopes are least-squares fits of ``log(train_ms)`` and
``log(peak_bytes)`` against the log of the varied quantity (for the batch, from 256 up).
"""

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# TensorFlow keeps allocation statistics for the CPU only with its BFC allocator.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

import numpy as np  # noqa: E402

from timing import machine  # noqa: E402
import report  # noqa: E402

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

BASE = {"batch": 256, "units": 256, "modalities": 3, "max_iter": 30}
FULL = {
    "batch": [64, 128, 256, 512, 1024, 2048, 4096],
    "units": [32, 64, 128, 256, 512, 1024],
    "modalities": [2, 3, 4, 6, 8],
    "max_iter": [10, 20, 30, 50, 100],
}
QUICK = {"batch": [256, 512, 1024], "max_iter": [10, 100]}
FUSIONS = ("deq", "concat", "dmf")
# Where the batch's slope is fitted from: below it a step's fixed costs dominate.
SLOPE_FROM_BATCH = 256


def build(fusion, units, modalities, max_iter, xla):
    import keras

    import keras_mmfusion as mmf

    inputs = [keras.Input((units,)) for _ in range(modalities)]
    if fusion == "deq":
        # Absolute stops: a relative tolerance is raised to what float32 resolves.
        fused = mmf.DEQFusion(units, max_iter=max_iter, tol=1e-30, stop_mode="abs", backward_stop_mode="abs",
                              jacobian_weight=20.0)(inputs)
    elif fusion == "concat":
        fused = mmf.ConcatFusion(units)(inputs)
        for _ in range(modalities + 2):
            fused = keras.layers.Dense(units, activation="relu")(fused)
    else:
        fused = mmf.DenseFusion(units, depth=2, modality_units=units // 2)(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(fused))
    model.compile(keras.optimizers.Adam(1e-4), "sparse_categorical_crossentropy", jit_compile=xla)
    return model


def measure(fusion, case, repeats, xla):
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    model = build(fusion, case["units"], case["modalities"], case["max_iter"], xla)
    rng = np.random.default_rng(0)
    x = [rng.normal(size=(case["batch"], case["units"])).astype("float32") for _ in range(case["modalities"])]
    y = rng.integers(0, 2, case["batch"])
    for _ in range(2):
        model.train_on_batch(x, y)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - start)
    peaks = []
    for _ in range(3):
        tf.config.experimental.reset_memory_stats("CPU:0")
        before = tf.config.experimental.get_memory_info("CPU:0")["current"]
        model.train_on_batch(x, y)
        peaks.append(tf.config.experimental.get_memory_info("CPU:0")["peak"] - before)
    params = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    deq = [layer for layer in model.layers if hasattr(layer, "last_stats")]
    steps = int(deq[0].last_stats["steps"]) if deq else 0
    keras.backend.clear_session()
    return 1e3 * float(np.median(times)), int(max(peaks)), params, steps


def cases(grid):
    for vary, values in grid.items():
        for value in values:
            yield vary, dict(BASE, **{vary: value})


def slope(rows, vary, key):
    points = [(r[vary], r[key]) for r in rows if not (vary == "batch" and r[vary] < SLOPE_FROM_BATCH)]
    if len(points) < 2:
        return float("nan")
    x, y = np.log([p[0] for p in points]), np.log([max(p[1], 1) for p in points])
    return float(np.polyfit(x, y, 1)[0])


def plot(rows, grid, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(grid), figsize=(4 * len(grid), 7), squeeze=False)
    for col, vary in enumerate(grid):
        for fusion in FUSIONS:
            curve = [r for r in rows if r["vary"] == vary and r["fusion"] == fusion]
            if vary == "max_iter" and fusion != "deq" or not curve:
                continue
            xs = [r[vary] for r in curve]
            axes[0, col].loglog(xs, [r["train_ms"] for r in curve], "o-", label=fusion)
            axes[1, col].loglog(xs, [r["peak_bytes"] / 2**20 for r in curve], "o-", label=fusion)
        for row in range(2):
            # A flat curve keeps a flat look: at least a factor of 4 on the axis.
            low, high = axes[row, col].get_ylim()
            if high < 4 * low:
                middle = (low * high) ** 0.5
                axes[row, col].set_ylim(middle / 2, middle * 2)
        axes[0, col].set_title(f"varying {vary}")
        axes[1, col].set_xlabel(vary)
        axes[0, 0].set_ylabel("train step (ms)")
        axes[1, 0].set_ylabel("peak memory (MiB)")
        axes[0, col].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batches 256-1024 and max_iter 10, 100 only")
    parser.add_argument("--json", default=os.path.join(RESULTS_DIR, "deq_scaling.json"))
    parser.add_argument("--plot", default=os.path.join(RESULTS_DIR, "deq_scaling.png"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-xla", action="store_true")
    report.add_option(parser)
    args = parser.parse_args()
    grid = QUICK if args.quick else FULL
    xla = not args.no_xla
    print(f"DEQ fusion scaling ({'XLA' if xla else 'graph'}; base {BASE}; peak memory: TensorFlow's CPU "
          f"allocator statistics, peak above current during a step)")
    print(f"{'vary':<11}{'fusion':<8}{'batch':>6}{'units':>6}{'mods':>5}{'iters':>6}{'steps':>6}{'params':>10}"
          f"{'train ms':>10}{'peak MiB':>10}")
    rows = []
    for vary, case in cases(grid):
        for fusion in FUSIONS:
            if vary == "max_iter" and fusion != "deq":
                continue
            with report.unrecorded():
                train_ms, peak, params, steps = measure(fusion, case, args.repeats, xla)
            row = dict(fusion=fusion, vary=vary, **case, train_ms=train_ms, peak_bytes=peak, params=params,
                       steps=steps)
            rows.append(row)
            print(f"{vary:<11}{fusion:<8}{case['batch']:>6}{case['units']:>6}{case['modalities']:>5}"
                  f"{case['max_iter'] if fusion == 'deq' else '-':>6}{steps if fusion == 'deq' else '-':>6}"
                  f"{params:>10}{train_ms:>10.1f}"
                  f"{peak / 2**20:>10.1f}", flush=True)
    print("\nlog-log slopes (time, memory)" + (f"; batch from {SLOPE_FROM_BATCH} up" if "batch" in grid else ""))
    for vary in grid:
        for fusion in FUSIONS:
            curve = [r for r in rows if r["vary"] == vary and r["fusion"] == fusion]
            if curve:
                print(f"  {vary:<11}{fusion:<8} time {slope(curve, vary, 'train_ms'):5.2f}   "
                      f"memory {slope(curve, vary, 'peak_bytes'):5.2f}")
    deq_iters = {r["max_iter"]: r["peak_bytes"] for r in rows if r["vary"] == "max_iter"}
    if 10 in deq_iters and 100 in deq_iters:
        print(f"peak memory at max_iter 100 / at 10: {deq_iters[100] / deq_iters[10]:.2f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"cases": rows, "base": BASE, "xla": xla, "machine": machine()}, f, indent=2)
    print(f"wrote {args.json}")
    plot(rows, grid, args.plot)


if __name__ == "__main__":
    report.run(main, "deq_scaling")
