"""The loop shared by every fixed-point solver.

A solver is described by two functions, ``init(z0) -> state`` and
``step(z, fz, g, state, k) -> (z_next, state)``, where ``g = fz - z`` is the
residual vector the loop has already computed. :func:`iterate` runs them inside one
``tf.while_loop`` with static shapes and a bounded iteration count. It keeps the
lowest-residual iterate of every sample and returns it together with a
:class:`SolverStats` record, so a solver step only has to propose the next point. A
sample whose proposal is not finite (a NaN or an infinity in it, or a row whose sum
overflows) restarts from its best iterate; a sample that never had a finite residual
returns NaN.
"""

from typing import NamedTuple

import tensorflow as tf

from keras_mmfusion._internals import gpu_visible, in_xla_context
from keras_mmfusion._checks import check_choice, check_solver_arguments, check_state
from keras_mmfusion.defaults import STOP_MODES

# Added to ||f(z)|| in the relative residual so that a zero state does not divide by zero.
_REL_EPS = 1e-5


class SolverStats(NamedTuple):
    """What a solve reports besides the solution.

    Attributes:
        steps: int32 scalar, the number of evaluations of ``f`` made in the forward solve.
        residual: ``(batch,)`` residual of the returned iterate of each sample,
            in the solve's ``stop_mode``.
        converged: ``(batch,)`` bool, ``residual <= tol``.
        trace: ``(max_iter,)`` mean residual over the batch after each evaluation of ``f``;
            entries at and beyond ``steps`` are zero.
        jacobian: the Hutchinson estimate of ``||J_f(z*)||_F^2 / dim`` at the solution,
            differentiable with respect to the variables ``f`` reads, when
            :func:`~keras_mmfusion.equilibrium.fixed_point_solve` was given
            ``jacobian_probes``; otherwise ``None``.
    """

    steps: tf.Tensor
    residual: tf.Tensor
    converged: tf.Tensor
    trace: tf.Tensor
    jacobian: tf.Tensor = None


def internal_dtype(dtype):
    """The dtype that solver state and small linear algebra are kept in.

    float64 stays float64 (gradient checks need it); every other floating dtype,
    float16 and bfloat16 under mixed precision included, is upcast to float32.
    """
    return tf.float64 if tf.as_dtype(dtype) == tf.float64 else tf.float32


def skipped_stats(z, length):
    """The ``SolverStats`` of a solve that did not run: 0 steps, every sample converged,
    a zero ``trace`` of ``length`` entries."""
    dtype = internal_dtype(z.dtype)
    batch = tf.shape(z)[:1]
    return SolverStats(
        steps=tf.constant(0),
        residual=tf.zeros(batch, dtype),
        converged=tf.ones(batch, tf.bool),
        trace=tf.zeros([length], dtype),
    )


def unrolled_stats(f, z, steps, trace, tol, stop_mode):
    """The ``SolverStats`` of ``steps`` plain iterations of ``f`` ending at ``z``: the
    residual of ``z`` (one more evaluation of ``f``) and the given ``trace``, both off
    every tape."""
    res = tf.cast(tf.stop_gradient(residual_norm(z, f(z), stop_mode)), trace.dtype)
    return SolverStats(
        steps=tf.constant(steps),
        residual=res,
        converged=res <= tf.cast(tol, res.dtype),
        trace=tf.stop_gradient(trace),
    )


# The machine epsilon of each floating dtype an update can compute in.
EPSILON = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-23, "float64": 2.0**-52}
# A relative residual below this many epsilons of the update's compute dtype is rounding.
RESOLVABLE_EPSILONS = 8


def resolvable_tol(tol, stop_mode, compute_dtype):
    """The tolerance a solve can reach when its update computes in ``compute_dtype``.

    An update evaluated in float16 or bfloat16 returns iterates rounded to that dtype,
    so the relative residual cannot fall much below its epsilon, however long the
    solve runs. For ``stop_mode="rel"`` the tolerance is raised to
    ``RESOLVABLE_EPSILONS`` epsilons (7.8e-3 for float16, 6.3e-2 for bfloat16);
    absolute residuals scale with the state and are left as they are.
    """
    if stop_mode != "rel":
        return tol
    return max(tol, RESOLVABLE_EPSILONS * EPSILON.get(tf.as_dtype(compute_dtype).name, 0.0))


def residual_norm(z, fz, stop_mode):
    """Per-sample residual of ``z`` for the map ``f`` with ``fz = f(z)``.

    ``"abs"`` is ``||f(z) - z||``; ``"rel"`` divides it by ``||f(z)|| + 1e-5``.
    Both arguments are ``(batch, dim)``; the result is ``(batch,)``.
    Non-finite residuals (a diverged sample) are reported as +inf, so they compare
    as worse than any finite iterate and never count as converged.
    """
    return _residual(fz - z, fz, stop_mode)


def _residual(g, fz, stop_mode):
    """:func:`residual_norm` from the residual vector ``g = f(z) - z``."""
    diff = tf.sqrt(row_sum(tf.square(g)))
    size = tf.sqrt(row_sum(tf.square(fz)))
    if stop_mode == "abs":
        res = diff
    elif stop_mode == "rel":
        res = diff / (size + tf.cast(_REL_EPS, fz.dtype))
    else:
        check_choice("stop_mode", stop_mode, STOP_MODES)
    # An overflowing ||f(z)|| would otherwise make the relative residual zero.
    finite = tf.logical_and(tf.math.is_finite(res), tf.math.is_finite(size))
    return tf.where(finite, res, tf.cast(float("inf"), res.dtype))


def _sums_by_product():
    """Whether :func:`row_sum` multiplies by a ones vector instead of reducing.

    Only in a graph compiled by XLA for a CPU. There XLA emits a scalar loop for a
    reduction over the last axis and a vectorised kernel for a matrix-vector product,
    so the product is faster. Without XLA the product gains nothing. GPUs reduce quickly, and with
    TensorFloat-32 enabled (TensorFlow's default) a product would round every term to
    10 mantissa bits, so where a GPU is visible the sums stay reductions.
    """
    return in_xla_context() and not gpu_visible()


def row_sum(x):
    """``(batch,)``: the sum of each row of a ``(batch, dim)`` tensor.

    The per-sample sums of the solvers (residual norms, dot products with stored
    iterates, finiteness checks) all go through here; see :func:`_sums_by_product`
    for how they are computed. A row holding a NaN or an infinity sums to a
    non-finite value either way.
    """
    if not _sums_by_product():
        return tf.reduce_sum(x, axis=-1)
    ones = tf.ones([x.shape[-1], 1], x.dtype)
    return tf.squeeze(tf.matmul(x, ones), axis=-1)


def select_rows(condition, x, y):
    """Row ``i`` of ``x`` where ``condition[i]``, else row ``i`` of ``y``.

    ``condition`` is ``(batch,)``. Under XLA, the rank-1 form of ``Select``, which
    picks whole rows; a broadcast ``tf.where`` expands the condition to ``x``'s shape
    first, which XLA then materialises. Elsewhere the broadcast
    form, since a graph built without XLA may be exported: tf2onnx lowers the rank-1
    form to arithmetic on both operands, so a NaN in the row not chosen (a sample
    with a non-finite input) would spread to every row of the ONNX result.
    """
    if in_xla_context():
        return tf.compat.v1.where(condition, x, y)
    return tf.where(tf.expand_dims(condition, -1), x, y)


def finite_or(value, fallback):
    """Row ``i`` of ``value`` where it sums to a finite number, else row ``i`` of ``fallback``.

    A row with a NaN or an infinite entry has a non-finite sum; so does a finite row
    whose sum overflows, which is as unusable as a step.
    """
    return select_rows(tf.math.is_finite(row_sum(value)), value, fallback)


@tf.autograph.experimental.do_not_convert
def iterate(f, z0, init, step, max_iter, tol, stop_mode):
    """Run a solver described by ``init`` and ``step`` on ``z = f(z)``.

    Args:
        f: maps a ``(batch, dim)`` tensor to one of the same shape.
        z0: the starting point, ``(batch, dim)``.
        init: ``init(z0) -> state``, the solver's loop state (a nest of tensors).
        step: ``step(z, fz, g, state, k) -> (z_next, state)`` with ``g = fz - z``.
        max_iter: the largest number of evaluations of ``f``.
        tol: stop once every sample's residual is at most ``tol``.
        stop_mode: ``"abs"`` or ``"rel"``.

    Returns:
        ``(z, stats)``: the lowest-residual iterate of each sample, in ``z0``'s dtype
        (NaN for a sample without a finite residual), and a :class:`SolverStats`.
    """
    check_solver_arguments(max_iter, tol, stop_mode)
    z0 = check_state(z0)
    out_dtype = z0.dtype
    dtype = internal_dtype(out_dtype)

    def f_internal(z):
        # f may lose the static batch size (e.g. inputs traced with an unknown batch);
        # the loop variables must keep the shape they entered the loop with.
        return tf.ensure_shape(tf.cast(f(tf.cast(z, out_dtype)), dtype), z.shape)

    z = tf.cast(z0, dtype)
    tol_t = tf.cast(tol, dtype)
    # No sample has a best iterate yet. The largest finite value stands for "none":
    # tf2onnx converts a fill with +inf to one with a finite value, after which no
    # residual would count as better than "none".
    # Only a finite residual can beat it, and a sample that never had one reports +inf.
    none_yet = tf.cast(dtype.max, dtype)
    loop_vars = (tf.constant(0), z, z, tf.fill(tf.shape(z)[:1], none_yet), tf.zeros([max_iter], dtype), init(z))

    def cond(k, z, best_z, best_res, trace, state):
        return tf.logical_not(tf.reduce_all(best_res <= tol_t))

    def body(k, z, best_z, best_res, trace, state):
        # Evaluate the point the previous step proposed, keep it if it is a sample's
        # best so far, then propose the next one. The loop carries only the point to
        # evaluate: a loop that also carries f(z) makes XLA copy the state twice per
        # step.
        fz = f_internal(z)
        g = fz - z
        res = _residual(g, fz, stop_mode)
        better = res < best_res
        best_z = select_rows(better, z, best_z)
        best_res = tf.where(better, res, best_res)
        trace = tf.tensor_scatter_nd_update(trace, [[k]], [tf.reduce_mean(res)])
        z_next, state = step(z, fz, g, state, k)
        # A sample whose proposal is not finite restarts from its best iterate. Taking
        # the fallback from the best-iterate select also makes the proposal depend on
        # every use of z, so XLA can write the proposal into z's loop buffer instead of
        # copying z at every step.
        z_next = finite_or(z_next, best_z)
        return k + 1, z_next, best_z, best_res, trace, state

    # Each iteration needs the previous one's state, so overlapping iterations gains no
    # speed; it only lets a step's temporaries outlive it, making peak memory depend on
    # scheduling. The last iteration's proposal is never evaluated: one step of solver
    # work per solve, against carrying f(z) through every step.
    steps, _, best_z, best_res, trace, _ = tf.while_loop(
        cond, body, loop_vars, maximum_iterations=max_iter, parallel_iterations=1
    )
    # A sample that never had a finite residual (a non-finite input, or an update that
    # overflows) has no usable iterate: it returns NaN, never its starting point, which
    # would pass for an answer downstream.
    # A NaN scalar, broadcast: tf2onnx exports a Fill with a non-finite value wrongly.
    found = best_res < none_yet
    best_z = tf.where(tf.expand_dims(found, -1), best_z, tf.constant(float("nan"), dtype))
    best_res = tf.where(found, best_res, tf.cast(float("inf"), dtype))
    stats = SolverStats(
        steps=steps,
        residual=best_res,
        converged=best_res <= tol_t,
        trace=trace,
    )
    return tf.cast(best_z, out_dtype), stats
