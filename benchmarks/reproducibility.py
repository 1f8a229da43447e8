"""Do repeated calls of one traced DEQ gradient give the same bits? Grappler's AddN rewrite, measured.

For each solver, the standard DEQ classifier (``build_classifier`` with ``DEQFusion(8)``,
no Jacobian penalty, whose probes are new random draws at every call; 3 views of 6, 10
and 8 features, 64 samples, implicit adjoint) takes the gradient of its summed class-0
probability with respect to its weights, ``--calls`` times in one process, in three
modes: a ``tf.function`` with TensorFlow's default graph optimisations; the same traced
and run inside ``keras_mmfusion.training.fixed_summation_order()`` (Grappler's arithmetic
rewrites off); and the same compiled with XLA. Each mode's function is traced and first
run in its own setting, then the modes' calls alternate. The table gives, per mode, how
many calls differed from the call before in any bit, the largest absolute difference,
and the median time of a call.

    python benchmarks/reproducibility.py [--calls 100] [--json FILE]

Run it as it is and with ``TF_NUM_INTEROP_THREADS=1``: TensorFlow reads its thread
settings when it starts, and the script prints them.
"""

import argparse
import contextlib
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_mmfusion as mmf  # noqa: E402
from keras_mmfusion.training import fixed_summation_order  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import machine  # noqa: E402
import report  # noqa: E402

WIDTHS = [6, 10, 8]
MODES = {"default": (contextlib.nullcontext, False), "rewrite off": (fixed_summation_order, False),
         "xla": (contextlib.nullcontext, True)}


def measure(solver, calls):
    """``{mode: {"differing", "max_difference", "ms"}}`` of ``calls`` gradient calls per mode.

    One model; each mode's function is traced and first run in its own setting, then the
    modes' calls alternate, so that a change of the machine's load reaches every mode alike.
    """
    keras.utils.set_random_seed(0)
    x, _ = mmf.make_synthetic(64, num_modalities=3, widths=WIDTHS, noise=0.5, seed=0)
    xs = [tf.constant(a) for a in x]
    fusion = mmf.DEQFusion(8, solver=solver, jacobian_weight=0.0)
    model = mmf.models.build_classifier(fusion, WIDTHS, 2, encoder_units=8, head_units=8)
    model(xs)

    def traced(jit):
        @tf.function(jit_compile=jit)
        def gradient():
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(model(xs, training=True)[:, 0])
            return tf.concat([tf.reshape(g, [-1]) for g in tape.gradient(loss, model.trainable_weights)], 0)

        return gradient

    functions, previous = {}, {}
    for mode, (scope, jit) in MODES.items():
        functions[mode] = traced(jit)
        with scope():
            previous[mode] = functions[mode]().numpy()
    rows = {mode: {"differing": 0, "max_difference": 0.0} for mode in MODES}
    times = {mode: [] for mode in MODES}
    for _ in range(calls):
        for mode, (scope, _) in MODES.items():
            with scope():
                start = time.perf_counter()
                current = functions[mode]().numpy()
                times[mode].append(time.perf_counter() - start)
            row = rows[mode]
            row["differing"] += int(not np.array_equal(current, previous[mode]))
            row["max_difference"] = max(row["max_difference"], float(np.max(np.abs(current - previous[mode]))))
            previous[mode] = current
    return {mode: dict(row, ms=1e3 * float(np.median(times[mode]))) for mode, row in rows.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    report.add_option(parser)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                        "reproducibility.json"))
    args = parser.parse_args()
    threads = {"intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
               "inter_op": tf.config.threading.get_inter_op_parallelism_threads()}
    print(f"TensorFlow threads (0: TensorFlow's default): intra-op {threads['intra_op']}, inter-op "
          f"{threads['inter_op']}; environment TF_NUM_INTRAOP_THREADS={os.environ.get('TF_NUM_INTRAOP_THREADS')}, "
          f"TF_NUM_INTEROP_THREADS={os.environ.get('TF_NUM_INTEROP_THREADS')}")
    print(f"{'solver':<12} {'mode':<12} {'differing':>14} {'max |diff|':>11} {'ms/call':>8}")
    rows = []
    for solver in ("anderson", "broyden", "fixed_point"):
        with report.unrecorded():
            measured = measure(solver, args.calls)
        for mode, values in measured.items():
            row = dict(solver=solver, mode=mode, **values)
            rows.append(row)
            print(f"{solver:<12} {mode:<12} {row['differing']:>6} of {args.calls:<5} {row['max_difference']:>11.1e} "
                  f"{row['ms']:>8.2f}", flush=True)
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"calls": args.calls, "threads": threads, "rows": rows, "machine": machine()}, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    report.run(main, "reproducibility")
