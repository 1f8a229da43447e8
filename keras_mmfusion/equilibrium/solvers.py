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


def _write_slot(buffer, slot, row):
    """Write ``row`` ``(batch, dim)`` into slot ``slot`` of ``buffer`` ``(batch, m, dim)``."""
    mask = tf.one_hot(slot, tf.shape(buffer)[1], on_value=True, off_value=False)
    return tf.where(mask[None, :, None], row[:, None, :], buffer)


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
    and regularised with ``ridge * I``, so they are never singular; they are solved in
    float32 (float64 for float64 states). A sample whose weights come out non-finite
    falls back to a plain ``f(z)`` step.

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
        history = tf.zeros([tf.shape(z)[0], memory, z.shape[-1]], z.dtype)
        return history, history

    def step(z, fz, state, k):
        xs, fs = state
        slot = k % memory
        xs = _write_slot(xs, slot, z)
        fs = _write_slot(fs, slot, fz)
        valid = tf.range(memory) < tf.minimum(k + 1, memory)
        g = tf.where(valid[None, :, None], fs - xs, tf.zeros_like(xs))
        g = tf.where(tf.math.is_finite(g), g, tf.zeros_like(g))
        gram = tf.einsum("bid,bjd->bij", g, g)
        scale = tf.reduce_max(tf.linalg.diag_part(gram), axis=-1)
        scale = tf.where(scale > 0, scale, tf.ones_like(scale))
        eye = tf.eye(memory, dtype=z.dtype)
        system = gram / scale[:, None, None] + ridge * eye
        ones = tf.broadcast_to(
            tf.cast(valid, z.dtype)[None, :, None], [tf.shape(z)[0], memory, 1]
        )
        y = tf.linalg.solve(system, ones)[..., 0]
        alpha = y / tf.reduce_sum(y, axis=-1, keepdims=True)
        current = tf.broadcast_to(tf.one_hot(slot, memory, dtype=z.dtype), tf.shape(alpha))
        alpha = _finite_or(alpha, current)
        z_next = mixing * tf.einsum("bm,bmd->bd", alpha, fs)
        if mixing < 1:
            z_next += (1.0 - mixing) * tf.einsum("bm,bmd->bd", alpha, xs)
        return _finite_or(z_next, fz), (xs, fs)

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
        terms = tf.zeros([tf.shape(z)[0], memory, z.shape[-1]], z.dtype)
        return terms, terms, z, fz - z

    def apply_h(us, vs, x):
        return -x + tf.einsum("bmd,bm->bd", us, tf.einsum("bmd,bd->bm", vs, x))

    def apply_h_transposed(us, vs, x):
        return -x + tf.einsum("bmd,bm->bd", vs, tf.einsum("bmd,bd->bm", us, x))

    def step(z, fz, state, k):
        us, vs, prev_z, prev_g = state
        g = fz - z
        s = z - prev_z
        y = g - prev_g
        v = apply_h_transposed(us, vs, s)
        denom = tf.reduce_sum(v * y, axis=-1, keepdims=True)
        size = tf.norm(v, axis=-1, keepdims=True) * tf.norm(y, axis=-1, keepdims=True)
        eps = float(np.sqrt(np.finfo(z.dtype.as_numpy_dtype).eps))
        usable = tf.logical_and(tf.abs(denom) > eps * size, tf.math.is_finite(denom))
        usable = tf.logical_and(usable, k > 0)
        safe_denom = tf.where(usable, denom, tf.ones_like(denom))
        u = (s - apply_h(us, vs, y)) / safe_denom
        slot = (k - 1) % memory
        # A full history restarts from H = -I: overwriting the oldest term instead
        # breaks the secant conditions the remaining terms rely on and can diverge.
        restart = tf.logical_and(slot == 0, k > 1)
        us = tf.where(restart, tf.zeros_like(us), us)
        vs = tf.where(restart, tf.zeros_like(vs), vs)
        us = tf.where(usable[:, :, None], _write_slot(us, slot, u), us)
        vs = tf.where(usable[:, :, None], _write_slot(vs, slot, v), vs)
        z_next = _finite_or(z - apply_h(us, vs, g), fz)
        return z_next, (us, vs, z, g)

    return iterate(f, z0, init, step, max_iter, tol, stop_mode)
