"""``fixed_point_solve``: a differentiable equilibrium solve in plain TensorFlow.

The forward solve runs without recording on any gradient tape, so memory does not
depend on the number of forward iterations. Gradients then come from one of three
backward modes:

- ``"implicit"``: the implicit function theorem (Bai et al., "Deep Equilibrium
  Models", 2019). With ``z* = f(z*, x)`` and upstream gradient ``v = dL/dz*``, solve
  the adjoint fixed point ``g = J_f(z*)^T g + v`` with the forward solver family (see
  :func:`solve_adjoint` for its start and its stopping rule), then one vector-Jacobian
  product ``g^T df/d(x, theta)`` gives every input and parameter gradient. ``f`` is
  evaluated once at ``z*`` for the backward pass; with ``jacobian_probes``, that same
  evaluation also gives the Jacobian penalty.
- ``"phantom"``: ``k`` damped steps ``z <- (1 - lam) z + lam f(z, x)`` from ``z*``,
  differentiated by ordinary autodiff (Geng et al., "On Training Implicit Models", 2021).
- ``"unrolled"``: ordinary autodiff through ``max_iter`` plain iterations of ``f``
  from ``z0``, with no early exit: the weight-tied network the equilibrium model is the
  limit of. Memory grows with ``max_iter``; it serves as an ablation and a reference.

A warm-up (the pretraining of Bai et al.'s DEQ models) replaces the solve, while a
boolean tensor says so, by ``warmup_depth`` plain iterations of ``f`` from ``z0``,
differentiated by autodiff: the model trains as a shallow weight-tied network first.
"""

import tensorflow as tf

from keras_mmfusion._internals import stop_recording
from keras_mmfusion.graph_context import in_xla_context

from keras_mmfusion.equilibrium.iteration import (
    STOP_MODES,
    SolverStats,
    as_flat_state,
    check_solver_arguments,
    internal_dtype,
    residual_norm,
)
from keras_mmfusion.equilibrium.jacobian import check_probes, hutchinson_jacobian_norm, jacobian_norm_from_vjp
from keras_mmfusion.equilibrium.solvers import get_solver
from keras_mmfusion._checks import check_fraction, check_int

BACKWARD_MODES = ("implicit", "phantom", "unrolled")


def check_backward_arguments(
    backward, backward_max_iter, backward_tol, phantom_steps, phantom_damping, backward_stop_mode="rel"
):
    """Raise a ``ValueError`` naming the backward-pass argument that is out of range."""
    if backward not in BACKWARD_MODES:
        raise ValueError(f"backward must be one of {BACKWARD_MODES}, got {backward!r}.")
    if backward_stop_mode not in STOP_MODES:
        raise ValueError(f"backward_stop_mode must be one of {STOP_MODES}, got {backward_stop_mode!r}.")
    if backward_max_iter is not None:
        check_int("backward_max_iter", backward_max_iter)
    if backward_tol is not None and not (isinstance(backward_tol, (int, float)) and backward_tol > 0):
        raise ValueError(f"backward_tol must be None or a positive number, got {backward_tol!r}.")
    check_int("phantom_steps", phantom_steps)
    check_fraction("phantom_damping", phantom_damping)


def check_warmup_arguments(warming_up, warmup_depth, backward):
    """Raise a ``ValueError`` naming the warm-up argument that is out of range, or the
    backward mode a warm-up cannot have."""
    check_int("warmup_depth", warmup_depth)
    if warming_up and backward == "unrolled":
        raise ValueError(
            "A warm-up (warmup_steps > 0) needs backward='implicit' or 'phantom': "
            "backward='unrolled' already trains the weight-tied network by autodiff."
        )


@tf.autograph.experimental.do_not_convert
def fixed_point_solve(
    f,
    x,
    z0,
    *,
    solver="anderson",
    max_iter=50,
    tol=1e-4,
    stop_mode="rel",
    backward="implicit",
    backward_max_iter=None,
    backward_tol=None,
    backward_stop_mode="rel",
    backward_callback=None,
    phantom_steps=5,
    phantom_damping=0.5,
    solver_options=None,
    jacobian_probes=None,
    jacobian_active=None,
    warmup=None,
    warmup_depth=5,
):
    """Solve ``z = f(z, x)`` and make the solution differentiable.

    Args:
        f: ``f(z, x) -> z``, a differentiable TensorFlow function of a ``(batch, dim)``
            state ``z`` and the inputs ``x``. It may read ``tf.Variable``s (Keras layer
            weights included); they receive gradients. Layers it calls must already be
            built.
        x: a tensor or a nest of tensors passed through to ``f`` unchanged.
        z0: the starting point, ``(batch, dim)``, floating point. It receives no gradient.
        solver: a registered solver name (``"anderson"``, ``"broyden"``,
            ``"fixed_point"``) or a solve function with the registry's signature.
        max_iter: the largest number of evaluations of ``f`` in the forward solve.
        tol: forward stopping tolerance on every sample's residual.
        stop_mode: ``"abs"`` or ``"rel"`` residual.
        backward: ``"implicit"``, ``"phantom"`` or ``"unrolled"`` (see the module doc).
        backward_max_iter: iterations of the adjoint solve; defaults to ``max_iter``.
        backward_tol: tolerance of the adjoint solve; defaults to ``tol``.
        backward_stop_mode: the adjoint solve's own stopping rule, whatever
            ``stop_mode`` is: ``"rel"`` stops a sample once
            ``||g - J^T g - v|| <= backward_tol * ||v||``, so the gradient is linear in
            the loss at every scale; ``"abs"`` once ``||g - J^T g - v|| <= backward_tol``.
            See :func:`solve_adjoint`.
        backward_callback: optional ``callback(stats)``, called with the adjoint
            solve's ``SolverStats`` (residuals in ``backward_stop_mode``) each time an
            implicit gradient is taken, e.g. to record them in a variable. In a
            ``tf.function`` it is called while the gradient is traced.
        phantom_steps: the number of unrolled steps ``k`` of the phantom gradient.
        phantom_damping: the damping ``lam`` of the phantom steps, in ``(0, 1]``.
        solver_options: keyword arguments for the solver, e.g. ``{"memory": 5}``.
        jacobian_probes: optional ``(num_probes, batch, dim)`` probes. With them,
            ``stats.jacobian`` is the Hutchinson estimate of ``||J_f(z*)||_F^2 / dim``
            at the solution (see :func:`hutchinson_jacobian_norm`), differentiable with
            respect to the variables ``f`` reads, for a training loss (Bai et al.,
            2021). In ``"implicit"`` mode the estimate and the backward pass share one
            evaluation of ``f`` at ``z*``, made in the forward pass.
        jacobian_active: optional boolean scalar tensor. When it is false the estimate
            is not computed (no vector-Jacobian products) and ``stats.jacobian`` is 0,
            so a caller can apply the penalty on a fraction of training steps.
        warmup: optional boolean scalar tensor. When it is true, ``z`` is the iterate
            after ``warmup_depth`` plain iterations of ``f`` from ``z0``, differentiated
            by autodiff, instead of the solution; the penalty, if any, is taken there.
        warmup_depth: the number of those iterations.

    Returns:
        ``(z, stats)``: the solution in ``z0``'s dtype and a ``SolverStats`` of the
        forward solve. For ``"unrolled"`` the solution is the last iterate and ``steps``
        is ``max_iter``; so it is for a warm-up, with ``warmup_depth`` steps.
    """
    check_solver_arguments(max_iter, tol, stop_mode)
    check_backward_arguments(
        backward, backward_max_iter, backward_tol, phantom_steps, phantom_damping, backward_stop_mode
    )
    check_warmup_arguments(warmup is not None, warmup_depth, backward)
    z0 = tf.stop_gradient(as_flat_state(z0))
    options = dict(solver_options or {})
    solve = get_solver(solver)

    probes = None if jacobian_probes is None else check_probes(jacobian_probes, z0)
    # During a warm-up the equilibrium's solves are skipped (see the end of this function).
    skip = None if warmup is None else tf.convert_to_tensor(warmup)

    def with_penalty(z, stats):
        # The phantom and unrolled modes evaluate f at z for the penalty on its own.
        if probes is None:
            return z, stats
        penalty = _when_active(
            jacobian_active, lambda: hutchinson_jacobian_norm(lambda s: f(s, x), tf.stop_gradient(z), probes=probes), z
        )
        return z, stats._replace(jacobian=penalty)

    def equilibrium():
        if backward == "unrolled":
            return with_penalty(*_unrolled(f, x, z0, max_iter, tol, stop_mode))

        def forward(fn):
            return _unless(
                skip,
                lambda: solve(fn, z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode, **options),
                z0,
                max_iter,
            )

        if backward == "phantom":
            z, stats = _solve_with_gradient(f, x, forward, _no_gradient)
            z = tf.stop_gradient(z)
            z_star = z
            for _ in range(phantom_steps):
                z = (1.0 - phantom_damping) * z + phantom_damping * f(z, x)
            return z, with_penalty(z_star, stats)[1]

        def adjoint_solve(vjp, v):
            adjoint_max_iter = backward_max_iter or max_iter
            g, stats = _unless(
                skip,
                lambda: solve_adjoint(
                    solve,
                    vjp,
                    v,
                    max_iter=adjoint_max_iter,
                    tol=backward_tol or tol,
                    stop_mode=backward_stop_mode,
                    **options,
                ),
                tf.zeros_like(v),
                adjoint_max_iter,
            )
            if backward_callback is not None:
                backward_callback(stats)
            return g

        if probes is not None:
            return _implicit_sharing_evaluation(f, x, forward, adjoint_solve, probes, jacobian_active)

        def implicit_gradient(z_star, xs, fz_of, dz, variables):
            with tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
                tape.watch(z_star)
                tape.watch(xs)
                tape.watch(variables)
                fz = fz_of(z_star, xs)

            def vjp(g):
                return tape.gradient(fz, z_star, output_gradients=tf.cast(g, fz.dtype))

            g = adjoint_solve(vjp, dz)
            grads = tape.gradient(
                fz,
                list(xs) + variables,
                output_gradients=g,
                unconnected_gradients=tf.UnconnectedGradients.ZERO,
            )
            return grads[: len(xs)], grads[len(xs) :]

        return _solve_with_gradient(f, x, forward, implicit_gradient)

    if warmup is None:
        return equilibrium()

    # The warm-up's autodiff through plain iterations runs in a tf.cond. The
    # equilibrium's custom gradient stays outside any tf.cond, with its solves skipped
    # by conds of their own: cond_v2's gradient cannot take a custom gradient that
    # reads variables (f's weights, or a backward_callback's), and it would return the
    # solver loop's variable handles from its branch, which XLA cannot compile. During a
    # warm-up the equilibrium's penalty is taken at z0 and discarded by the selection below.
    def shallow():
        return with_penalty(*_shallow(f, x, z0, warmup_depth, max_iter, tol, stop_mode))

    def idle():
        stats = _skipped_stats(z0, max_iter)
        return tf.zeros_like(z0), stats if probes is None else stats._replace(jacobian=tf.zeros([], z0.dtype))

    warm = _cond(skip, shallow, idle)
    solved = equilibrium()
    return tuple(
        tf.nest.map_structure(lambda a, b: a if a is None else tf.where(skip, a, b), warm_part, solved_part)
        for warm_part, solved_part in zip(warm, solved)
    )


def solve_adjoint(solve, vjp, v, *, max_iter, tol, stop_mode="rel", **options):
    """Solve the adjoint fixed point ``g = J^T g + v`` of an implicit gradient.

    ``vjp(g)`` returns ``J^T g`` for a ``(batch, dim)`` ``g``; ``v`` is the upstream
    gradient ``dL/dz*``, one row per sample. The solve starts at ``g = v``, the first
    term of the Neumann series ``sum_k (J^T)^k v``, so a zero ``g`` is never returned
    for a nonzero ``v``, and a zero ``v`` gives ``g = 0`` at once.

    With ``stop_mode="rel"`` a sample stops once ``||g - J^T g - v|| <= tol * ||v||``.
    The map is linear, so each sample's system is solved for ``g / ||v||`` with the
    unit right-hand side ``v / ||v||`` and an absolute stop: the iterates, the
    solvers' choices and the answer do not depend on the loss's scale, and a small
    upstream gradient loses no precision. With ``stop_mode="abs"`` the system is
    solved as it is and a sample stops once ``||g - J^T g - v|| <= tol``.

    Args:
        solve: a solve function with the registry's signature.
        vjp: the linear map ``g -> J^T g``.
        v: ``(batch, dim)``, the right-hand side.
        max_iter, tol: the adjoint solve's budget and tolerance.
        stop_mode: ``"rel"`` (relative to ``||v||``) or ``"abs"``.
        **options: the solver's keyword arguments.

    Returns:
        ``(g, stats)``: ``g`` in ``v``'s dtype, and the solve's ``SolverStats``, whose
        residuals are relative to ``||v||`` for ``"rel"``.
    """
    if stop_mode not in STOP_MODES:
        raise ValueError(f"stop_mode must be one of {STOP_MODES}, got {stop_mode!r}.")
    dtype = internal_dtype(v.dtype)
    rhs = tf.cast(v, dtype)
    if stop_mode == "rel":
        size = _row_norm(rhs)
        scale = tf.expand_dims(tf.where(size > 0, size, tf.ones_like(size)), -1)
        rhs = rhs / scale
    h, stats = solve(
        lambda h: tf.cast(vjp(h), dtype) + rhs, rhs, max_iter=max_iter, tol=tol, stop_mode="abs", **options
    )
    if stop_mode == "rel":
        h = h * scale
    return tf.cast(h, v.dtype), stats


def _row_norm(x):
    """``(batch,)``: each row's Euclidean norm, scaled by its largest entry first so that
    no square underflows (an upstream gradient of 1e-25 in float32 has a norm, not 0)."""
    largest = tf.reduce_max(tf.abs(x), axis=-1, keepdims=True)
    safe = tf.where(largest > 0, largest, tf.ones_like(largest))
    return tf.squeeze(largest, -1) * tf.sqrt(tf.reduce_sum(tf.square(x / safe), axis=-1))


def _skipped_stats(z, length):
    """The ``SolverStats`` of a solve that did not run: 0 steps, every sample converged."""
    dtype = internal_dtype(z.dtype)
    batch = tf.shape(z)[:1]
    return SolverStats(
        steps=tf.constant(0),
        residual=tf.zeros(batch, dtype),
        converged=tf.ones(batch, tf.bool),
        trace=tf.zeros([length], dtype),
    )


def _unless(skip, run, placeholder, length):
    """``run()``, a ``(z, SolverStats)`` solve, or with a boolean tensor ``skip``, that
    solve only where ``skip`` is false; else ``placeholder`` and :func:`_skipped_stats`."""
    if skip is None:
        return run()

    def skipped():
        return (placeholder,) + tuple(_skipped_stats(placeholder, length)[:4])

    def solved():
        z, stats = run()
        return (z,) + tuple(stats[:4])

    z, *fields = tf.cond(skip, skipped, solved)
    return z, SolverStats(*fields)


def _when_active(active, penalty, z):
    """``penalty()``, or with a boolean tensor ``active``, ``penalty()`` only where it is true (else 0).

    Under XLA the penalty is computed on every call and multiplied by ``active``: XLA's
    CPU runtime corrupts its heap and aborts the process when it runs the gradient of a
    ``tf.cond`` whose branch takes these vector-Jacobian products, so there the skipped
    calls save nothing.
    """
    if active is None:
        return penalty()
    active = tf.convert_to_tensor(active)
    if in_xla_context():
        return penalty() * tf.cast(active, z.dtype)
    return tf.cond(active, penalty, lambda: tf.zeros([], z.dtype))


def _implicit_sharing_evaluation(f, x, forward, adjoint_solve, probes=None, active=None):
    """The implicit backward pass and the Jacobian penalty from one evaluation of ``f`` at ``z*``.

    Without ``probes`` there is no penalty (``stats.jacobian`` is ``None``).

    ``fz = f(z*, x)`` is evaluated in the forward pass, recorded by any outer tape and
    by an inner tape that watches ``z*``. The penalty's vector-Jacobian products
    ``e^T J`` come from the inner tape and are recorded by the outer tape, so the
    penalty's gradient is exact (it needs second derivatives of ``f``). The returned
    solution has the value ``z*``; its gradient ``dz`` is replaced by the adjoint
    solution ``g = J^T g + dz`` (again from the inner tape) and flows on through the
    recorded ``fz`` to ``x`` and to the variables, which is ``g^T df/d(x, theta)``.
    """
    with stop_recording():
        z_star, stats = forward(lambda z: f(z, x))
    z_star = tf.stop_gradient(z_star)
    with tf.GradientTape(watch_accessed_variables=False, persistent=True) as tape:
        tape.watch(z_star)
        f_at_solution = f(z_star, x)

    def vjp(v):
        return tape.gradient(f_at_solution, z_star, output_gradients=tf.cast(v, f_at_solution.dtype))

    penalty = None
    if probes is not None:
        penalty = _when_active(active, lambda: jacobian_norm_from_vjp(vjp, z_star, probes), z_star)

    @tf.custom_gradient
    def solution(fz):
        def grad(dz):
            return adjoint_solve(vjp, dz)

        return tf.identity(z_star), grad

    return solution(f_at_solution), stats._replace(jacobian=penalty)


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


def _no_gradient(z_star, xs, fz_of, dz, variables):
    return [tf.zeros_like(t) for t in xs], [tf.zeros_like(v) for v in variables]


def _solve_with_gradient(f, x, forward, gradient):
    """Run ``forward`` off every tape; its gradient is ``gradient(z*, xs, f, dz, variables)``.

    ``xs`` is the flat list of tensors in ``x``; ``gradient`` returns the gradients for
    ``xs`` and for the variables ``f`` reads.
    """
    flat = [tf.convert_to_tensor(t) for t in tf.nest.flatten(x)]
    if not flat:
        # tf.custom_gradient needs at least one tensor input.
        flat = [tf.zeros([0])]

        def fz_of(z, xs):
            return f(z, x)

    else:

        def fz_of(z, xs):
            return f(z, tf.nest.pack_sequence_as(x, list(xs)))

    record_of_stats = []

    @tf.custom_gradient
    def solve(*xs):
        with stop_recording():
            z_star, stats = forward(lambda z: fz_of(z, xs))
        record_of_stats.append(stats)

        def grad(dz, variables=None):
            return gradient(z_star, xs, fz_of, dz, list(variables or []))

        return z_star, grad

    z_star = solve(*flat)
    return z_star, record_of_stats[0]


def _unrolled(f, x, z0, max_iter, tol, stop_mode):
    """``max_iter`` plain iterations of ``f`` from ``z0``, differentiated by autodiff."""
    dtype = z0.dtype

    def body(k, z, trace):
        fz = tf.ensure_shape(f(z, x), z.shape)
        res = residual_norm(z, fz, stop_mode)
        trace = tf.tensor_scatter_nd_update(trace, [[k]], [tf.cast(tf.reduce_mean(res), trace.dtype)])
        return k + 1, fz, trace

    trace0 = tf.zeros([max_iter], tf.float64 if dtype == tf.float64 else tf.float32)
    _, z, trace = tf.while_loop(
        lambda k, z, trace: k < max_iter,
        body,
        (tf.constant(0), z0, trace0),
        maximum_iterations=max_iter,
    )
    return z, _unrolled_stats(f, x, z, max_iter, trace, tol, stop_mode)


def _shallow(f, x, z0, depth, trace_length, tol, stop_mode):
    """``depth`` plain iterations of ``f`` from ``z0`` in Python, differentiated by autodiff.

    No ``tf.while_loop``: cond_v2 would return the loop's variable handles from its
    branch for the gradient, which XLA cannot compile. The trace keeps the first
    ``trace_length`` residuals, zero-padded.
    """
    dtype = tf.float64 if z0.dtype == tf.float64 else tf.float32
    z, trace = z0, []
    for _ in range(depth):
        fz = f(z, x)
        trace.append(tf.cast(tf.reduce_mean(residual_norm(z, fz, stop_mode)), dtype))
        z = fz
    trace = tf.pad(tf.stack(trace[:trace_length]), [[0, max(trace_length - depth, 0)]])
    return z, _unrolled_stats(f, x, z, depth, trace, tol, stop_mode)


def _unrolled_stats(f, x, z, steps, trace, tol, stop_mode):
    res = tf.cast(tf.stop_gradient(residual_norm(z, f(z, x), stop_mode)), trace.dtype)
    return SolverStats(
        steps=tf.constant(steps),
        residual=res,
        converged=res <= tf.cast(tol, res.dtype),
        trace=tf.stop_gradient(trace),
    )
