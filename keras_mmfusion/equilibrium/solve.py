"""``fixed_point_solve``: a differentiable equilibrium solve in plain TensorFlow.

The forward solve runs off every gradient tape, so its memory does not depend on the
number of iterations; the adjoint object (:mod:`keras_mmfusion.equilibrium.adjoint`)
attaches the gradient. A warm-up (the pretraining of Bai et al.'s DEQ models) replaces
the solve, while a boolean tensor says so, by ``warmup_depth`` plain iterations of
``f`` from ``z0``, differentiated by autodiff: the model trains as a shallow
weight-tied network first.
"""

import tensorflow as tf

from keras_mmfusion._checks import check_probes, check_solver_arguments, check_state, check_warmup_arguments
from keras_mmfusion.defaults import BACKWARD, MAX_ITER, SOLVER, STOP_MODE, TOL, WARMUP_DEPTH
from keras_mmfusion.equilibrium.adjoint import FixedPointProblem, UnrolledAdjoint, as_adjoint, with_penalty
from keras_mmfusion.equilibrium.iteration import (
    SolverStats,
    internal_dtype,
    residual_norm,
    skipped_stats,
    unrolled_stats,
)
from keras_mmfusion.equilibrium.jacobian import JacobianPenalty
from keras_mmfusion.equilibrium.solvers import get_solver


@tf.autograph.experimental.do_not_convert
def fixed_point_solve(
    f,
    x,
    z0,
    *,
    solver=SOLVER,
    max_iter=MAX_ITER,
    tol=TOL,
    stop_mode=STOP_MODE,
    adjoint=None,
    backward=None,
    solver_options=None,
    jacobian_probes=None,
    jacobian_active=None,
    warmup=None,
    warmup_depth=WARMUP_DEPTH,
    backward_callback=None,
):
    """Solve ``z = f(z, x)`` and make the solution differentiable.

    Args:
        f: ``f(z, x) -> z``, a differentiable TensorFlow function of a ``(batch, dim)``
            state ``z`` and the inputs ``x``. It may read ``tf.Variable``s (Keras layer
            weights included); they receive gradients. Layers it calls must already be
            built.
        x: a tensor or a nest of tensors passed through to ``f`` unchanged.
        z0: the starting point, ``(batch, dim)``, floating point. It receives no gradient.
        solver: a registered solver name (``"anderson"``, the default, ``"broyden"``,
            ``"fixed_point"``) or a solve function with the registry's signature.
        max_iter: the largest number of evaluations of ``f`` in the forward solve;
            default 50.
        tol: the forward stopping tolerance on every sample's residual; default 1e-4.
        stop_mode: ``"rel"`` (the default, ``||f(z) - z|| / ||f(z)||``) or ``"abs"``.
        adjoint: how the solution is differentiated: an
            :class:`~keras_mmfusion.equilibrium.ImplicitAdjoint` (the default,
            ``"implicit"``), :class:`~keras_mmfusion.equilibrium.PhantomAdjoint`
            (``"phantom"``) or :class:`~keras_mmfusion.equilibrium.UnrolledAdjoint`
            (``"unrolled"``); a name stands for the object with its defaults.
        backward: the same as ``adjoint``, under ``DEQFusion``'s name for it; give at
            most one of the two.
        solver_options: keyword arguments for the solver, e.g. ``{"memory": 5}``.
        jacobian_probes: optional ``(num_probes, batch, dim)`` probes. With them,
            ``stats.jacobian`` is the Hutchinson estimate of ``||J_f(z*)||_F^2 / dim``
            at the solution (Bai et al., "Stabilizing Equilibrium Models by Jacobian
            Regularization", 2021; :func:`hutchinson_jacobian_norm`), differentiable
            with respect to the variables ``f`` reads, for a training loss.
        jacobian_active: optional boolean scalar tensor. Where it is false the estimate
            is not computed and ``stats.jacobian`` is 0, so a caller can apply the
            penalty on a fraction of training steps.
        warmup: optional boolean scalar tensor. Where it is true, ``z`` is the iterate
            after ``warmup_depth`` plain iterations of ``f`` from ``z0``, differentiated
            by autodiff, instead of the solution; the penalty, if any, is taken there.
            It cannot go with the unrolled adjoint.
        warmup_depth: the number of those iterations; default 5.
        backward_callback: optional ``callback(stats)``, called with the adjoint
            solve's ``SolverStats`` each time an implicit gradient is taken, e.g. to
            record them in a variable. In a ``tf.function`` it is called while the
            gradient is traced.

    Returns:
        ``(z, stats)``: the solution in ``z0``'s dtype and a ``SolverStats`` of the
        forward solve. For the unrolled adjoint the solution is the last iterate and
        ``steps`` is ``max_iter``; so it is for a warm-up, with ``warmup_depth`` steps.
    """
    check_solver_arguments(max_iter, tol, stop_mode)
    if adjoint is not None and backward is not None:
        raise ValueError(f"Give adjoint or backward, not both; got adjoint={adjoint!r} and backward={backward!r}.")
    adjoint = as_adjoint(next((a for a in (adjoint, backward) if a is not None), BACKWARD))
    check_warmup_arguments(warmup is not None, warmup_depth, isinstance(adjoint, UnrolledAdjoint))
    z0 = tf.stop_gradient(check_state(z0))
    problem = FixedPointProblem(
        f=f,
        x=x,
        z0=z0,
        solve=get_solver(solver),
        max_iter=max_iter,
        tol=tol,
        stop_mode=stop_mode,
        options=dict(solver_options or {}),
        penalty=None if jacobian_probes is None else JacobianPenalty(check_probes(jacobian_probes, z0), jacobian_active),
        skip=None if warmup is None else tf.convert_to_tensor(warmup),
        backward_callback=backward_callback,
    )
    if problem.skip is None:
        return adjoint.solution(problem)
    return _with_warmup(problem, adjoint, warmup_depth)


def _with_warmup(problem, adjoint, depth):
    """The warm-up's iterate where ``problem.skip`` is true, else the adjoint's solution.

    The warm-up's autodiff through plain iterations runs in a ``tf.cond``. The
    equilibrium's custom gradient stays outside any ``tf.cond``, with its solves
    skipped by conds of their own: cond_v2's gradient cannot take a custom gradient
    that reads variables (``f``'s weights, or a ``backward_callback``'s), and it would
    return the solver loop's variable handles from its branch, which XLA cannot
    compile. During a warm-up the equilibrium's penalty is taken at ``z0`` and
    discarded by the selection.
    """
    f, x, z0 = problem.f, problem.x, problem.z0

    def shallow():
        z, stats = _shallow(f, x, z0, depth, problem.max_iter, problem.tol, problem.stop_mode)
        return z, with_penalty(problem, z, stats)

    def idle():
        stats = skipped_stats(z0, problem.max_iter)
        return tf.zeros_like(z0), stats if problem.penalty is None else stats._replace(jacobian=tf.zeros([], z0.dtype))

    warm = _cond(problem.skip, shallow, idle)
    solved = adjoint.solution(problem)
    return tuple(
        tf.nest.map_structure(lambda a, b: a if a is None else tf.where(problem.skip, a, b), warm_part, solved_part)
        for warm_part, solved_part in zip(warm, solved)
    )


def _cond(condition, true_fn, false_fn):
    """``tf.cond`` over two ``(z, SolverStats)`` functions whose ``jacobian`` may be ``None``.

    The statistics other than ``jacobian`` leave the branches under ``stop_gradient``:
    cond_v2 differentiates a branch's graph with respect to every output, and those of
    the solver loop have no gradient (XLA's ``DynamicUpdateSlice`` has none defined).
    """

    def flat(fn):
        def run():
            z, stats = fn()
            fields = [tf.stop_gradient(t) for t in stats[:-1]] + [() if stats.jacobian is None else stats.jacobian]
            return (z,) + tuple(fields)

        return run

    z, *fields = tf.cond(tf.convert_to_tensor(condition), flat(true_fn), flat(false_fn))
    return z, SolverStats(*[None if isinstance(t, tuple) else t for t in fields])


def _shallow(f, x, z0, depth, trace_length, tol, stop_mode):
    """``depth`` plain iterations of ``f`` from ``z0`` in Python, differentiated by autodiff.

    No ``tf.while_loop``: cond_v2 would return the loop's variable handles from its
    branch for the gradient, which XLA cannot compile. The trace keeps the first
    ``trace_length`` residuals, zero-padded.
    """
    dtype = internal_dtype(z0.dtype)
    z, trace = z0, []
    for _ in range(depth):
        fz = f(z, x)
        trace.append(tf.cast(tf.reduce_mean(residual_norm(z, fz, stop_mode)), dtype))
        z = fz
    trace = tf.pad(tf.stack(trace[:trace_length]), [[0, max(trace_length - depth, 0)]])
    return z, unrolled_stats(lambda s: f(s, x), z, depth, trace, tol, stop_mode)
