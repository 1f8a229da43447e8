"""DEQ fusion benchmark: solver steps, solver overhead, training memory and XLA speed.

3 modalities of width 256, batch 256. Prints a table and writes JSON.

    python benchmarks/deq_bench.py [--out benchmarks/results/deq_bench.json] [--quick]

Measurements:
- steps: evaluations of the update needed to reach a relative residual of 1e-4, per
  solver, on a model trained briefly (with Jacobian regularisation) on synthetic data.
- overhead: forward-solve time / (steps x time of one update evaluation), per solver.
- memory: peak resident memory added by one training step, implicit vs unrolled
  backward, at 10, 30 and 100 forward iterations; each point runs in a fresh process
  (CPU has no allocator statistics, so the process's peak RSS is what is measured).
- xla: median training-step time with and without jit_compile, after warm-up.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

WIDTH, MODALITIES, BATCH = 256, 3, 256


def build(max_iter=30, tol=1e-4, backward="implicit", solver="anderson", jacobian_weight=0.0):
    import keras

    import keras_mmfusion as mmf

    inputs = [keras.Input((WIDTH,)) for _ in range(MODALITIES)]
    fusion = mmf.DEQFusion(
        units=WIDTH, max_iter=max_iter, tol=tol, backward=backward, solver=solver,
        jacobian_weight=jacobian_weight, name="deq",
    )
    outputs = keras.layers.Dense(2, activation="softmax")(fusion(inputs))
    return keras.Model(inputs, outputs), fusion


def data(n=BATCH * 8, seed=0):
    import keras_mmfusion as mmf

    return mmf.make_synthetic(n, num_modalities=MODALITIES, widths=WIDTH, seed=seed)


def median_time(fn, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure_solvers(repeats, train_epochs):
    import keras
    import tensorflow as tf

    from keras_mmfusion.equilibrium import fixed_point_solve, get_solver

    keras.utils.set_random_seed(0)
    model, fusion = build(max_iter=30, jacobian_weight=1.0)
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    x, y = data()
    model.fit(x, y, batch_size=BATCH, epochs=train_epochs, verbose=0)

    xb = [tf.constant(a[:BATCH]) for a in x]
    xs = [p(a) if p is not None else a for a, p in zip(xb, fusion.projections)]
    x_fuse = sum(fusion.injection_weights[i] * a for i, a in enumerate(xs)) + fusion.injection_bias
    args = (xs, x_fuse)
    z0 = tf.zeros((BATCH, WIDTH * (MODALITIES + 1)))
    f = tf.function(lambda z: fusion._equilibrium_map(z, args))
    t_f = median_time(lambda: f(z0).numpy(), repeats * 5)

    rows = {}
    for solver in ("fixed_point", "anderson", "broyden"):
        solve = tf.function(
            lambda: get_solver(solver)(lambda z: fusion._equilibrium_map(z, args), z0, max_iter=300, tol=1e-4)
        )
        z, stats = solve()
        steps = int(stats.steps)
        t_solve = median_time(lambda: solve()[0].numpy(), repeats)
        rows[solver] = {
            "steps_to_1e-4": steps,
            "converged": bool(tf.reduce_all(stats.converged)),
            "max_residual": float(tf.reduce_max(stats.residual)),
            "forward_ms": 1e3 * t_solve,
            "overhead": t_solve / (steps * t_f),
        }
    return {"f_eval_ms": 1e3 * t_f, "solvers": rows}


def train_step_peak_rss(backward, iters):
    """Run in a child process: peak RSS added by one training step."""
    import resource

    import keras

    keras.utils.set_random_seed(0)
    model, _ = build(max_iter=iters, tol=1e-30, backward=backward)
    model.compile("adam", "sparse_categorical_crossentropy", run_eagerly=False)
    x, y = data(BATCH)
    # Trace and build the optimizer on a one-sample step, then measure a full step.
    model.train_on_batch([a[:1] for a in x], y[:1])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model.train_on_batch(x, y)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (after - before) / 1024.0  # MiB (ru_maxrss is in KiB on Linux)


def measure_memory():
    rows = {}
    for backward in ("implicit", "unrolled"):
        for iters in (10, 30, 100):
            out = subprocess.run(
                [sys.executable, __file__, "--child-memory", backward, str(iters)],
                capture_output=True, text=True, check=True,
            )
            rows[f"{backward}@{iters}"] = float(out.stdout.strip().splitlines()[-1])
    return rows


def measure_xla(repeats):
    import keras

    x, y = data(BATCH)
    rows = {}
    for jit in (False, True):
        keras.utils.set_random_seed(0)
        model, _ = build(max_iter=20, tol=1e-30)
        model.compile("adam", "sparse_categorical_crossentropy", jit_compile=jit)
        rows["xla" if jit else "no_xla"] = 1e3 * median_time(lambda: model.train_on_batch(x, y), repeats, warmup=3)
    return rows


def main():
    parser = argparse.ArgumentParser(description="DEQ fusion benchmark.")
    parser.add_argument("--out", default="benchmarks/results/deq_bench.json")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and training epochs")
    parser.add_argument("--child-memory", nargs=2, metavar=("BACKWARD", "ITERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_memory:
        print(train_step_peak_rss(args.child_memory[0], int(args.child_memory[1])))
        return

    import tensorflow as tf

    repeats = 3 if args.quick else 10
    machine = {
        "cpu_cores": os.cpu_count(),
        "tensorflow": tf.__version__,
        "gpu": [d.name for d in tf.config.list_physical_devices("GPU")] or None,
        "platform": platform.platform(),
    }
    print(f"machine: {machine}", flush=True)
    solvers = measure_solvers(repeats, train_epochs=2 if args.quick else 5)
    memory = measure_memory()
    xla = measure_xla(repeats)
    results = {"machine": machine, "width": WIDTH, "modalities": MODALITIES, "batch": BATCH,
               **solvers, "train_step_peak_rss_mib": memory, "train_step_ms": xla}

    print(f"\nOne update evaluation: {solvers['f_eval_ms']:.2f} ms")
    print(f"{'solver':<12} {'steps to 1e-4':>14} {'converged':>10} {'forward ms':>11} {'overhead':>9}")
    for name, row in solvers["solvers"].items():
        print(f"{name:<12} {row['steps_to_1e-4']:>14} {str(row['converged']):>10} {row['forward_ms']:>11.1f} {row['overhead']:>9.2f}")
    fp, aa = solvers["solvers"]["fixed_point"], solvers["solvers"]["anderson"]
    print(f"anderson / fixed_point steps: {aa['steps_to_1e-4'] / fp['steps_to_1e-4']:.2f} (target <= 0.5)")
    print(f"\n{'train step peak RSS (MiB)':<28} {'10 it':>8} {'30 it':>8} {'100 it':>8} {'100/10':>7}")
    for backward in ("implicit", "unrolled"):
        vals = [memory[f"{backward}@{i}"] for i in (10, 30, 100)]
        ratio = vals[2] / vals[0] if vals[0] > 0 else float("nan")
        print(f"{backward:<28} {vals[0]:>8.1f} {vals[1]:>8.1f} {vals[2]:>8.1f} {ratio:>7.2f}")
    print(f"\ntrain step (20 iterations) no XLA: {xla['no_xla']:.1f} ms, XLA: {xla['xla']:.1f} ms, "
          f"XLA/no-XLA: {xla['xla'] / xla['no_xla']:.2f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
