"""Where the time of a DEQ fusion training step goes, under XLA.

    python benchmarks/deq_profile.py [--repeats 20] [--json FILE] [--record]

The setting of the comparison with the paper's code (issue #43): batch 245, 3 modalities
of width 256, 4 GroupNorm groups, Anderson with 30 forward and 31 adjoint steps (an
absolute tolerance no solve meets), the Jacobian penalty with weight 20 and 2 probes,
cross-entropy through a Dense head, Adam.

XLA compiles a training step into one executable, so TensorFlow's profiler sees one op
for it. The parts are therefore timed as XLA functions of their own, each alternately
with the whole step (``timing.median_ratio``), on the same layer, weights and inputs:

- ``update``: the 30 evaluations of the update ``f`` a forward solve makes, in a bare
  loop (no solver): the forward pass's floor;
- ``forward solve``: the Anderson solve itself (30 evaluations plus Anderson's work),
  and plain iteration's;
- ``  of which GroupNorm``: the update's 10 GroupNorms, 30 times;
- ``adjoint VJPs``: the 31 vector-Jacobian products ``g -> J^T g`` the adjoint solve
  makes, in a bare loop: the backward pass's floor;
- ``adjoint solve``: the Anderson solve of ``g = J^T g + v`` (31 products plus
  Anderson's work);
- ``penalty``: the Hutchinson estimate with 2 probes at ``z*`` and its gradient with
  respect to the weights (second derivatives of ``f``);
- ``weight gradient``: the last product ``g^T df/d(x, theta)``;
- ``optimizer``: Adam's update of every variable.

Each part's share is its time over the step's; the parts overlap (the forward solve
holds the update), so the shares of the rows marked as parts of another do not add.
``floor`` is the update evaluations and products alone (forward 30, adjoint 31, plus
the one at ``z*``): the time no solver can go below. The solver overheads are each
solve timed alternately with its own evaluations in a bare loop (the median ratio).
"""

import argparse
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from timing import machine, median_ratio, median_seconds  # noqa: E402
import report  # noqa: E402

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

BATCH, WIDTH, MODALITIES, FORWARD, BACKWARD = 245, 256, 3, 30, 31


def build():
    import keras
    import numpy as np

    import keras_mmfusion as mmf
    from keras_mmfusion.equilibrium import ImplicitAdjoint

    keras.utils.set_random_seed(0)
    inputs = [keras.Input((WIDTH,)) for _ in range(MODALITIES)]
    fusion = mmf.DEQFusion(WIDTH, max_iter=FORWARD, tol=1e-30, stop_mode="abs", num_groups=4,
                           backward=ImplicitAdjoint(max_iter=BACKWARD, tol=1e-30, stop_mode="abs"),
                           jacobian_weight=20.0, jacobian_probes=2, name="deq")
    model = keras.Model(inputs, keras.layers.Dense(2)(fusion(inputs)))
    rng = np.random.default_rng(0)
    x = [rng.normal(size=(BATCH, WIDTH)).astype("float32") for _ in range(MODALITIES)]
    y = rng.integers(0, 2, BATCH)
    return model, fusion, x, y


def parts(model, fusion, x, y):
    """``{name: zero-argument XLA function}`` for the step and each of its parts."""
    import keras
    import tensorflow as tf

    from keras_mmfusion.equilibrium import get_solver, solve_adjoint
    from keras_mmfusion.equilibrium.jacobian import jacobian_norm_from_vjp

    optimizer = keras.optimizers.Adam(1e-4)
    optimizer.build(model.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    xs = [tf.constant(a) for a in x]
    labels = tf.constant(y)
    args, z0 = fusion._injections(xs)
    f = lambda z: fusion._equilibrium_map(z, args)  # noqa: E731
    anderson, plain = get_solver("anderson"), get_solver("fixed_point")
    z_star = anderson(f, z0, max_iter=FORWARD, tol=1e-30, stop_mode="abs")[0]
    probes = tf.random.normal((2,) + tuple(z0.shape), seed=1)
    v = tf.random.normal(z0.shape, seed=2)
    weights = fusion.trainable_variables
    norms = [n for block in fusion.modality_blocks for n in (block.norm1, block.norm2, block.norm3)]
    norms.append(fusion.fusion_block.norm)
    state = tf.split(z_star, MODALITIES + 1, axis=-1)[0]

    def linearised():
        with tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
            tape.watch(z_star)
            fz = f(z_star)
        return fz, tape

    def bare_loop(body, n, start):
        return tf.while_loop(lambda k, s: k < n, lambda k, s: (k + 1, body(s)), (tf.constant(0), start))[1]

    def step():
        with tf.GradientTape() as tape:
            logits = model(xs, training=True)
            loss = loss_fn(labels, logits) + tf.add_n(model.losses)
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return loss

    def adjoint_vjps():
        fz, tape = linearised()
        return bare_loop(lambda g: tape.gradient(fz, z_star, output_gradients=g) + v, BACKWARD, v)

    def adjoint_solve():
        fz, tape = linearised()
        vjp = lambda g: tape.gradient(fz, z_star, output_gradients=g)  # noqa: E731
        return solve_adjoint(anderson, vjp, v, max_iter=BACKWARD, tol=1e-30, stop_mode="abs")[0]

    def penalty():
        with tf.GradientTape() as outer:
            fz, tape = linearised()
            value = jacobian_norm_from_vjp(lambda e: tape.gradient(fz, z_star, output_gradients=e), z_star, probes)
        return outer.gradient(value, weights)

    def weight_gradient():
        with tf.GradientTape() as tape:
            fz = f(z_star)
        return tape.gradient(fz, weights, output_gradients=v)

    def optimizer_step():
        optimizer.apply_gradients(zip([tf.zeros_like(w) for w in model.trainable_variables],
                                      model.trainable_variables))
        return tf.constant(0.0)

    def groupnorm():
        def ten(s):
            for norm in norms:
                s = norm(s)
            return s

        return bare_loop(ten, FORWARD, state)

    functions = {
        "training step": step,
        "update (30 evaluations)": lambda: bare_loop(f, FORWARD, z0),
        "forward solve (Anderson 30)": lambda: anderson(f, z0, max_iter=FORWARD, tol=1e-30, stop_mode="abs")[0],
        "forward solve (plain 30)": lambda: plain(f, z0, max_iter=FORWARD, tol=1e-30, stop_mode="abs")[0],
        "  of which GroupNorm (10 x 30)": groupnorm,
        "adjoint VJPs (31 products)": adjoint_vjps,
        "adjoint solve (Anderson 31)": adjoint_solve,
        "penalty (2 probes) + its gradient": penalty,
        "weight gradient (1 product)": weight_gradient,
        "optimizer (Adam)": optimizer_step,
    }
    return {name: tf.function(fn, jit_compile=True) for name, fn in functions.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", default=os.path.join(RESULTS_DIR, "deq_profile.json"))
    report.add_option(parser)
    args = parser.parse_args()
    with report.unrecorded():
        model, fusion, x, y = build()
        functions = parts(model, fusion, x, y)
        step = functions.pop("training step")
        step_s = median_seconds(step, args.repeats, warmup=3)
        rows = {}
        for name, fn in functions.items():
            ratio, seconds = median_ratio(fn, step, args.repeats, warmup=3)
            rows[name] = {"ms": 1e3 * seconds, "share": ratio}
        # Each solve timed alternately with its own evaluations in a bare loop.
        pairs = {
            "anderson": ("forward solve (Anderson 30)", "update (30 evaluations)"),
            "plain": ("forward solve (plain 30)", "update (30 evaluations)"),
            "adjoint anderson": ("adjoint solve (Anderson 31)", "adjoint VJPs (31 products)"),
        }
        overheads = {name: median_ratio(functions[a], functions[b], args.repeats)[0] for name, (a, b) in pairs.items()}
    print(f"DEQ fusion training step under XLA: batch {BATCH}, width {WIDTH}, {MODALITIES} modalities, "
          f"Anderson {FORWARD} forward / {BACKWARD} adjoint steps, Jacobian penalty 20 x 2 probes")
    print(f"{'part':<38}{'ms':>9}{'share of step':>15}")
    print(f"{'training step':<38}{1e3 * step_s:>9.1f}{1.0:>15.2f}")
    for name, row in rows.items():
        print(f"{name:<38}{row['ms']:>9.1f}{row['share']:>15.2f}")
    floor = (rows["update (30 evaluations)"]["share"] + rows["adjoint VJPs (31 products)"]["share"]
             + rows["weight gradient (1 product)"]["share"])
    print(f"floor (30 updates + 31 products + 1 weight product): {floor:.2f} of the step")
    print("solver overhead (solve / its evaluations alone): "
          + ", ".join(f"{name} {value:.2f}" for name, value in overheads.items()))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"step_ms": 1e3 * step_s, "parts": rows, "floor_share": floor, "overheads": overheads,
                   "machine": machine()}, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    report.run(main, "deq_profile")
