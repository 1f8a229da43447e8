"""DEQ fusion benchmark: solver steps, solver overhead, training memory and XLA speed.

3 modalities of width 256, batch 256. Prints a table and writes JSON.

    python benchmarks/deq_bench.py [--out benchmarks/results/deq_bench.json] [--quick] [--models 3]

Measurements:
- steps: for every sample, the evaluations of the update until its relative residual
  first reaches 1e-2, 1e-3 and 1e-4 (a run of up to 300 steps per solver), on a model
  trained with Jacobian regularisation on synthetic data; the table gives the median
  over the batch, a sample that never gets there counting as 301. The model is trained
  on 10240 samples, enough to learn the task (its held-out accuracy is printed). A
  second table gives the 90th percentile and the batch's count (its slowest sample),
  which is what a solve of the whole batch runs, since it stops only when every sample
  has converged. A last table repeats the plain-iteration and Anderson counts on models
  trained from further seeds (``--models``): how contractive the trained update is
  differs from one training run to the next, and its ``model.fit`` runs with
  Grappler's arithmetic rewrites on, which add some sums in a thread-dependent order
  (``keras_mmfusion.training.fixed_summation_order``), so a rerun with the same seed can
  give another model.
- acceleration bound: the seed-0 update linearised at its fixed point, for 8 samples:
  the steps of plain iteration and of GMRES (the least-residual point of the Krylov
  space) to the same threshold, and each Jacobian's spectral radius. On a linear map no
  Anderson or Broyden variant needs fewer steps than GMRES, so GMRES / plain iteration
  bounds the step ratio any of them can reach near the fixed point.
- overhead: forward-solve time / (steps x time of one update evaluation), per solver,
  without and with XLA; the update's time is measured inside a bare loop, timed
  alternately with the solve, so both sides carry the same per-step loop cost and no
  per-call dispatch.
- solver work: ms per step of a solve's parts with a cheap update, so that the cost a
  solver adds to each evaluation shows: fixed-point and Anderson solves, and Anderson's
  history operations (storing the newest pair; the dot products and the weighted sum).
- memory: peak memory allocated by TensorFlow during one training step (allocator
  statistics), implicit vs unrolled backward, at 10, 30 and 100 forward iterations;
  each point runs in a fresh process and is the largest of three measured steps.
- xla: median training-step time with and without jit_compile, after warm-up.
"""

import argparse
import json
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from timing import machine as describe_machine, median_ratio, median_seconds, training_step_peak_mib  # noqa: E402
import report  # noqa: E402

WIDTH, MODALITIES, BATCH = 256, 3, 256
# The solver measurements use a model trained on TRAIN_BATCHES batches of BATCH samples.
TRAIN_BATCHES = 40


def build(max_iter=30, tol=1e-4, backward="implicit", solver="anderson", jacobian_weight=0.0):
    """The quickstart's classifier at the benchmark's width: per-modality encoders,
    DEQFusion, a hidden layer and a softmax."""
    import keras

    import keras_mmfusion as mmf

    inputs = [keras.Input((WIDTH,)) for _ in range(MODALITIES)]
    encoded = [keras.layers.Dense(WIDTH, activation="relu")(x) for x in inputs]
    fusion = mmf.DEQFusion(
        units=WIDTH, max_iter=max_iter, tol=tol, backward=backward, solver=solver,
        jacobian_weight=jacobian_weight, name="deq",
    )
    hidden = keras.layers.Dense(WIDTH, activation="relu")(fusion(encoded))
    outputs = keras.layers.Dense(2, activation="softmax")(hidden)
    return keras.Model(inputs, outputs), fusion


def data(n=BATCH * 8, seed=0):
    import keras_mmfusion as mmf

    return mmf.make_synthetic(n, num_modalities=MODALITIES, widths=WIDTH, noise=0.5, seed=seed)


THRESHOLDS = (1e-2, 1e-3, 1e-4)


def per_sample_steps(solve, f, z0, max_iter):
    """Evaluations of ``f`` until each sample's relative residual first reaches each threshold.

    ``f`` is wrapped so that every evaluation also checks the residual of the point it
    was evaluated at; the solver runs as usual. Returns an int array
    ``(len(THRESHOLDS), batch)``, with ``max_iter + 1`` for a sample that never got there.
    """
    import tensorflow as tf

    from keras_mmfusion.equilibrium.iteration import residual_norm

    never = max_iter + 1
    first = tf.Variable(tf.fill([len(THRESHOLDS), z0.shape[0]], never))
    count = tf.Variable(1)

    def recording_f(z):
        fz = f(z)
        res = residual_norm(z, fz, "rel")
        hit = tf.logical_and(res[None] <= tf.constant(THRESHOLDS, res.dtype)[:, None], first == never)
        first.assign(tf.where(hit, count - 1, first))
        count.assign_add(1)
        return fz

    tf.function(lambda: solve(recording_f, z0, max_iter=max_iter, tol=min(THRESHOLDS)))()
    return first.numpy()


def train_model(seed, train_epochs, jacobian_weight):
    """Train the benchmark's classifier from seed ``seed``; returns ``(model, fusion,
    training inputs, training accuracy, held-out accuracy)``."""
    import keras

    keras.utils.set_random_seed(seed)
    model, fusion = build(max_iter=30, jacobian_weight=jacobian_weight)
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    # Enough data for the model to learn the task rather than memorise it: on 2048
    # samples it fits the training set and stays at chance on held-out data, and its
    # update is then no guide to the update of a model that works.
    x, y = data(BATCH * (TRAIN_BATCHES + 2))
    held_out = ([a[BATCH * TRAIN_BATCHES :] for a in x], y[BATCH * TRAIN_BATCHES :])
    x, y = [a[: BATCH * TRAIN_BATCHES] for a in x], y[: BATCH * TRAIN_BATCHES]
    history = model.fit(x, y, batch_size=64, epochs=train_epochs, verbose=0)
    accuracy = model.evaluate(*held_out, verbose=0, return_dict=True)["accuracy"]
    return model, fusion, x, history.history["accuracy"][-1], accuracy


def trained_update(model, fusion, x, batch=BATCH):
    """The trained update ``z -> f(z)`` on the first ``batch`` samples of ``x``, and its start ``z0``."""
    import keras
    import tensorflow as tf

    encoder = keras.Model(model.inputs, fusion.input)
    args, z0 = fusion._injections([tf.constant(e) for e in encoder([a[:batch] for a in x])])
    return (lambda z: fusion._equilibrium_map(z, args)), z0


def relative_residual(f, z):
    """``||f(z) - z|| / (||f(z)|| + 1e-5)`` of one state, as the solvers measure it."""
    fz = f(z)
    return np.linalg.norm(fz - z) / (np.linalg.norm(fz) + 1e-5)


def linearised_steps(jacobian, z_star, threshold, max_steps=300):
    """Steps of plain iteration and of GMRES from ``z = 0`` on ``z -> z* + J (z - z*)``.

    Counted as :func:`per_sample_steps` counts: the evaluations of the map before the
    one at the first point whose relative residual is at most ``threshold``
    (``max_steps + 1``: never). GMRES minimises the residual over the Krylov space of
    ``I - J`` and the first residual; after ``k`` evaluations its iterate is the point of
    least residual in that space, and the evaluation of ``A q`` that extends the
    space gives that residual. On a linear map, every solver whose next point combines
    earlier points and their images (Anderson with any memory, mixing or ridge;
    Broyden) stays in the same space, so none needs fewer steps than GMRES.
    """
    f = lambda z: z_star + jacobian @ (z - z_star)  # noqa: E731
    z, plain = np.zeros_like(z_star), max_steps + 1
    for k in range(max_steps + 1):
        if relative_residual(f, z) <= threshold:
            plain = k
            break
        z = f(z)
    a = np.eye(len(z_star)) - jacobian
    r0 = a @ z_star
    basis, hessenberg = [r0 / np.linalg.norm(r0)], np.zeros((max_steps + 1, max_steps))
    for k in range(1, max_steps + 1):
        w = a @ basis[-1]
        for j, q in enumerate(basis):  # modified Gram-Schmidt
            hessenberg[j, k - 1] = q @ w
            w = w - hessenberg[j, k - 1] * q
        hessenberg[k, k - 1] = np.linalg.norm(w)
        rhs = np.zeros(k + 1)
        rhs[0] = np.linalg.norm(r0)
        coefficients = np.linalg.lstsq(hessenberg[: k + 1, :k], rhs, rcond=None)[0]
        if relative_residual(f, np.stack(basis, axis=1) @ coefficients) <= threshold:
            return plain, k
        if hessenberg[k, k - 1] < 1e-14 * np.linalg.norm(r0):
            break  # the space is invariant: the exact solution is in it
        basis.append(w / hessenberg[k, k - 1])
    return plain, max_steps + 1


def krylov_bound(model, fusion, x, samples=8, threshold=1e-4):
    """Plain-iteration and GMRES steps on the trained update linearised at its fixed
    point, for the first ``samples`` samples, and the spectral radius of each Jacobian.

    The update acts on every sample's state separately, so each sample has its own
    ``(dim, dim)`` Jacobian. Near the fixed point the update is nearly linear, so the
    GMRES count bounds from below what any Anderson or Broyden variant can reach there.
    """
    import tensorflow as tf

    from keras_mmfusion.equilibrium import get_solver

    f, z0 = trained_update(model, fusion, x, batch=samples)
    z_star, _ = get_solver("anderson")(f, z0, max_iter=300, tol=1e-7)

    @tf.function
    def jacobians(z):
        with tf.GradientTape() as tape:
            tape.watch(z)
            fz = f(z)
        return tape.batch_jacobian(fz, z)

    rows = []
    for jacobian, point in zip(jacobians(z_star).numpy().astype(np.float64), z_star.numpy().astype(np.float64)):
        plain, gmres = linearised_steps(jacobian, point, threshold)
        rows.append({"plain": plain, "gmres": gmres,
                     "spectral_radius": float(np.max(np.abs(np.linalg.eigvals(jacobian))))})
    return rows


def step_summary(first, max_iter):
    """Median, 90th percentile and batch (maximum) of per-sample step counts, and the
    fraction of samples that reached the tightest threshold."""
    return {
        "converged_fraction_1e-4": float(np.mean(first[-1] <= max_iter)),
        **{f"median_steps_{t:g}": float(np.median(hits)) for t, hits in zip(THRESHOLDS, first)},
        **{f"mean_steps_{t:g}": float(np.mean(hits)) for t, hits in zip(THRESHOLDS, first)},
        **{f"p90_steps_{t:g}": float(np.percentile(hits, 90)) for t, hits in zip(THRESHOLDS, first)},
        **{f"batch_steps_{t:g}": int(np.max(hits)) for t, hits in zip(THRESHOLDS, first)},
    }


def measure_other_models(seeds, train_epochs, jacobian_weight, max_iter=300):
    """Steps of plain iteration and Anderson on models trained from further seeds.

    Whether a trained update is a fast contraction differs from one training run to the
    next, so the step counts of one model are no estimate of the typical ratio.
    """
    from keras_mmfusion.equilibrium import get_solver

    rows = {}
    for seed in seeds:
        model, fusion, x, train_accuracy, accuracy = train_model(seed, train_epochs, jacobian_weight)
        f, z0 = trained_update(model, fusion, x)
        row = {"train_accuracy": train_accuracy, "held_out_accuracy": accuracy}
        for solver in ("fixed_point", "anderson"):
            first = per_sample_steps(get_solver(solver), f, z0, max_iter)
            row[solver] = step_summary(first, max_iter)
        rows[str(seed)] = row
    return rows


def measure_solvers(repeats, train_epochs, jacobian_weight, max_iter=300):
    import tensorflow as tf

    from keras_mmfusion.equilibrium import get_solver

    model, fusion, x, train_accuracy, accuracy = train_model(0, train_epochs, jacobian_weight)
    f, z0 = trained_update(model, fusion, x)

    def f_loop(jit):
        # The update evaluated max_iter times in a bare loop: the per-step cost the
        # solvers are compared with, free of per-call dispatch.
        return tf.function(
            lambda: tf.while_loop(
                lambda k, z: k < max_iter, lambda k, z: (k + 1, f(z)),
                (tf.constant(0), z0),
            )[1],
            jit_compile=jit,
        )

    f_loops = {jit: f_loop(jit) for jit in (False, True)}
    t_f = {jit: median_seconds(lambda: loop().numpy(), repeats) / max_iter for jit, loop in f_loops.items()}

    rows = {}
    for solver in ("fixed_point", "anderson", "broyden"):
        solves = {
            jit: tf.function(
                lambda: get_solver(solver)(f, z0, max_iter=max_iter, tol=1e-4),
                jit_compile=jit,
            )
            for jit in (False, True)
        }
        first = per_sample_steps(get_solver(solver), f, z0, max_iter)
        z, stats = solves[False]()
        steps = int(stats.steps)
        # Each solve is timed alternately with the bare loop of max_iter updates.
        timed = {
            jit: median_ratio(lambda: solve()[0].numpy(), lambda: f_loops[jit]().numpy(), repeats)
            for jit, solve in solves.items()
        }
        rows[solver] = {
            **step_summary(first, max_iter),
            "steps_run": steps,
            "max_residual": float(tf.reduce_max(stats.residual)),
            "forward_ms": 1e3 * timed[False][1],
            "overhead": timed[False][0] * max_iter / steps,
            "forward_ms_xla": 1e3 * timed[True][1],
            "overhead_xla": timed[True][0] * max_iter / steps,
        }
    return {"f_eval_ms": 1e3 * t_f[False], "f_eval_ms_xla": 1e3 * t_f[True], "trained_accuracy": accuracy, "train_accuracy": train_accuracy, "jacobian_weight": jacobian_weight,
            "train_epochs": train_epochs, "max_iter": max_iter, "solvers": rows,
            "linearised": krylov_bound(model, fusion, x)}


def measure_solver_work(repeats, steps=60, memory=5):
    """Per-step time of a solve's parts, on a cheap update so the solver's own work shows.

    The update is ``0.9 tanh(z) + x`` on a state of the benchmark's batch and width (all
    modalities plus the fused state). Each row is a loop of ``steps`` steps, without and
    with XLA, in ms per step: the update alone; fixed-point and Anderson solves that run
    every step (``tol=1e-30``); a loop that only scales one row; and Anderson's two
    history operations, each added to that loop: storing the newest pair (two rows
    written into the history) and the history's two reads (the dot products with every
    stored residual, then the weighted sum of the stored updates), with the history
    Anderson uses (see ``keras_mmfusion.equilibrium.history``).
    """
    import tensorflow as tf

    from keras_mmfusion.equilibrium import get_solver
    from keras_mmfusion.equilibrium.history import CircularHistory

    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(BATCH, (MODALITIES + 1) * WIDTH)), tf.float32)

    def update(z):
        return 0.9 * tf.tanh(z) + x

    def loop(body, *carry):
        # Every carried value feeds the result, so no compiler can drop part of the loop.
        out = tf.while_loop(lambda k, *c: k < steps, lambda k, *c: (k + 1, *body(k, *c)), (0, *carry))[1:]
        return tf.add_n([tf.reduce_sum(t) for t in tf.nest.flatten(out)])

    def solve(name):
        return get_solver(name)(update, tf.zeros_like(x), max_iter=steps, tol=1e-30)

    def history_writes():
        history = CircularHistory(memory)
        return loop(lambda k, fs, gs, g: (*history.push(fs, gs, g, g, k), 0.9 * g), *history.empty(x), x)

    def history_reads():
        history = CircularHistory(memory)
        fs, gs = history.empty(x)
        for k in range(memory):
            fs, gs = history.push(fs, gs, x * (k + 1), x * (k + 2), k)
        return loop(lambda k, g: (0.9 * g + 1e-3 * history.combine(fs, history.dots(gs, g)),), x)

    parts = {
        "update alone": lambda: loop(lambda k, z: (update(z),), x),
        "fixed_point solve": lambda: solve("fixed_point")[0],
        "anderson solve": lambda: solve("anderson")[0],
        "row scaling alone": lambda: loop(lambda k, g: (0.9 * g,), x),
        "+ store newest pair": history_writes,
        "+ dots and weighted sum": history_reads,
    }
    for name in ("fixed_point", "anderson"):
        taken = int(tf.function(lambda: solve(name)[1].steps)())
        if taken != steps:
            raise RuntimeError(f"the {name} solve stopped after {taken} of {steps} steps; its time per step would be wrong")
    rows = {}
    for name, part in parts.items():
        for jit in (False, True):
            fn = tf.function(part, jit_compile=jit)
            seconds = median_seconds(lambda: fn().numpy(), repeats)
            rows.setdefault(name, {})["xla" if jit else "no_xla"] = 1e3 * seconds / steps
    return {"steps": steps, "memory": memory, "ms_per_step": rows}


def train_step_peak_memory(backward, iters):
    """Run in a child process: the allocator's peak during one training step, in MiB.

    The peak is taken from TensorFlow's CPU allocator statistics
    (``tf.config.experimental.get_memory_info``), reset just before the step and
    measured relative to the memory in use at that point, after warm-up steps have
    traced the step and built the optimizer.
    """
    import keras
    import tensorflow as tf

    # One op at a time: with parallel op scheduling the peak depends on which
    # independent ops happen to overlap, and varies by a fifth from run to run.
    tf.config.threading.set_inter_op_parallelism_threads(1)
    keras.utils.set_random_seed(0)
    model, _ = build(max_iter=iters, tol=1e-30, backward=backward)
    model.compile("adam", "sparse_categorical_crossentropy", run_eagerly=False)
    x, y = data(BATCH)
    model.train_on_batch(x, y)
    model.train_on_batch(x, y)
    return training_step_peak_mib(model, x, y)


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
        rows["xla" if jit else "no_xla"] = 1e3 * median_seconds(lambda: model.train_on_batch(x, y), repeats, warmup=3)
    return rows


def main():
    parser = argparse.ArgumentParser(description="DEQ fusion benchmark.")
    report.add_option(parser)
    parser.add_argument("--out", default="benchmarks/results/deq_bench.json")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and training epochs")
    parser.add_argument("--jacobian-weight", type=float, default=0.1,
                        help="Jacobian regularisation of the model the solvers are measured on")
    parser.add_argument("--models", type=int, default=3,
                        help="models trained from seeds 0..N-1 whose solver steps are counted (default 3)")
    parser.add_argument("--child-memory", nargs=2, metavar=("BACKWARD", "ITERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_memory:
        print(train_step_peak_memory(args.child_memory[0], int(args.child_memory[1])))
        return

    repeats = 3 if args.quick else 10
    machine = describe_machine()
    print(f"machine: {machine}", flush=True)
    train_epochs = 3 if args.quick else 8
    solvers = measure_solvers(repeats, train_epochs=train_epochs, jacobian_weight=args.jacobian_weight)
    other_models = measure_other_models(range(1, args.models), train_epochs, args.jacobian_weight)
    work = measure_solver_work(repeats)
    memory = measure_memory()
    xla = measure_xla(repeats)
    results = {"machine": machine, "width": WIDTH, "modalities": MODALITIES, "batch": BATCH,
               **solvers, "other_models": other_models, "solver_work": work, "train_step_peak_mib": memory, "train_step_ms": xla}

    print(f"\nModel trained {solvers['train_epochs']} epochs with jacobian_weight={solvers['jacobian_weight']}, "
          f"training accuracy {solvers['train_accuracy']:.3f}, held-out accuracy {solvers['trained_accuracy']:.3f}")
    print(f"One update evaluation inside a loop: {solvers['f_eval_ms']:.2f} ms, {solvers['f_eval_ms_xla']:.2f} ms under XLA; "
          f"each solver runs up to {solvers['max_iter']} steps")
    print("median over the batch of the steps until a sample's relative residual reaches a threshold "
          f"({solvers['max_iter'] + 1}: never)")
    heads = [f"<={t:g}" for t in THRESHOLDS]
    print(f"{'solver':<12} " + " ".join(f"{h:>7}" for h in heads)
          + f" {'conv 1e-4':>10} {'steps run':>10} {'max res':>9} {'forward ms':>11} {'overhead':>9} {'XLA ms':>8} {'XLA overhead':>13}")
    for name, row in solvers["solvers"].items():
        cells = " ".join(f"{row[f'median_steps_{t:g}']:>7.0f}" for t in THRESHOLDS)
        print(f"{name:<12} {cells} {row['converged_fraction_1e-4']:>10.3f} {row['steps_run']:>10} {row['max_residual']:>9.1e} "
              f"{row['forward_ms']:>11.1f} {row['overhead']:>9.2f} {row['forward_ms_xla']:>8.1f} {row['overhead_xla']:>13.2f}")
    print("\n90th percentile over the batch / the whole batch (its slowest sample) of the same counts")
    print(f"{'solver':<12} " + " ".join(f"{h:>13}" for h in heads))
    for name, row in solvers["solvers"].items():
        print(f"{name:<12} " + " ".join(
            f"{row[f'p90_steps_{t:g}']:>6.0f} / {row[f'batch_steps_{t:g}']:>4}" for t in THRESHOLDS))
    fp, aa = solvers["solvers"]["fixed_point"], solvers["solvers"]["anderson"]
    never = solvers["max_iter"] + 1

    def ratio(anderson, fixed_point):
        # A fixed-point count of `never` is a lower bound, so the ratio is an upper bound.
        return ("<= " if fixed_point >= never else "") + f"{anderson / fixed_point:.2f}"

    for kind in ("median", "p90", "batch"):
        ratios = ", ".join(ratio(aa[f"{kind}_steps_{t:g}"], fp[f"{kind}_steps_{t:g}"]) for t in THRESHOLDS)
        print(f"anderson / fixed_point {kind} steps to residual {', '.join(f'{t:g}' for t in THRESHOLDS)}: "
              f"{ratios} (target <= 0.5; '<=': fixed_point never got there)")
    models = {"0": {"held_out_accuracy": solvers["trained_accuracy"], **solvers["solvers"]}, **other_models}
    print(f"\nsteps to relative residual 1e-4 on models trained from different seeds "
          f"(seed 0 is the model above; {never}: never)")
    print(f"{'seed':>4} {'held-out acc':>13} {'fixed_point median/batch':>25} {'anderson median/batch':>22} "
          f"{'anderson/fixed_point median/batch':>34}")
    for seed, row in models.items():
        fp, aa = ((row[s]["median_steps_0.0001"], row[s]["batch_steps_0.0001"]) for s in ("fixed_point", "anderson"))
        ratios = " / ".join(ratio(a, f) for a, f in zip(aa, fp))
        print(f"{seed:>4} {row['held_out_accuracy']:>13.3f} {fp[0]:>16.0f} / {fp[1]:>6} "
              f"{aa[0]:>13.0f} / {aa[1]:>6} {ratios:>34}")
    linear = solvers["linearised"]
    print(f"\nsteps to relative residual 1e-4 on the seed-0 update linearised at its fixed point, "
          f"first {len(linear)} samples ({never}: never)")
    print(f"{'sample':>6} {'spectral radius':>16} {'fixed_point':>12} {'GMRES':>6} {'GMRES/fixed_point':>18}")
    for i, row in enumerate(linear):
        print(f"{i:>6} {row['spectral_radius']:>16.3f} {row['plain']:>12} {row['gmres']:>6} "
              f"{ratio(row['gmres'], row['plain']):>18}")
    bound = [row["gmres"] / row["plain"] for row in linear]
    print(f"GMRES / fixed_point: median {np.median(bound):.2f}, range {min(bound):.2f}-{max(bound):.2f}. On a linear "
          "map no Anderson or Broyden variant takes fewer steps than GMRES.")
    print(f"\nms per step of a {work['steps']}-step loop with the cheap update 0.9 tanh(z) + x at the same batch and "
          f"width; '+' rows add Anderson's history operations (memory {work['memory']}) to the row scaling")
    print(f"{'part':<26} {'no XLA':>8} {'XLA':>8}")
    for name, row in work["ms_per_step"].items():
        print(f"{name:<26} {row['no_xla']:>8.3f} {row['xla']:>8.3f}")
    parts = work["ms_per_step"]
    for key, label, suffix in (("no_xla", "no XLA", ""), ("xla", "XLA", "_xla")):
        f_ms = solvers[f"f_eval_ms{suffix}"]
        own = {s: parts[f"{s} solve"][key] - parts["update alone"][key] for s in ("fixed_point", "anderson")}
        measured = {s: solvers["solvers"][s][f"overhead{suffix}"] for s in own}
        print(f"{label}: a solver's own work per step (solve - update alone): fixed_point {own['fixed_point']:.2f} ms, "
              f"anderson {own['anderson']:.2f} ms; 1 + that / the trained update's {f_ms:.2f} ms: "
              f"{1 + own['fixed_point'] / f_ms:.2f} and {1 + own['anderson'] / f_ms:.2f} "
              f"(measured overhead above: {measured['fixed_point']:.2f} and {measured['anderson']:.2f})")
    print(f"\n{'train step peak alloc (MiB)':<28} {'10 it':>8} {'30 it':>8} {'100 it':>8} {'100/10':>7}")
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
    report.run(main, "deq_bench")
