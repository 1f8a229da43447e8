"""The adjoint solve of implicit gradients: its own stopping rule, its start, its statistics.

The map ``z = A z + x`` with ``||A||_2 = 0.6`` and the loss ``c * sum(z*)`` have the closed-form
gradient ``dL/dx = c (I - A^T)^{-1} 1`` for every sample, at every loss scale ``c``.
"""

import numpy as np
import pytest
import tensorflow as tf

from keras_mmfusion.equilibrium import ImplicitAdjoint, fixed_point_solve

DIM, BATCH = 6, 4
SCALES = [1e-8, 1e-4, 1e-2, 1.0, 1e2]


def linear_problem(dtype="float64", seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(DIM, DIM))
    a = 0.6 * a / np.linalg.norm(a, 2)
    a_t = tf.constant(a.T, dtype)
    x = tf.constant(rng.normal(size=(BATCH, DIM)), dtype)
    exact = np.linalg.solve(np.eye(DIM) - a.T, np.ones(DIM))
    return (lambda z, x: z @ a_t + x), x, exact


def input_gradient(f, x, scale, weights=None, **kwargs):
    """``dL/dx`` of ``L = scale * sum(weights * z*)`` (``weights`` per sample, default 1)."""
    weights = tf.ones([BATCH, 1], x.dtype) if weights is None else tf.constant(weights, x.dtype)
    with tf.GradientTape() as tape:
        tape.watch(x)
        z, _ = fixed_point_solve(f, x, tf.zeros_like(x), **kwargs)
        loss = tf.cast(scale, x.dtype) * tf.reduce_sum(weights * z)
    return tape.gradient(loss, x).numpy()


def per_sample_error(grad, exact):
    return np.linalg.norm(grad - exact, axis=-1) / np.linalg.norm(exact)


@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "broyden"])
@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_implicit_gradient_is_linear_in_the_loss_at_every_scale(solver, stop_mode):
    # The forward solve's tolerance (1e-3, absolute or relative) is the adjoint's by
    # default; the adjoint stops relative to each sample's upstream gradient, so a loss
    # of 1e-8 gets the same gradient, divided by its scale, as a loss of 1.
    f, x, exact = linear_problem()
    tol = 1e-3
    for scale in SCALES:
        grad = input_gradient(f, x, scale, solver=solver, tol=tol, stop_mode=stop_mode) / scale
        assert np.all(np.any(grad != 0, axis=-1)), (scale, "a sample's gradient is exactly zero")
        assert per_sample_error(grad, exact).max() <= 10 * tol, scale


@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "broyden"])
def test_zero_only_for_a_zero_upstream_gradient(solver):
    # Sample 0 is not in the loss: its gradient is exactly zero. Every other sample's is
    # not, also under an absolute adjoint stop whose tolerance its upstream gradient is
    # far below: the adjoint solve starts at the upstream gradient, never at zero.
    f, x, exact = linear_problem()
    weights = [[0.0], [1.0], [1.0], [1.0]]
    grad = input_gradient(f, x, 1e-8, weights, solver=solver, tol=1e-3, stop_mode="abs") / 1e-8
    assert not grad[0].any()
    assert per_sample_error(grad[1:], exact).max() <= 1e-2
    grad = input_gradient(f, x, 1e-8, weights, solver=solver, tol=1e-3, adjoint=ImplicitAdjoint(stop_mode="abs")) / 1e-8
    assert not grad[0].any()
    assert np.all(np.any(grad[1:] != 0, axis=-1))
    # Stopped at once, the answer is the start v, the first term of the Neumann series
    # (the gradient of the map alone), which the exact gradient is closest to.
    assert per_sample_error(grad[1:], exact).max() < per_sample_error(np.ones(DIM), exact)[()] + 1e-12


def test_upstream_gradients_whose_squares_underflow_keep_their_size():
    # float32, a loss of 1e-30: every upstream entry is 1e-30, whose square underflows.
    f, x, exact = linear_problem("float32")
    grad = input_gradient(f, x, 1e-30, solver="anderson", tol=1e-4) / 1e-30
    assert per_sample_error(grad, exact).max() <= 1e-3


def test_backward_statistics_reach_the_callback():
    f, x, _ = linear_problem()
    recorded = []
    common = dict(solver="anderson", tol=1e-3, backward_callback=recorded.append)
    input_gradient(f, x, 1e-6, **common)
    stats = recorded[-1]
    assert stats.residual.shape == (BATCH,) and bool(tf.reduce_all(stats.converged))
    assert 1 <= int(stats.steps) <= 50
    assert float(tf.reduce_max(stats.residual)) <= 1e-3
    # The trace starts at the relative residual of g = v, ||J^T v|| / ||v|| <= 0.6.
    assert 0 < float(stats.trace[0]) <= 0.6 + 1e-12
    # Capped at 2 iterations with an unreachable tolerance: not converged, and it says so.
    input_gradient(f, x, 1e-6, adjoint=ImplicitAdjoint(max_iter=2, tol=1e-12), **common)
    stats = recorded[-1]
    assert int(stats.steps) == 2
    assert not bool(tf.reduce_any(stats.converged))
    assert float(tf.reduce_min(stats.residual)) > 1e-12
    # No callback for a backward mode without an adjoint solve.
    count = len(recorded)
    input_gradient(f, x, 1.0, adjoint="phantom", backward_callback=recorded.append)
    assert len(recorded) == count


def test_a_warmup_runs_no_adjoint_solve_and_the_solve_after_it_does():
    f, x, exact = linear_problem()
    a_t = f(tf.eye(DIM, dtype=x.dtype), tf.zeros([DIM, DIM], x.dtype)).numpy()

    @tf.function
    def step(x, warmup):
        recorded = []
        with tf.GradientTape() as tape:
            tape.watch(x)
            z, _ = fixed_point_solve(f, x, tf.zeros_like(x), tol=1e-6, warmup=warmup, warmup_depth=5,
                                     backward_callback=recorded.append)
            loss = tf.reduce_sum(z)
        return tape.gradient(loss, x), recorded[-1].steps, recorded[-1].converged

    grad, steps, converged = step(x, tf.constant(True))
    # Five plain iterations from 0 differentiated by autodiff: sum_{k<5} (A^T)^k 1.
    shallow = sum(np.linalg.matrix_power(a_t, k) @ np.ones(DIM) for k in range(5))
    np.testing.assert_allclose(grad.numpy(), np.broadcast_to(shallow, grad.shape), rtol=1e-12)
    assert int(steps) == 0 and bool(tf.reduce_all(converged))
    grad, steps, converged = step(x, tf.constant(False))
    assert per_sample_error(grad.numpy(), exact).max() <= 1e-5
    assert int(steps) > 0 and bool(tf.reduce_all(converged))


def test_bad_backward_stop_mode_is_refused():
    f, x, _ = linear_problem()
    with pytest.raises(ValueError, match=r"stop_mode must be one of \('abs', 'rel'\), got 'relative'"):
        fixed_point_solve(f, x, tf.zeros_like(x), adjoint=ImplicitAdjoint(stop_mode="relative"))
