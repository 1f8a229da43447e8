"""GPU readiness check: XLA training of the DEQ, DynMM, DMF and reference classifiers, in one script.

    python benchmarks/gpu_check.py [--steps 30] [--out benchmarks/results/gpu_check.json]

It runs on whatever accelerator TensorFlow finds, and on the CPU when there is none,
where it says so: CI keeps it working, and on a GPU machine it is the one command to
run. For each of the DEQ, DynMM and DMF classifiers and the reference classifier
(``build_reference_classifier``, without dropout; synthetic data, 3 modalities):

- trains ``--steps`` steps with ``jit_compile=True`` and without, and compares the
  losses (finite, and the XLA and graph runs close after the same steps). The DEQ
  layer's Jacobian penalty draws its probes from TensorFlow's stateless random ops,
  whose streams differ between XLA and TensorFlow's own kernels, so for the DEQ
  classifier the comparison is repeated with the penalty off, where the two runs compute
  the same function and must agree to float32 rounding. Not for the reference
  classifier: at its initial weights most of its solves stop at ``max_iter`` unconverged
  (95% of the first batch's samples after the default 50 steps), where the last iterate
  depends on float rounding, which XLA's fused kernels do differently;
- checks that the XLA training step is one compiled program: ``jit_compile=True``
  fails rather than fall back to TensorFlow ops, and the step's HLO is read to
  confirm that the solver loop is an XLA ``while`` and that no op sends data to or
  from the host (``send``/``recv``/``outfeed``/``infeed``/host custom calls);
- times one training step, XLA against no XLA (median over the timed steps).

Then the DEQ classifier trains under the ``mixed_float16`` and ``mixed_bfloat16``
policies: loss, the solver's logged steps and converged fraction, and the output dtype.
Everything is printed as a table and written as JSON. It finishes in a few minutes on
one GPU and in about two on two CPU cores.
"""

import argparse
import json
import os
import re
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from timing import machine as describe_machine  # noqa: E402
import report  # noqa: E402

HOST_TRANSFER = re.compile(r"\b(send|recv|send-done|recv-done|outfeed|infeed)\(|custom_call_target=\"[^\"]*[Hh]ost")


def data(batch, steps):
    import keras_mmfusion as mmf

    x, y = mmf.make_synthetic(batch * steps, num_modalities=3, widths=[16, 24, 8], noise=0.5, seed=0)
    return x, y


def build(kind, widths, **fusion_options):
    import keras_mmfusion as mmf

    if kind == "reference":
        # No dropout: XLA and TensorFlow's kernels draw different masks, as they draw
        # different probes.
        return mmf.models.build_reference_classifier(widths, 2, units=32, dropout=0.0, fusion_options=fusion_options)
    fusion = mmf.models.make_fusion(kind, 32, num_modalities=len(widths), **fusion_options)
    return mmf.models.build_classifier(fusion, widths, 2, encoder_units=32, head_units=32)


def train(kind, x, y, batch, jit_compile, seed=0, **fusion_options):
    """Train ``len(y) // batch`` steps; returns (model, losses, seconds per step after the first two, last logs)."""
    import keras
    import tensorflow as tf
    from keras_mmfusion.training import build_before_tracing

    keras.utils.set_random_seed(seed)
    model = build(kind, [a.shape[1] for a in x], **fusion_options)
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", jit_compile=jit_compile)
    build_before_tracing(model, x, y)  # one trace of the step, not two
    losses, times = [], []
    for step in range(len(y) // batch):
        part = slice(step * batch, (step + 1) * batch)
        start = time.perf_counter()
        logs = model.train_on_batch([tf.constant(a[part]) for a in x], y[part], return_dict=True)
        losses.append(float(logs["loss"]))
        times.append(time.perf_counter() - start)
    return model, losses, float(np.median(times[2:])), logs


def compiled_hlo(model, x, y):
    """The HLO text of the model's training step on one batch, compiled by XLA."""
    import tensorflow as tf

    step = tf.function(model.train_step, jit_compile=True)
    return step.experimental_get_compiler_ir(([tf.constant(a) for a in x], tf.constant(y)))(stage="hlo")


def check_model(kind, x, y, batch, time_deq_graph=True):
    """Train ``kind`` with and without XLA and read the XLA step's HLO; returns the table row.

    ``time_deq_graph=False`` leaves out the DEQ model's graph run with the penalty on,
    which only times it (its losses differ from XLA's by the probes), and with it the
    row's graph time and speedup.
    """
    import keras

    row = {}
    xla_model, xla_losses, xla_seconds, _ = train(kind, x, y, batch, jit_compile=True)
    row["xla_loss_first_last"] = [xla_losses[0], xla_losses[-1]]
    row["xla_step_ms"] = 1e3 * xla_seconds
    losses = list(xla_losses)
    if kind != "deq" or time_deq_graph:
        _, graph_losses, graph_seconds, _ = train(kind, x, y, batch, jit_compile=False)
        losses += graph_losses
        row["graph_loss_first_last"] = [graph_losses[0], graph_losses[-1]]
        row["max_loss_difference"] = float(np.max(np.abs(np.array(xla_losses) - np.array(graph_losses))))
        row["graph_step_ms"] = 1e3 * graph_seconds
        row["xla_speedup"] = graph_seconds / xla_seconds
    if kind == "deq":
        _, xla_plain, _, _ = train(kind, x, y, batch, jit_compile=True, jacobian_weight=0.0)
        _, graph_plain, _, _ = train(kind, x, y, batch, jit_compile=False, jacobian_weight=0.0)
        losses += xla_plain + graph_plain
        row["max_loss_difference_without_penalty"] = float(np.max(np.abs(np.array(xla_plain) - np.array(graph_plain))))
    row["losses_finite"] = bool(np.all(np.isfinite(losses)))
    hlo = compiled_hlo(xla_model, [a[:batch] for a in x], y[:batch])
    row["hlo_while_loops"] = len(re.findall(r"\bwhile\(", hlo))
    row["hlo_host_transfers"] = len(HOST_TRANSFER.findall(hlo))
    solves = kind in ("deq", "reference")
    row["one_xla_program"] = row["hlo_host_transfers"] == 0 and (not solves or row["hlo_while_loops"] > 0)
    keras.backend.clear_session()
    return row


def check_mixed_precision(x, y, batch):
    import keras
    import tensorflow as tf

    rows = {}
    for policy in ("mixed_float16", "mixed_bfloat16"):
        keras.mixed_precision.set_global_policy(policy)
        try:
            model, losses, seconds, logs = train("deq", x, y, batch, jit_compile=False)
            output = model(*[[tf.constant(a[:4]) for a in x]], training=False)
            rows[policy] = {
                "loss_first_last": [losses[0], losses[-1]],
                "losses_finite": bool(np.all(np.isfinite(losses))),
                "deq_steps": float(logs.get("deq_steps", float("nan"))),
                "deq_converged": float(logs.get("deq_converged", float("nan"))),
                "output_dtype": str(output.dtype.name),
                "step_ms": 1e3 * seconds,
            }
        except Exception as error:  # report the failure of one policy and go on
            rows[policy] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0]}"}
        finally:
            keras.mixed_precision.set_global_policy("float32")
            keras.backend.clear_session()
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    report.add_option(parser)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--models", nargs="+", default=["deq", "dynmm", "dmf", "reference"])
    parser.add_argument("--out", default="benchmarks/results/gpu_check.json")
    args = parser.parse_args()

    import tensorflow as tf

    devices = [f"{d.device_type}:{d.name}" for d in tf.config.list_physical_devices()]
    gpus = tf.config.list_physical_devices("GPU")
    print("devices:", ", ".join(devices))
    if not gpus:
        print("no GPU found: running on the CPU (XLA on CPU); the GPU figures need a GPU machine")
    x, y = data(args.batch, args.steps)
    started = time.perf_counter()
    models = {}
    for kind in args.models:
        print(f"{kind}: training {args.steps} steps with and without XLA", flush=True)
        models[kind] = check_model(kind, x, y, args.batch)
    mixed = check_mixed_precision(x, y, args.batch)

    print(f"\n{'model':<9} {'XLA ms':>8} {'graph ms':>9} {'speedup':>8} {'loss diff':>10} {'no penalty':>11} "
          f"{'finite':>7} {'while':>6} {'host io':>8} {'one program':>12}")
    for kind, row in models.items():
        plain = row.get("max_loss_difference_without_penalty")
        print(f"{kind:<9} {row['xla_step_ms']:>8.2f} {row['graph_step_ms']:>9.2f} {row['xla_speedup']:>7.2f}x "
              f"{row['max_loss_difference']:>10.2e} {'' if plain is None else f'{plain:.2e}':>11} "
              f"{str(row['losses_finite']):>7} {row['hlo_while_loops']:>6} "
              f"{row['hlo_host_transfers']:>8} {str(row['one_xla_program']):>12}")
    print(f"\n{'policy':<15} {'loss first -> last':>20} {'deq_steps':>10} {'converged':>10} {'output':>8} {'ms':>7}")
    for policy, row in mixed.items():
        if "error" in row:
            print(f"{policy:<15} failed: {row['error']}")
            continue
        first, last = row["loss_first_last"]
        print(f"{policy:<15} {first:>9.4f} -> {last:<8.4f} {row['deq_steps']:>10.1f} {row['deq_converged']:>10.2f} "
              f"{row['output_dtype']:>8} {row['step_ms']:>7.2f}")
    seconds = time.perf_counter() - started
    result = {"machine": describe_machine(), "devices": devices, "gpu": bool(gpus), "models": models,
              "mixed_precision": mixed, "seconds": seconds}
    print(f"\n{'GPU' if gpus else 'CPU'} run; {seconds:.0f} s")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    report.run(main, "gpu_check")
