"""The Anderson acceleration of the DEQ reference code, as the DEQ-fusion paper trains with it.

The deep-equilibrium code of Bai et al. (locuslab/deq), which the official DEQ-fusion
code of Ni et al. (arXiv 2306.16645) uses for its forward and adjoint solves, differs
from :func:`~keras_mmfusion.equilibrium.anderson_solve` in ways that decide what a model
trains on when its solves do not converge (the DEQ-fusion ROSMAP recipe's do not):

- the residual is one norm over the whole batch, ``||F - X||`` (``"abs"``) or
  ``||F - X|| / (||F|| + 1e-5)`` (``"rel"``); the solve stops when it falls below
  ``tol``, and returns the iterate ``X`` with the lowest such residual, one step for the
  whole batch;
- the first two evaluations (``X_0 = z0`` and ``X_1 = f(z0)``) are plain and are never
  returned, so a zero start is never the answer;
- the mixing weights minimise ``||sum_j alpha_j G_j||^2 + ridge ||alpha||^2`` over the
  raw residuals ``G_j`` (an absolute ridge), per sample.

It is registered as ``"reference_anderson"`` and keeps the registry's signature, so
``DEQFusion(solver="reference_anderson")`` and
``ImplicitAdjoint(solver="reference_anderson", start="zero")`` reproduce those solves.
Non-finite iterates are not guarded against, as in the reference code.
"""

import tensorflow as tf

from keras_mmfusion._checks import check_fraction, check_int, check_positive, check_solver_arguments, check_state
from keras_mmfusion.defaults import MAX_ITER, STOP_MODE, TOL
from keras_mmfusion.equilibrium.iteration import _REL_EPS, SolverStats, internal_dtype, residual_norm
from keras_mmfusion.equilibrium.solvers import _spd_solve, register_solver

# Evaluations before the first Anderson step: X_0 = z0 and X_1 = f(z0).
PLAIN_STEPS = 2


def _batch_residual(x, fx, stop_mode):
    diff = tf.norm(fx - x)
    return diff if stop_mode == "abs" else diff / (tf.norm(fx) + tf.cast(_REL_EPS, x.dtype))


@register_solver("reference_anderson")
def reference_anderson_solve(f, z0, *, max_iter=MAX_ITER, tol=TOL, stop_mode=STOP_MODE, memory=6, ridge=1e-4,
                             mixing=1.0):
    """Anderson acceleration as in the DEQ reference code (see the module's docstring).

    Args:
        f: maps ``(batch, dim)`` to ``(batch, dim)``.
        z0: the starting point.
        max_iter: the number of evaluations of ``f`` at most, at least 3.
        tol: stop once the whole batch's residual is below ``tol``.
        stop_mode: ``"abs"`` or ``"rel"``, of the whole batch's residual.
        memory: history size m (the reference code's default is 6).
        ridge: the absolute Tikhonov term added to the residuals' Gram matrix.
        mixing: the mixing parameter beta in ``(0, 1]``.

    Returns:
        ``(z, stats)``: the iterate with the lowest batch residual from the third
        evaluation on. ``stats.residual`` holds each sample's residual at that iterate,
        ``stats.converged`` whether the batch's residual there is below ``tol``, and
        ``stats.trace`` the mean of the samples' residuals after each evaluation.
    """
    check_solver_arguments(max_iter, tol, stop_mode)
    check_int("max_iter", max_iter, minimum=PLAIN_STEPS + 1)
    check_int("memory", memory, minimum=PLAIN_STEPS)
    check_fraction("mixing", mixing)
    check_positive("ridge", ridge)
    z0 = check_state(z0)
    out_dtype, dtype = z0.dtype, internal_dtype(z0.dtype)

    def f_internal(z):
        return tf.ensure_shape(tf.cast(f(tf.cast(z, out_dtype)), dtype), z.shape)

    x0 = tf.cast(z0, dtype)
    f0 = f_internal(x0)
    f1 = f_internal(f0)
    trace = tf.zeros([max_iter], dtype)
    trace = tf.tensor_scatter_nd_update(
        trace, [[0], [1]], [tf.reduce_mean(residual_norm(x0, f0, stop_mode)),
                            tf.reduce_mean(residual_norm(f0, f1, stop_mode))])
    batch = tf.shape(x0)[0]
    # Slot-major history (memory, batch, dim): slot k % memory holds the k-th pair.
    unused = tf.zeros([memory - PLAIN_STEPS, batch, x0.shape[1]], dtype)
    xs = tf.concat([tf.stack([x0, f0]), unused], 0)
    fs = tf.concat([tf.stack([f0, f1]), unused], 0)
    eye = tf.eye(memory, dtype=dtype)
    inf = tf.cast(dtype.max, dtype)

    def cond(k, xs, fs, best_x, best_res, best_samples, trace, done):
        return tf.logical_not(done)

    def body(k, xs, fs, best_x, best_res, best_samples, trace, done):
        valid = tf.cast(tf.range(memory) < tf.minimum(k, memory), dtype)
        gs = tf.transpose(fs - xs, [1, 0, 2])  # (batch, memory, dim)
        gram = tf.matmul(gs, gs, transpose_b=True) * valid[:, None] * valid[None, :] + ridge * eye
        y = _spd_solve(gram, tf.broadcast_to(valid, [batch, memory]))
        alpha = y / tf.reduce_sum(y, axis=-1, keepdims=True)
        x_next = tf.einsum("bm,mbd->bd", alpha, fs)
        if mixing < 1:
            x_next = mixing * x_next + (1.0 - mixing) * tf.einsum("bm,mbd->bd", alpha, xs)
        f_next = f_internal(x_next)
        slot = tf.math.floormod(k, memory)
        xs = tf.tensor_scatter_nd_update(xs, [[slot]], x_next[None])
        fs = tf.tensor_scatter_nd_update(fs, [[slot]], f_next[None])
        res = _batch_residual(x_next, f_next, stop_mode)
        samples = residual_norm(x_next, f_next, stop_mode)
        better = res < best_res
        best_x = tf.where(better, x_next, best_x)
        best_res = tf.where(better, res, best_res)
        best_samples = tf.where(better, samples, best_samples)
        trace = tf.tensor_scatter_nd_update(trace, [[k]], [tf.reduce_mean(samples)])
        return k + 1, xs, fs, best_x, best_res, best_samples, trace, res < tf.cast(tol, dtype)

    loop_vars = (tf.constant(PLAIN_STEPS), xs, fs, tf.zeros_like(x0), inf, tf.fill([batch], inf), trace,
                 tf.constant(False))
    # steps counts the evaluations made: the plain ones and one per loop iteration.
    steps, _, _, best_x, best_res, best_samples, trace, _ = tf.while_loop(
        cond, body, loop_vars, maximum_iterations=max_iter - PLAIN_STEPS, parallel_iterations=1
    )
    stats = SolverStats(steps=steps, residual=best_samples, converged=tf.fill([batch], best_res < tf.cast(tol, dtype)),
                        trace=trace)
    return tf.cast(best_x, out_dtype), stats


# The reference code never returns X_0, so an adjoint solve may start it at zero.
reference_anderson_solve.never_returns_start = True
