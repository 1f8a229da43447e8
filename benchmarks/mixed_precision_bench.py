"""Training-step time and peak memory of the DEQ classifier under each Keras dtype policy.

The classifier is ``build_classifier`` around ``DEQFusion`` with the layer's defaults
(Jacobian penalty included), 3 modalities of width ``--width``, batch ``--batch``. For
``float32``, ``mixed_float16`` and ``mixed_bfloat16`` it reports, each policy in a fresh
process (the policy is global to a process):

- the median training-step time after warm-up steps (``train_on_batch``, graph mode;
  ``--jit`` compiles it with XLA);
- the peak memory TensorFlow's allocator reports during one training step, above what
  is in use before it (the largest of three steps, one op at a time, as in
  ``deq_bench.py``);
- the forward solver's steps and the fraction of converged samples in that step, the
  tolerance the solve used (raised under mixed precision, see ``DEQFusion.effective_tol``),
  and the dtypes of the fused state and of the model's output.

    python benchmarks/mixed_precision_bench.py [--width 128] [--batch 256] [--repeats 10] [--jit]

On a CPU without native float16 arithmetic, float16 ops are emulated and mixed precision
is expected to be slower; the figures that matter for speed come from a GPU
(``benchmarks/gpu_check.py`` runs the policies there).
"""

import argparse
import json
import os
import subprocess
import sys
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from timing import machine, median_seconds, training_step_peak_mib  # noqa: E402
import report  # noqa: E402

POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")


def measure(policy, width, batch, repeats, jit):
    """In a child process: one policy's figures as a dict."""
    import keras
    import numpy as np
    import tensorflow as tf

    import keras_mmfusion as mmf

    tf.config.threading.set_inter_op_parallelism_threads(1)
    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(0)
    x, y = mmf.make_synthetic(batch, num_modalities=3, widths=width, noise=0.5, seed=0)
    fusion = mmf.DEQFusion(units=width, name="deq")
    model = mmf.models.build_classifier(fusion, [width] * 3, 2, encoder_units=width, head_units=width)
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", jit_compile=jit)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            model.train_on_batch(x, y)
    stats = {k: float(v) for k, v in fusion.last_stats.items()}
    fused = keras.Model(model.inputs, fusion.output)(x)
    peak = training_step_peak_mib(model, x, y)
    step_ms = 1e3 * median_seconds(lambda: model.train_on_batch(x, y), repeats, warmup=1)
    return {
        "policy": policy,
        "step_ms": step_ms,
        "peak_mib": peak,
        "deq_steps": stats["steps"],
        "converged": stats["converged"],
        "effective_tol": fusion.effective_tol,
        "fused_dtype": str(fused.dtype.name),
        "output_dtype": str(model(x).dtype.name),
        "finite_loss": bool(np.all(np.isfinite(model.evaluate(x, y, verbose=0)))),
        "warnings": sorted({str(w.message).split(";")[0] for w in caught if "tol" in str(w.message)}),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    report.add_option(parser)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--jit", action="store_true", help="compile the training step with XLA")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "mixed_precision_bench.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.width, args.batch, args.repeats, args.jit)))
        return
    rows = []
    for policy in POLICIES:
        command = [sys.executable, os.path.abspath(__file__), "--child", policy, "--width", str(args.width),
                   "--batch", str(args.batch), "--repeats", str(args.repeats)] + (["--jit"] if args.jit else [])
        out = subprocess.run(command, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{policy} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{policy}: done", flush=True)
    reference = rows[0]
    print(f"\nDEQ classifier, 3 x width {args.width}, batch {args.batch}, "
          f"{'XLA' if args.jit else 'graph mode'}; {machine()}")
    print(f"{'policy':<16} {'step ms':>8} {'vs f32':>7} {'peak MiB':>9} {'vs f32':>7} {'steps':>6} {'conv':>5} "
          f"{'tol':>8} {'fused':>9} {'output':>8}")
    for row in rows:
        print(f"{row['policy']:<16} {row['step_ms']:>8.1f} {row['step_ms'] / reference['step_ms']:>7.2f} "
              f"{row['peak_mib']:>9.1f} {row['peak_mib'] / max(reference['peak_mib'], 1e-9):>7.2f} {row['deq_steps']:>6.0f} "
              f"{row['converged']:>5.0f} {row['effective_tol']:>8.1e} {row['fused_dtype']:>9} {row['output_dtype']:>8}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": machine(), "width": args.width, "batch": args.batch, "jit": args.jit, "rows": rows},
                  f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    report.run(main, "mixed_precision_bench")
