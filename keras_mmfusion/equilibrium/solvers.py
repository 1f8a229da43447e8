"""Forward fixed-point solvers and their registry.

Every solver has the signature
``solve(f, z0, *, max_iter, tol, stop_mode, **options) -> (z, SolverStats)``, with the
defaults of :mod:`keras_mmfusion.defaults`,
and finds ``z = f(z)`` for a ``(batch, dim)`` state. All of them run through
:func:`keras_mmfusion.equilibrium.iteration.iterate`, one bounded ``tf.while_loop``,
so they work eagerly, inside ``tf.function`` and under ``jit_compile=True``.
"""

import numpy as np
import tensorflow as tf

from keras_mmfusion._checks import check_fraction, check_int, check_positive
from keras_mmfusion.defaults import MAX_ITER, STOP_MODE, TOL

from keras_mmfusion.equilibrium.history import (
    CircularHistory,
    empty_buffer,
    slot_dots,
    weighted_sum,
    write_slot,
)
from keras_mmfusion.equilibrium.iteration import finite_or, iterate, row_sum, select_rows

_SOLVERS = {}


def register_solver(name, solve=None):
    """Register ``solve`` under ``name``; usable as a decorator."""

    def decorator(fn):
        # Solvers build their loops with tf.while_loop and branch on Python values only;
        # autograph conversion would re-run this decorator's body and is not needed.
        fn = tf.autograph.experimental.do_not_convert(fn)
        _SOLVERS[name] = fn
        return fn

    return decorator(solve) if solve is not None else decorator


def get_solver(name):
    """The solve function registered as ``name``."""
    if callable(name):
        return name
    if name not in _SOLVERS:
        raise ValueError(f"Unknown solver {name!r}; expected one of {sorted(_SOLVERS)}.")
    return _SOLVERS[name]


def available_solvers():
    """The registered solver names, sorted."""
    return sorted(_SOLVERS)


def _spd_solve(a, b):
    """Solve ``a x = b`` for a batch of small symmetric positive-definite ``(m, m)`` systems.

    Gauss-Jordan elimination on the augmented ``(batch, m, m + 1)`` matrix, unrolled
    over the static ``m``: each pivot is a handful of whole-matrix operations (slices, a
    division, a multiply-add), so the graph holds ``O(m)`` small ops and no
    linear-algebra kernel. ``tf.linalg.solve`` would do the same job, but its kernel has
    no TFLite builtin or ONNX counterpart, and this solve runs inside the exported
    solver loop. ``a`` is the ridge-regularised Gram matrix, whose eigenvalues are at
    least the ridge, so elimination without pivoting does not break down.

    The system is first scaled to a unit diagonal, ``(D a D) (x / D) = D b`` with
    ``D = diag(a)^(-1/2)``, which leaves ``x`` unchanged. Without it, float32 elimination
    loses most of its digits when the diagonal spans many orders of magnitude, as the raw
    Gram matrix of a solve whose residuals fall from hundreds to below one does: on the
    DEQ-fusion ROSMAP recipe's first step, the float32 gradients then lay 1e-3 to 3e-3
    from float64 ones, those of the official PyTorch code (a pivoted solve) 4e-6
    (``benchmarks/training_parity.py --precision``). The diagonal is a masked sum, since
    ``diag_part`` has no TFLite builtin.

    Args:
        a: ``(batch, m, m)``.
        b: ``(batch, m)``.

    Returns:
        ``(batch, m)``.
    """
    m = a.shape[-1]
    eye = tf.eye(m, dtype=a.dtype)
    scale = tf.math.rsqrt(tf.reduce_sum(a * eye, axis=-1))
    a = a * scale[:, :, None] * scale[:, None, :]
    aug = tf.concat([a, (b * scale)[:, :, None]], axis=-1)
    for j in range(m):
        # Scale pivot row j to a unit pivot, remove column j from every row, then put
        # the scaled row back in place of row j (which the removal zeroed).
        pivot_row = aug[:, j : j + 1, :] / aug[:, j : j + 1, j : j + 1]
        aug = aug + (eye[:, j : j + 1] - aug[:, :, j : j + 1]) * pivot_row
    return aug[:, :, m] * scale


@register_solver("fixed_point")
def fixed_point_iteration(f, z0, *, max_iter=MAX_ITER, tol=TOL, stop_mode=STOP_MODE, damping=1.0):
    """Damped fixed-point iteration ``z <- (1 - damping) z + damping f(z)``.

    Args:
        f: maps ``(batch, dim)`` to ``(batch, dim)``.
        z0: the starting point.
        max_iter: the largest number of evaluations of ``f``.
        tol: stop once every sample's residual is at most ``tol``.
        stop_mode: ``"abs"`` or ``"rel"`` residual.
        damping: the step fraction in ``(0, 1]``; 1 is plain iteration.

    Returns:
        ``(z, stats)``, the lowest-residual iterate and a ``SolverStats``.
    """
    check_fraction("damping", damping)

    def init(z):
        return tf.zeros([], z.dtype)

    def step(z, fz, g, state, k):
        if damping == 1:
            return fz, state
        return z + damping * g, state

    return iterate(f, z0, init, step, max_iter, tol, stop_mode)


@register_solver("anderson")
def anderson_solve(
    f, z0, *, max_iter=MAX_ITER, tol=TOL, stop_mode=STOP_MODE, memory=5, ridge=1e-4, mixing=1.0
):
    """Anderson acceleration (Walker & Ni, 2011), as used by deep equilibrium models.

    Keeps the last ``memory`` pairs ``(z_j, f(z_j))`` and chooses weights ``alpha``
    (summing to one) that minimise ``||sum_j alpha_j (f(z_j) - z_j)||``; the next
    point is ``mixing * sum alpha_j f(z_j) + (1 - mixing) * sum alpha_j z_j``.

    The ``memory x memory`` normal equations are scaled so that every stored residual
    has unit length and regularised with ``ridge * I``, so they are never singular and
    the ridge is relative to each residual's own size; they are solved by elimination
    in float32 (float64 for float64 states). A sample whose weights come out
    non-finite takes a plain ``f(z)`` step instead; one whose next point is not finite
    restarts from its best iterate, as in every solver. A step reads the history twice
    (the new Gram row and the weighted sum); the history is written by index, so that
    every runtime an exported model runs in iterates as TensorFlow does (see
    :mod:`keras_mmfusion.equilibrium.history`).

    Args:
        f, z0, max_iter, tol, stop_mode: as for :func:`fixed_point_iteration`.
        memory: history size m.
        ridge: Tikhonov term added to the scaled Gram matrix, relative to the
            squared length of each residual.
        mixing: the mixing parameter beta in ``(0, 1]``.

    Returns:
        ``(z, stats)``.
    """
    check_int("memory", memory)
    check_fraction("mixing", mixing)
    check_positive("ridge", ridge)

    history = CircularHistory(memory)

    def init(z):
        return (*history.empty(z), tf.zeros([tf.shape(z)[0], memory, memory], z.dtype))

    def step(z, fz, g, state, k):
        # The history keeps f(z_j) and the residuals g_j = f(z_j) - z_j; the Gram
        # matrix of the residuals gains one row and column per step.
        fs, gs, gram = state
        fs, gs = history.push(fs, gs, fz, g, k)
        gram = history.update_gram(gram, history.dots(gs, g), k)
        # Step k writes slot k % memory, so slots 0 .. min(k, memory - 1) are the written
        # ones. Slots not yet written hold zeros, so their rows are ridge * I and, with a
        # zero right-hand side (valid = 0 there), their weights are 0.
        valid = tf.cast(tf.range(memory) < tf.minimum(k + 1, memory), z.dtype)
        eye = tf.eye(memory, dtype=z.dtype)
        # Each residual is scaled to unit length (a diagonal scaling of the normal
        # equations), so the ridge is relative to every residual's own size. Scaling by
        # the largest one alone would let the oldest, largest residuals set the ridge:
        # with a long memory the newest residuals are orders of magnitude smaller, and
        # a ridge relative to the oldest swamps them. The diagonal is a masked sum,
        # since diag_part has no TFLite builtin.
        norms_sq = tf.reduce_sum(gram * eye, axis=-1)
        inv_norm = tf.math.rsqrt(tf.where(norms_sq > 0, norms_sq, tf.ones_like(norms_sq)))
        system = gram * inv_norm[:, :, None] * inv_norm[:, None, :] + ridge * eye
        y = _spd_solve(system, valid * inv_norm) * inv_norm
        alpha = y / tf.reduce_sum(y, axis=-1, keepdims=True)
        # A sample whose residuals are not finite gets non-finite weights; it takes a
        # plain step instead, f(z) with weight 1 on the newest entry.
        alpha = finite_or(alpha, tf.broadcast_to(history.newest(k, z.dtype), tf.shape(alpha)))
        # sum_j alpha_j z_j = sum_j alpha_j (f_j - g_j).
        z_next = history.combine(fs, alpha)
        if mixing < 1:
            z_next -= (1.0 - mixing) * history.combine(gs, alpha)
        return z_next, (fs, gs, gram)

    return iterate(f, z0, init, step, max_iter, tol, stop_mode)


@register_solver("broyden")
def broyden_solve(f, z0, *, max_iter=MAX_ITER, tol=TOL, stop_mode=STOP_MODE, memory=20):
    """Limited-memory Broyden's ("good") method on ``g(z) = f(z) - z = 0``.

    The inverse Jacobian of ``g`` is approximated as ``H = -I + sum_j u_j v_j^T`` with
    at most ``memory`` rank-one terms; when they are all used the approximation
    restarts from ``H = -I``. Each step is the
    full quasi-Newton step ``z <- z - H g(z)``; there is no line search. An update whose
    denominator ``v^T y`` is negligible relative to ``||v|| ||y||`` is skipped, and a
    sample whose step is not finite restarts from its best iterate.

    Args:
        f, z0, max_iter, tol, stop_mode: as for :func:`fixed_point_iteration`.
        memory: the number of rank-one terms kept.

    Returns:
        ``(z, stats)``.
    """
    check_int("memory", memory)

    def init(z):
        # The previous point and residual travel as one stacked (batch, 2, dim) tensor,
        # built by an op in every step: a loop variable passed on unchanged into
        # another one's slot (prev_z = z) is not carried over as TensorFlow does by
        # the TFLite WHILE kernel.
        return empty_buffer(z, memory), empty_buffer(z, memory), tf.constant(0), tf.stack([z, tf.zeros_like(z)], 1)

    def apply_h(us, vs, count, x, transpose=False):
        # H x = -x + sum_{j < count} u_j (v_j . x); slots at or past ``count`` are stale.
        if transpose:
            us, vs = vs, us
        live = tf.cast(tf.range(memory) < count, x.dtype)
        return -x + weighted_sum(us, slot_dots(vs, x) * live)

    def step(z, fz, g, state, k):
        us, vs, count, previous = state
        prev_z, prev_g = previous[:, 0], previous[:, 1]
        # A full history restarts from H = -I: overwriting the oldest term instead
        # breaks the secant conditions the remaining terms rely on and can diverge.
        count = tf.where(count >= memory, 0, count)
        s = z - prev_z
        y = g - prev_g
        v = apply_h(us, vs, count, s, transpose=True)
        denom = tf.expand_dims(row_sum(v * y), -1)
        size = tf.expand_dims(tf.sqrt(row_sum(v * v)) * tf.sqrt(row_sum(y * y)), -1)
        eps = float(np.sqrt(np.finfo(z.dtype.as_numpy_dtype).eps))
        usable = tf.logical_and(tf.abs(denom) > eps * size, tf.math.is_finite(denom))
        usable = tf.logical_and(usable, k > 0)
        safe_denom = tf.where(usable, denom, tf.ones_like(denom))
        u = (s - apply_h(us, vs, count, y)) / safe_denom
        # A sample whose update is unusable gets a zero term, which leaves its H as is.
        u = select_rows(usable[:, 0], u, tf.zeros_like(u))
        v = select_rows(usable[:, 0], v, tf.zeros_like(v))
        # At k = 0 there is no previous step: u and v are zero and the written slot is
        # not counted, so the next update overwrites it.
        us, vs = write_slot(us, count, u), write_slot(vs, count, v)
        count = tf.where(k > 0, count + 1, count)
        return z - apply_h(us, vs, count, g), (us, vs, count, tf.stack([z, g], 1))

    return iterate(f, z0, init, step, max_iter, tol, stop_mode)
