"""Implicit gradients at every loss scale: the adjoint solve's stopping rule, measured.

The map is ``z = A z + x`` with ``||A||_2 = 0.6`` (float32, 4 samples of 6 features), the
loss ``c * sum(z*)``, so ``dL/dx = c (I - A^T)^{-1} 1`` for every sample at every scale
``c``. Each row solves with one solver and one forward stop mode at ``tol=1e-3`` and the
backward settings left at their defaults; each column gives, for one ``c``, the largest
per-sample relative error of ``dL/dx / c``, or ``zero`` where a sample's gradient came
back exactly zero. A gradient that is linear in the loss has the same error in every
column. A layer with the ROSMAP reference recipe's solver settings is measured the same
way (its input gradient at ``c`` against ``c = 1``).

    python benchmarks/adjoint_scale.py [--json FILE]
"""

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_mmfusion.equilibrium import fixed_point_solve  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import machine  # noqa: E402
import report  # noqa: E402

SCALES = [1e-6, 1e-4, 1e-2, 1.0, 1e2]


def linear_errors(solver, stop_mode):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6))
    a = 0.6 * a / np.linalg.norm(a, 2)
    a_t = tf.constant(a.T, tf.float32)
    x = tf.constant(rng.normal(size=(4, 6)), tf.float32)
    exact = np.linalg.solve(np.eye(6) - a.T, np.ones(6))
    errors = []
    for scale in SCALES:
        with tf.GradientTape() as tape:
            tape.watch(x)
            z, _ = fixed_point_solve(lambda z, x: z @ a_t + x, x, tf.zeros_like(x), solver=solver, tol=1e-3,
                                     stop_mode=stop_mode)
            loss = scale * tf.reduce_sum(z)
        grad = tape.gradient(loss, x).numpy() / scale
        zero = not np.all(np.any(grad != 0, axis=-1))
        errors.append(None if zero else float(np.max(np.linalg.norm(grad - exact, axis=-1) / np.linalg.norm(exact))))
    return errors


def layer_errors():
    """DEQFusion with the reference recipe's solver settings: input gradients of
    ``c * mean(sum(out * w))`` divided by ``c``, against ``c = 1``."""
    import keras

    from keras_mmfusion.layers import DEQFusion
    from keras_mmfusion.training import REFERENCE_RECIPE

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    inputs = [tf.constant(rng.normal(size=(32, 16)), tf.float32) for _ in range(3)]
    layer = DEQFusion(units=16, **REFERENCE_RECIPE.fusion_options)
    weights = tf.constant(rng.normal(size=(32, 16)), tf.float32)

    def gradient(scale):
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            loss = scale * tf.reduce_mean(tf.reduce_sum(layer(inputs) * weights, axis=-1))
        return np.concatenate([g.numpy() / scale for g in tape.gradient(loss, inputs)], axis=-1)

    reference = gradient(1.0)
    errors = []
    for scale in SCALES:
        grad = gradient(scale)
        zero = not np.all(np.any(grad != 0, axis=-1))
        errors.append(None if zero else float(np.linalg.norm(grad - reference) / np.linalg.norm(reference)))
    return errors


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    report.add_option(parser)
    parser.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                        "adjoint_scale.json"))
    args = parser.parse_args()
    rows = {f"{solver} {mode}": linear_errors(solver, mode)
            for solver in ("fixed_point", "anderson", "broyden") for mode in ("abs", "rel")}
    rows["DEQFusion, recipe settings"] = layer_errors()
    cell = lambda e: "zero" if e is None else f"{e:.1e}"  # noqa: E731
    print(f"{'solver, forward stop mode':<28}" + "".join(f"{f'c={s:g}':>10}" for s in SCALES))
    for name, errors in rows.items():
        print(f"{name:<28}" + "".join(f"{cell(e):>10}" for e in errors))
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"scales": SCALES, "rows": rows, "machine": machine()}, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    report.run(main, "adjoint_scale")
