"""Forward fixed-point solvers and their registry.

Every solver has the signature
``solve(f, z0, *, max_iter=50, tol=1e-4, stop_mode="rel", **options) -> (z, SolverStats)``
and finds ``z = f(z)`` for a ``(batch, dim)`` state. All of them run through
:func:`keras_mmfusion.equilibrium.iteration.iterate`, one bounded ``tf.while_loop``,
so they work eagerly, inside ``tf.function`` and under ``jit_compile=True``.
"""

import numpy as np
import tensorflow as tf

from keras_mmfusion.validation import check_int

from keras_mmfusion.equilibrium.iteration import iterate

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


def _check_fraction(name, value):
    if not (isinstance(value, (int, float)) and 0 < value <= 1):
        raise ValueError(f"{name} must be in (0, 1], got {value!r}.")


def _finite_or(value, fallback):
    """``value`` where every entry of a sample's row is finite, else ``fallback``."""
    ok = tf.reduce_all(tf.math.is_finite(value), axis=-1, keepdims=True)
    return tf.where(ok, value, fallback)


def _history(z, memory):
    """An empty ``(memory, batch, dim)`` history buffer for states like ``z``."""
    return tf.zeros([memory, tf.shape(z)[0], z.shape[-1]], z.dtype)


def _write_slot(buffer, slot, row):
    """Write ``row`` ``(batch, dim)`` into slot ``slot`` of ``buffer`` ``(m, batch, dim)``.

    Slots lead the buffer so that a write is one contiguous scatter (an in-place
    dynamic-update-slice under XLA) rather than a pass over the whole history.
    """
    return tf.tensor_scatter_nd_update(buffer, [[slot]], row[None])


def _spd_solve(a, b):
    """Solve ``a x = b`` for a batch of small symmetric positive-definite ``(m, m)`` systems.

    Gauss-Jordan elimination on the augmented ``(batch, m, m + 1)`` matrix, unrolled
    over the static ``m``: each pivot is a handful of whole-matrix operations, so the
    solve costs about ``5 m`` small ops. ``tf.linalg.solve`` would do the same job, but
    its kernel has no TFLite builtin or ONNX counterpart, and this solve runs inside the
    exported solver loop. ``a`` is the ridge-regularised Gram matrix, whose eigenvalues
    are at least the ridge, so elimination without pivoting is stable.

    Args:
        a: ``(batch, m, m)``.
        b: ``(batch, m)``.

    Returns:
        ``(batch, m)``.
    """
    m = a.shape[-1]
    aug = tf.concat([a, b[:, :, None]], axis=-1)
    eye = tf.eye(m, dtype=a.dtype)
    for j in range(m):
        # Scale pivot row j to a unit pivot, remove column j from every row, then put
        # the scaled row back in place of row j (which the removal zeroed).
        pivot_row = aug[:, j : j + 1, :] / aug[:, j : j + 1, j : j + 1]
        aug = aug + (eye[:, j : j + 1] - aug[:, :, j : j + 1]) * pivot_row
    return aug[:, :, m]


def _shift_in(history, newest):
    """Put ``newest`` first in the tuple ``history`` and drop the oldest entry.

    The history is a tuple of ``(batch, dim)`` tensors carried through the loop, so a
    shift only rebinds tensors: nothing is copied, unlike a write into a stacked buffer.
    """
    return (newest,) + history[:-1]


def _shift_gram(gram, row):
    """The ``(batch, m, m)`` Gram matrix after :func:`_shift_in`: ``row`` becomes row and
    column 0 and the old matrix moves one place down the diagonal."""
    m = gram.shape[-1]
    lower = tf.concat([row[:, 1:, None], gram[:, : m - 1, : m - 1]], axis=2)
    return tf.concat([row[:, None, :], lower], axis=1)


@register_solver("fixed_point")
def fixed_point_iteration(f, z0, *, max_iter=50, tol=1e-4, stop_mode="rel", damping=1.0):
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
    _check_fraction("damping", damping)

    def init(z, fz):
        return tf.zeros([], z.dtype)

    def step(z, fz, state, k):
        return (1.0 - damping) * z + damping * fz, state

    return iterate(f, z0, init, step, max_iter, tol, stop_mode)


@register_solver("anderson")
def anderson_solve(
    f, z0, *, max_iter=50, tol=1e-4, stop_mode="rel", memory=5, ridge=1e-4, mixing=1.0
):
    """Anderson acceleration (Walker & Ni, 2011), as used by deep equilibrium models.

    Keeps the last ``memory`` pairs ``(z_j, f(z_j))`` and chooses weights ``alpha``
    (summing to one) that minimise ``||sum_j alpha_j (f(z_j) - z_j)||``; the next
    point is ``mixing * sum alpha_j f(z_j) + (1 - mixing) * sum alpha_j z_j``.

    The ``memory x memory`` normal equations are scaled by their largest diagonal entry
    and regularised with ``ridge * I``, so they are never singular; they are solved by
    elimination in float32 (float64 for float64 states). A sample whose weights come out
    non-finite falls back to a plain ``f(z)`` step. The history is carried as ``memory``
    separate tensors, newest first, so a step reads it twice (the new Gram row and the
    weighted sum) and never copies it.

    Args:
        f, z0, max_iter, tol, stop_mode: as for :func:`fixed_point_iteration`.
        memory: history size m.
        ridge: relative Tikhonov term added to the scaled Gram matrix.
        mixing: the mixing parameter beta in ``(0, 1]``.

    Returns:
        ``(z, stats)``.
    """
    check_int("memory", memory)
    _check_fraction("mixing", mixing)
    if not (isinstance(ridge, (int, float)) and ridge > 0):
        raise ValueError(f"ridge must be a positive number, got {ridge!r}.")

    def init(z, fz):
        zeros = tf.zeros_like(z)
        return (zeros,) * memory, (zeros,) * memory, tf.zeros([tf.shape(z)[0], memory, memory], z.dtype)

    def step(z, fz, state, k):
        # The history keeps f(z_j) and the residuals g_j = f(z_j) - z_j, newest first;
        # the Gram matrix of the residuals gains one row and column per step.
        fs, gs, gram = state
        g = fz - z
        fs, gs = _shift_in(fs, fz), _shift_in(gs, g)
        gram = _shift_gram(gram, tf.stack([tf.reduce_sum(g_j * g, axis=-1) for g_j in gs], axis=-1))
        # Slots not yet written hold zeros, so their rows are ridge * I and, with a zero
        # right-hand side, their weights are 0.
        valid = tf.cast(tf.range(memory) < tf.minimum(k + 1, memory), z.dtype)
        eye = tf.eye(memory, dtype=z.dtype)
        # The diagonal as a masked sum: diag_part has no TFLite builtin.
        scale = tf.reduce_max(tf.reduce_sum(gram * eye, axis=-1), axis=-1)
        scale = tf.where(scale > 0, scale, tf.ones_like(scale))
        system = gram / scale[:, None, None] + ridge * eye
        y = _spd_solve(system, tf.broadcast_to(valid, tf.shape(system)[:2]))
        alpha = y / tf.reduce_sum(y, axis=-1, keepdims=True)
        # A sample whose residuals are not finite gets non-finite weights; it takes a
        # plain step instead, f(z) with weight 1 on the newest entry.
        alpha = _finite_or(alpha, tf.broadcast_to(eye[0], tf.shape(alpha)))
        # sum_j alpha_j z_j = sum_j alpha_j (f_j - g_j).
        z_next = tf.add_n([alpha[:, j, None] * f_j for j, f_j in enumerate(fs)])
        if mixing < 1:
            z_next -= (1.0 - mixing) * tf.add_n([alpha[:, j, None] * g_j for j, g_j in enumerate(gs)])
        return _finite_or(z_next, fz), (fs, gs, gram)

    return iterate(f, z0, init, step, max_iter, tol, stop_mode)


@register_solver("broyden")
def broyden_solve(f, z0, *, max_iter=50, tol=1e-4, stop_mode="rel", memory=20):
    """Limited-memory Broyden's ("good") method on ``g(z) = f(z) - z = 0``.

    The inverse Jacobian of ``g`` is approximated as ``H = -I + sum_j u_j v_j^T`` with
    at most ``memory`` rank-one terms; when they are all used the approximation
    restarts from ``H = -I``. Each step is the
    full quasi-Newton step ``z <- z - H g(z)``; there is no line search. An update whose
    denominator ``v^T y`` is negligible relative to ``||v|| ||y||`` is skipped, and a
    non-finite step falls back to ``f(z)``.

    Args:
        f, z0, max_iter, tol, stop_mode: as for :func:`fixed_point_iteration`.
        memory: the number of rank-one terms kept.

    Returns:
        ``(z, stats)``.
    """
    check_int("memory", memory)

    def init(z, fz):
        return _history(z, memory), _history(z, memory), tf.constant(0), z, fz - z

    def apply_h(us, vs, count, x, transpose=False):
        # H x = -x + sum_{j < count} u_j (v_j . x); slots at or past ``count`` are stale.
        if transpose:
            us, vs = vs, us
        live = tf.cast(tf.range(memory) < count, x.dtype)[:, None]
        coeff = tf.einsum("mbd,bd->mb", vs, x) * live
        return -x + tf.einsum("mbd,mb->bd", us, coeff)

    def step(z, fz, state, k):
        us, vs, count, prev_z, prev_g = state
        # A full history restarts from H = -I: overwriting the oldest term instead
        # breaks the secant conditions the remaining terms rely on and can diverge.
        count = tf.where(count >= memory, 0, count)
        g = fz - z
        s = z - prev_z
        y = g - prev_g
        v = apply_h(us, vs, count, s, transpose=True)
        denom = tf.reduce_sum(v * y, axis=-1, keepdims=True)
        size = tf.norm(v, axis=-1, keepdims=True) * tf.norm(y, axis=-1, keepdims=True)
        eps = float(np.sqrt(np.finfo(z.dtype.as_numpy_dtype).eps))
        usable = tf.logical_and(tf.abs(denom) > eps * size, tf.math.is_finite(denom))
        usable = tf.logical_and(usable, k > 0)
        safe_denom = tf.where(usable, denom, tf.ones_like(denom))
        u = (s - apply_h(us, vs, count, y)) / safe_denom
        # A sample whose update is unusable gets a zero term, which leaves its H as is.
        u = tf.where(usable, u, tf.zeros_like(u))
        v = tf.where(usable, v, tf.zeros_like(v))
        write = k > 0
        us = tf.cond(write, lambda: _write_slot(us, count, u), lambda: us)
        vs = tf.cond(write, lambda: _write_slot(vs, count, v), lambda: vs)
        count = tf.where(write, count + 1, count)
        z_next = _finite_or(z - apply_h(us, vs, count, g), fz)
        return z_next, (us, vs, count, z, g)

    return iterate(f, z0, init, step, max_iter, tol, stop_mode)
