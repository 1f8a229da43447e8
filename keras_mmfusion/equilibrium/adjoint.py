"""How an equilibrium solve is differentiated: the adjoint objects.

:func:`~keras_mmfusion.equilibrium.fixed_point_solve` takes one of these as ``adjoint``,
as Optimistix's root finders take ``ImplicitAdjoint`` or ``RecursiveCheckpointAdjoint``.
Each class has one method, ``solution(problem)``, which runs the forward solve of a
:class:`FixedPointProblem` and returns ``(z, stats)`` with the gradient attached to
``z``. The shorthand names ``"implicit"``, ``"phantom"`` and ``"unrolled"`` map to the
objects in :func:`as_adjoint`, and nowhere else.

- :class:`ImplicitAdjoint`: the implicit function theorem (Bai et al., "Deep Equilibrium
  Models", 2019). With ``z* = f(z*, x)`` and the upstream gradient ``v = dL/dz*``, it
  solves the adjoint fixed point ``g = J_f(z*)^T g + v`` (:func:`solve_adjoint`), then
  one vector-Jacobian product ``g^T df/d(x, theta)`` gives every input and parameter
  gradient. Memory does not depend on the number of solver iterations.
- :class:`PhantomAdjoint`: ``k`` damped steps ``z <- (1 - lam) z + lam f(z, x)`` from
  ``z*``, differentiated by autodiff (Geng et al., "On Training Implicit Models", 2021).
- :class:`UnrolledAdjoint`: autodiff through ``max_iter`` plain iterations of ``f``
  from ``z0``, with no early exit: the weight-tied network the equilibrium model is
  the limit of. Memory grows with ``max_iter``.

Every object is serializable: ``get_config`` / ``from_config``, and
:func:`serialize_adjoint` / :func:`deserialize_adjoint` for a nested config.
"""

from typing import Any, Callable, NamedTuple, Optional

import tensorflow as tf

from keras_mmfusion._checks import (
    check_backward,
    check_optional_solver_arguments,
    check_phantom_arguments,
    check_choice,
)
from keras_mmfusion._internals import stop_recording
from keras_mmfusion.defaults import BACKWARD_STOP_MODE, PHANTOM_DAMPING, PHANTOM_STEPS, STOP_MODES
from keras_mmfusion.equilibrium.iteration import (
    SolverStats,
    internal_dtype,
    residual_norm,
    skipped_stats,
    unrolled_stats,
)
from keras_mmfusion.equilibrium.jacobian import JacobianPenalty

# Where an implicit adjoint solve starts, and what a solution evaluated in the forward
# pass returns (see ImplicitAdjoint).
ADJOINT_STARTS = ("rhs", "zero")
OUTPUTS = ("state", "update")
from keras_mmfusion.equilibrium.solvers import available_solvers, get_solver


class FixedPointProblem(NamedTuple):
    """What an adjoint object needs to solve ``z = f(z, x)`` and differentiate it.

    :func:`~keras_mmfusion.equilibrium.fixed_point_solve` builds it from its arguments.

    Attributes:
        f: ``f(z, x) -> z``.
        x: the inputs, a tensor or a nest of tensors.
        z0: the start, ``(batch, dim)``, off every tape.
        solve: the forward solve function (the solver registry's signature).
        max_iter, tol, stop_mode: the forward solve's budget and stopping rule.
        options: the forward solver's keyword arguments.
        penalty: a :class:`~keras_mmfusion.equilibrium.jacobian.JacobianPenalty` to
            take at the solution, or ``None``.
        skip: ``None``, or a boolean scalar tensor; while it is true the forward and
            adjoint solves do not run (a warm-up call replaces them).
        backward_callback: ``None``, or ``callback(stats)`` called with the adjoint
            solve's ``SolverStats`` when an implicit gradient is taken.
    """

    f: Callable
    x: Any
    z0: tf.Tensor
    solve: Callable
    max_iter: int
    tol: float
    stop_mode: str
    options: dict
    penalty: Optional[JacobianPenalty] = None
    skip: Optional[tf.Tensor] = None
    backward_callback: Optional[Callable] = None

    def forward(self, fn=None):
        """The forward solve of ``fn`` (default ``f(., x)``) from ``z0``, off every tape:
        ``(z*, stats)``, or ``(z0, skipped stats)`` where ``skip`` is true."""
        fn = fn or (lambda z: self.f(z, self.x))
        with stop_recording():
            return unless_skipped(
                self.skip,
                lambda: self.solve(fn, self.z0, max_iter=self.max_iter, tol=self.tol, stop_mode=self.stop_mode,
                                   **self.options),
                self.z0,
                self.max_iter,
            )


class _Adjoint:
    """What every adjoint object shares: its config is its constructor's arguments, and
    two objects of one class with one config are equal."""

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        settings = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({settings})"

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    __hash__ = None


class ImplicitAdjoint(_Adjoint):
    """Implicit differentiation: solve ``g = J_f(z*)^T g + v``, then ``g^T df/d(x, theta)``.

    Args:
        solver: the adjoint solve's solver name; ``None`` (the default) uses the forward
            solver with its options.
        max_iter: the adjoint solve's budget; ``None`` (the default) uses the forward's.
        tol: the adjoint solve's tolerance; ``None`` (the default) uses the forward's.
        stop_mode: ``"rel"`` (the default) stops a sample once
            ``||g - J^T g - v|| <= tol * ||v||``, so the gradient is linear in the loss at
            every scale; ``"abs"`` once ``||g - J^T g - v|| <= tol``; ``None`` uses the
            forward's stopping rule. See :func:`solve_adjoint`.

        start: ``"rhs"`` (the default) starts the adjoint solve at ``g = v`` (see
            :func:`solve_adjoint`); ``"zero"`` at ``g = 0``, with the system solved as
            it is and the solver's own stopping rule (relative to ``||J^T g + v||``
            for ``"rel"``), as the DEQ reference code does. A zero start needs a solver
            that never returns its start (``"reference_anderson"``): one that could
            would report a zero gradient as converged whenever ``||v|| < tol``.
        output: what the forward pass returns where it evaluates ``f`` at ``z*`` (calls
            with a Jacobian penalty, i.e. training calls of a penalised layer):
            ``"state"`` (the default), ``z*``; or ``"update"``, ``f(z*)``, as the
            DEQ-fusion paper's code returns in training. The gradient is the same;
            calls without that evaluation return ``z*`` either way.

    The forward pass evaluates ``f`` at ``z*`` once more when the problem has a Jacobian
    penalty, which then shares that evaluation with the gradient; otherwise the
    gradient makes that evaluation itself, so a call without a tape costs the solve
    alone.
    """

    def __init__(self, solver=None, max_iter=None, tol=None, stop_mode=BACKWARD_STOP_MODE, start="rhs",
                 output="state"):
        if solver is not None:
            check_choice("solver", solver, available_solvers())
        check_optional_solver_arguments(max_iter, tol, stop_mode)
        check_choice("start", start, ADJOINT_STARTS)
        check_choice("output", output, OUTPUTS)
        self.solver, self.max_iter, self.tol, self.stop_mode = solver, max_iter, tol, stop_mode
        self.start, self.output = start, output

    def solution(self, problem):
        return _implicit_solution(problem, self._solve, evaluate_in_forward=problem.penalty is not None,
                                  output=self.output)

    def _solve(self, problem, vjp, v):
        """``g`` of the adjoint system ``g = vjp(g) + v``, with this object's settings."""
        same_solver = self.solver is None
        solve = problem.solve if same_solver else get_solver(self.solver)
        options = problem.options if same_solver else {}
        max_iter = self.max_iter or problem.max_iter
        g, stats = unless_skipped(
            problem.skip,
            lambda: solve_adjoint(
                solve,
                vjp,
                v,
                max_iter=max_iter,
                tol=self.tol or problem.tol,
                stop_mode=self.stop_mode or problem.stop_mode,
                start=self.start,
                **options,
            ),
            tf.zeros_like(v),
            max_iter,
        )
        if problem.backward_callback is not None:
            problem.backward_callback(stats)
        return g

    def get_config(self):
        return {"solver": self.solver, "max_iter": self.max_iter, "tol": self.tol, "stop_mode": self.stop_mode,
                "start": self.start, "output": self.output}


class PhantomAdjoint(_Adjoint):
    """The phantom gradient: autodiff through ``steps`` damped steps
    ``z <- (1 - damping) z + damping f(z, x)`` from the solution ``z*`` (Geng et al.,
    "On Training Implicit Models", 2021).

    Args:
        steps: the number of unrolled steps ``k``; default 5.
        damping: the damping ``lam``, in ``(0, 1]``; default 0.5.
    """

    def __init__(self, steps=PHANTOM_STEPS, damping=PHANTOM_DAMPING):
        check_phantom_arguments(steps, damping, prefix="")
        self.steps, self.damping = steps, damping

    def solution(self, problem):
        z_star, stats = problem.forward()
        z_star = tf.stop_gradient(z_star)
        z = z_star
        for _ in range(self.steps):
            z = (1.0 - self.damping) * z + self.damping * problem.f(z, problem.x)
        return z, with_penalty(problem, z_star, stats)

    def get_config(self):
        return {"steps": self.steps, "damping": self.damping}


class UnrolledAdjoint(_Adjoint):
    """Autodiff through ``max_iter`` plain iterations of ``f`` from ``z0``, with no early
    exit. The solution is the last iterate and ``stats.steps`` is ``max_iter``; the
    forward solver is not used."""

    def solution(self, problem):
        f, x, z0 = problem.f, problem.x, problem.z0
        dtype = internal_dtype(z0.dtype)

        def body(k, z, trace):
            fz = tf.ensure_shape(f(z, x), z.shape)
            res = tf.cast(tf.reduce_mean(residual_norm(z, fz, problem.stop_mode)), dtype)
            return k + 1, fz, tf.tensor_scatter_nd_update(trace, [[k]], [res])

        _, z, trace = tf.while_loop(
            lambda k, z, trace: k < problem.max_iter,
            body,
            (tf.constant(0), z0, tf.zeros([problem.max_iter], dtype)),
            maximum_iterations=problem.max_iter,
        )
        stats = unrolled_stats(lambda s: f(s, x), z, problem.max_iter, trace, problem.tol, problem.stop_mode)
        return z, with_penalty(problem, z, stats)


_ADJOINTS = {cls.__name__: cls for cls in (ImplicitAdjoint, PhantomAdjoint, UnrolledAdjoint)}


def as_adjoint(
    backward,
    *,
    backward_max_iter=None,
    backward_tol=None,
    backward_stop_mode=BACKWARD_STOP_MODE,
    phantom_steps=PHANTOM_STEPS,
    phantom_damping=PHANTOM_DAMPING,
):
    """The adjoint object for ``backward``: an adjoint object (returned as it is), a
    :func:`serialize_adjoint` config, or a shorthand name with the settings that name
    takes:

    - ``"implicit"``: ``ImplicitAdjoint(max_iter=backward_max_iter, tol=backward_tol,
      stop_mode=backward_stop_mode)``;
    - ``"phantom"``: ``PhantomAdjoint(phantom_steps, phantom_damping)``;
    - ``"unrolled"``: ``UnrolledAdjoint()``.
    """
    if isinstance(backward, tuple(_ADJOINTS.values())):
        return backward
    if isinstance(backward, dict):
        return deserialize_adjoint(backward)
    check_backward(backward)
    check_optional_solver_arguments(backward_max_iter, backward_tol, backward_stop_mode, prefix="backward_")
    check_phantom_arguments(phantom_steps, phantom_damping)
    if backward == "implicit":
        return ImplicitAdjoint(max_iter=backward_max_iter, tol=backward_tol, stop_mode=backward_stop_mode)
    if backward == "phantom":
        return PhantomAdjoint(phantom_steps, phantom_damping)
    return UnrolledAdjoint()


def serialize_adjoint(adjoint):
    """``{"class_name", "config"}`` of an adjoint object, for a layer's ``get_config``."""
    return {"class_name": type(adjoint).__name__, "config": adjoint.get_config()}


def deserialize_adjoint(config):
    """The adjoint object of a :func:`serialize_adjoint` config; only the three adjoint
    classes are accepted, so a config cannot name arbitrary code."""
    name = config.get("class_name") if isinstance(config, dict) else None
    if name not in _ADJOINTS:
        raise ValueError(f"An adjoint config must name one of {sorted(_ADJOINTS)}, got {config!r}.")
    return _ADJOINTS[name].from_config(dict(config.get("config") or {}))


def solve_adjoint(solve, vjp, v, *, max_iter, tol, stop_mode="rel", start="rhs", **options):
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
        start: ``"rhs"`` (the above) or ``"zero"``: the solve starts at ``g = 0`` and
            ``solve`` gets the system as it is, with ``stop_mode`` for its own rule
            (see :class:`ImplicitAdjoint`); ``solve`` must never return its start.
        **options: the solver's keyword arguments.

    Returns:
        ``(g, stats)``: ``g`` in ``v``'s dtype, and the solve's ``SolverStats``, whose
        residuals are relative to ``||v||`` for ``"rel"``.
    """
    check_choice("stop_mode", stop_mode, STOP_MODES)
    check_choice("start", start, ADJOINT_STARTS)
    dtype = internal_dtype(v.dtype)
    rhs = tf.cast(v, dtype)
    if start == "zero":
        if not getattr(solve, "never_returns_start", False):
            raise ValueError(
                "An adjoint solve started at zero needs a solver that never returns its start "
                f"(such as 'reference_anderson'); {getattr(solve, '__name__', solve)!r} may return it, "
                "and with it a zero gradient."
            )
        h, stats = solve(lambda h: tf.cast(vjp(h), dtype) + rhs, tf.zeros_like(rhs), max_iter=max_iter, tol=tol,
                         stop_mode=stop_mode, **options)
        return tf.cast(h, v.dtype), stats
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


def unless_skipped(skip, run, placeholder, length):
    """``run()``, a ``(z, SolverStats)`` solve, or with a boolean tensor ``skip``, that
    solve only where ``skip`` is false; else ``placeholder`` and
    :func:`~keras_mmfusion.equilibrium.iteration.skipped_stats`."""
    if skip is None:
        return run()

    def skipped():
        return (placeholder,) + tuple(skipped_stats(placeholder, length)[:4])

    def solved():
        z, stats = run()
        return (z,) + tuple(stats[:4])

    z, *fields = tf.cond(skip, skipped, solved)
    return z, SolverStats(*fields)


def _implicit_solution(problem, solve_adjoint_of, evaluate_in_forward, output="state"):
    """The forward solve's ``z*`` with the implicit gradient attached.

    The gradient takes ``g = solve_adjoint_of(problem, vjp, dz)``, with ``vjp`` the
    products ``g -> g^T J_f(z*)`` of an evaluation ``fz = f(z*, x)``, and carries ``g``
    through ``fz`` to ``x`` and to ``f``'s variables: ``g^T df/d(x, theta)``.

    ``evaluate_in_forward`` says where ``fz`` is evaluated. In the forward pass it is
    recorded by the caller's tape, which carries ``g`` on, and the problem's Jacobian
    penalty reads the same ``vjp`` (its products are recorded too, so the penalty's
    gradient is exact, with second derivatives of ``f``). Otherwise the gradient
    function evaluates ``fz`` under a tape of its own, and a call that takes no
    gradient costs the forward solve alone. With ``output="update"`` the value of a
    solution evaluated in the forward pass is ``fz`` instead of ``z*``.
    """
    if evaluate_in_forward:
        z_star, stats = problem.forward()
        z_star = tf.stop_gradient(z_star)
        fz, vjp = _linearise(lambda z: problem.f(z, problem.x), z_star)
        penalty = problem.penalty.from_vjp(vjp, z_star) if problem.penalty is not None else None

        @tf.custom_gradient
        def solution(fz):
            value = fz if output == "update" else z_star
            return tf.identity(value), lambda dz: solve_adjoint_of(problem, vjp, dz)

        return solution(fz), stats._replace(jacobian=penalty)

    flat = [tf.convert_to_tensor(t) for t in tf.nest.flatten(problem.x)]

    def f_of(z, xs):
        return problem.f(z, tf.nest.pack_sequence_as(problem.x, list(xs)) if flat else problem.x)

    record = []

    # The forward solve runs inside the custom gradient, so that the variables f reads
    # are the gradient's variables.
    @tf.custom_gradient
    def solution(*xs):
        z_star, stats = problem.forward(lambda z: f_of(z, xs))
        record.append(stats)

        def grad(dz, variables=None):
            sources = list(xs) + list(variables or [])
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(sources)
                fz, vjp = _linearise(lambda z: f_of(z, xs), z_star)
            g = solve_adjoint_of(problem, vjp, dz)
            grads = tape.gradient(fz, sources, output_gradients=g, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            return grads[: len(xs)], grads[len(xs) :]

        return z_star, grad

    # tf.custom_gradient needs at least one tensor input.
    z = solution(*(flat or [tf.zeros([0])]))
    return z, record[0]


def _linearise(fn, z):
    """``(fz, vjp)``: ``fz = fn(z)``, recorded by every active tape, and
    ``vjp(v) = v^T J_fn(z)``, taken from a tape of its own."""
    with tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
        tape.watch(z)
        fz = fn(z)

    def vjp(v):
        return tape.gradient(fz, z, output_gradients=tf.cast(v, fz.dtype))

    return fz, vjp


def with_penalty(problem, z, stats):
    """``stats`` with the problem's Jacobian penalty taken at ``z`` (by its own
    evaluation of ``f``), if it has one."""
    if problem.penalty is None:
        return stats
    return stats._replace(jacobian=problem.penalty.at(lambda s: problem.f(s, problem.x), z))


def _row_norm(x):
    """``(batch,)``: each row's Euclidean norm, scaled by its largest entry first so that
    no square underflows (an upstream gradient of 1e-25 in float32 has a norm, not 0)."""
    largest = tf.reduce_max(tf.abs(x), axis=-1, keepdims=True)
    safe = tf.where(largest > 0, largest, tf.ones_like(largest))
    return tf.squeeze(largest, -1) * tf.sqrt(tf.reduce_sum(tf.square(x / safe), axis=-1))
