"""The DEQ reference code's Anderson (``reference_anderson``) and the adjoint options that
reproduce the DEQ-fusion paper's training: a zero adjoint start and ``f(z*)`` as output."""

import numpy as np
import pytest
import tensorflow as tf

from keras_mmfusion.equilibrium import ImplicitAdjoint, fixed_point_solve, get_solver

from test_adjoint_objects import BATCH, DIM, make_problem, rel_err, z0


def reference_by_hand(f, x0, threshold, stop_mode, m=6, lam=1e-4):
    """The reference algorithm written out in NumPy: two plain evaluations, then Anderson
    with an absolute ridge; the lowest whole-batch residual from the third evaluation."""
    f0 = f(x0)
    xs, fs = [x0, f0], [f0, f(f0)]
    best, lowest = None, np.inf
    for k in range(2, threshold):
        n = min(k, m)
        X, F = np.stack(xs[-n:], 1), np.stack(fs[-n:], 1)  # (batch, n, dim)
        G = F - X
        H = G @ G.transpose(0, 2, 1) + lam * np.eye(n)
        y = np.linalg.solve(H, np.ones((x0.shape[0], n, 1)))[..., 0]
        alpha = y / y.sum(-1, keepdims=True)
        x = np.einsum("bn,bnd->bd", alpha, F)
        fx = f(x)
        xs, fs = xs + [x], fs + [fx]
        diff = np.linalg.norm(fx - x)
        res = diff if stop_mode == "abs" else diff / (np.linalg.norm(fx) + 1e-5)
        if res < lowest:
            best, lowest = x, res
    return best


@pytest.mark.parametrize("scale", [0.5, 1.5])  # a contraction, and a map whose iteration diverges
@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_reference_anderson_is_the_reference_algorithm(scale, stop_mode):
    rng = np.random.default_rng(3)
    a = rng.normal(size=(4, 12, 12)) * scale / np.sqrt(12)
    b = rng.normal(size=(4, 12))

    def f_np(z):
        return np.einsum("bij,bj->bi", a, z) + b

    def f_tf(z):
        return tf.einsum("bij,bj->bi", tf.constant(a), z) + tf.constant(b)

    z, stats = get_solver("reference_anderson")(f_tf, tf.zeros((4, 12), tf.float64), max_iter=25, tol=1e-300,
                                                stop_mode=stop_mode)
    expected = reference_by_hand(f_np, np.zeros((4, 12)), 25, stop_mode)
    assert rel_err(z.numpy(), expected) < 1e-9
    assert int(stats.steps) == 25 and not bool(np.any(stats.converged))


def test_reference_anderson_stops_on_the_whole_batch_residual():
    f = lambda z: 0.5 * tf.tanh(z) + 1.0  # noqa: E731
    z, stats = get_solver("reference_anderson")(f, tf.zeros((3, 4), tf.float64), max_iter=40, tol=1e-6,
                                                stop_mode="abs")
    assert 3 <= int(stats.steps) < 40 and bool(np.all(stats.converged))
    assert float(tf.norm(f(z) - z)) < 1e-6
    with pytest.raises(ValueError, match="max_iter"):
        get_solver("reference_anderson")(f, tf.zeros((3, 4)), max_iter=2)


def test_a_zero_adjoint_start_gives_the_implicit_derivative():
    # The default adjoint's gradient is checked against central differences in
    # test_adjoint_objects; on a contraction both solves converge to the same gradient.
    f, x, w, loss = make_problem(seed=1)

    def gradients(adjoint, solver):
        with tf.GradientTape() as tape:
            tape.watch(x)
            z, _ = fixed_point_solve(f, x, z0(), solver=solver, max_iter=60, tol=1e-13, adjoint=adjoint)
            value = loss(z)
        return [g.numpy() for g in tape.gradient(value, [x, w])]

    zero = gradients(ImplicitAdjoint(max_iter=60, tol=1e-13, stop_mode="rel", start="zero"), "reference_anderson")
    default = gradients(ImplicitAdjoint(tol=1e-13), "anderson")
    for a, b in zip(zero, default):
        assert rel_err(a, b) < 1e-8


def test_a_zero_adjoint_start_needs_a_solver_that_never_returns_its_start():
    f, x, w, loss = make_problem()
    with tf.GradientTape() as tape:
        z, _ = fixed_point_solve(f, x, z0(), solver="anderson", max_iter=30, tol=1e-10,
                                 adjoint=ImplicitAdjoint(start="zero"))
        value = loss(z)
    with pytest.raises(ValueError, match="never returns its start"):
        tape.gradient(value, w)


@pytest.mark.parametrize("output", ["state", "update"])
def test_the_update_output_is_f_of_the_solution_where_the_forward_evaluates_it(output):
    f, x, w, loss = make_problem()
    adjoint = ImplicitAdjoint(output=output)
    probes = tf.random.stateless_normal((1, BATCH, DIM), seed=[1, 2], dtype=tf.float64)
    z, stats = fixed_point_solve(f, x, z0(), solver="reference_anderson", max_iter=4, tol=1e-300, adjoint=adjoint,
                                 jacobian_probes=probes)
    iterate, _ = get_solver("reference_anderson")(lambda z: f(z, x), z0(), max_iter=4, tol=1e-300)
    expected = f(iterate, x) if output == "update" else iterate
    np.testing.assert_allclose(z.numpy(), expected.numpy(), rtol=1e-12)
    assert not np.allclose(iterate.numpy(), f(iterate, x).numpy(), rtol=1e-6)  # four steps do not converge
    # Without the Jacobian penalty's evaluation, the solution is z* either way.
    z, _ = fixed_point_solve(f, x, z0(), solver="reference_anderson", max_iter=4, tol=1e-300, adjoint=adjoint)
    np.testing.assert_allclose(z.numpy(), iterate.numpy(), rtol=1e-12)
    assert ImplicitAdjoint.from_config(adjoint.get_config()) == adjoint
