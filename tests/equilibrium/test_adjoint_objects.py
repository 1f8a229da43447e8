"""The adjoint objects: each one's gradient against central finite differences in float64,
the shorthand names giving exactly their objects' gradients, an adjoint solver other
than the forward's, and serialization."""

import numpy as np
import pytest
import tensorflow as tf

from keras_mmfusion.equilibrium import ImplicitAdjoint, PhantomAdjoint, UnrolledAdjoint, fixed_point_solve
from keras_mmfusion.equilibrium.adjoint import as_adjoint, deserialize_adjoint, serialize_adjoint

DIM, IN, BATCH = 5, 3, 2
EPS = 1e-6


def make_problem(seed=0):
    """f(z, x) = tanh(z W + x U + b) with ||W||_2 = 0.6, in float64, and a loss of z."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(DIM, DIM))
    w = tf.Variable(0.6 * w / np.linalg.norm(w, 2), name="W")
    u = tf.constant(rng.normal(size=(IN, DIM)))
    x = tf.constant(rng.normal(size=(BATCH, IN)))
    weights = tf.constant(rng.normal(size=(BATCH, DIM)))

    def f(z, x):
        return tf.tanh(z @ w + x @ u)

    def loss(z):
        return tf.reduce_sum(tf.sin(z) * weights)

    return f, x, w, loss


def z0():
    return tf.zeros((BATCH, DIM), tf.float64)


def solve_gradients(f, x, w, loss, **kwargs):
    with tf.GradientTape() as tape:
        tape.watch(x)
        z, _ = fixed_point_solve(f, x, z0(), **kwargs)
        value = loss(z)
    gx, gw = tape.gradient(value, [x, w])
    return gx.numpy(), gw.numpy()


def central_differences(value, x, w):
    """``d value(x) / d(x, W)`` by central differences; ``value`` reads ``W``."""
    x_np, w_np = x.numpy(), w.numpy()
    fd_x, fd_w = np.zeros_like(x_np), np.zeros_like(w_np)
    for idx in np.ndindex(*x_np.shape):
        step = np.zeros_like(x_np)
        step[idx] = EPS
        fd_x[idx] = (value(tf.constant(x_np + step)) - value(tf.constant(x_np - step))) / (2 * EPS)
    for idx in np.ndindex(*w_np.shape):
        step = np.zeros_like(w_np)
        step[idx] = EPS
        w.assign(w_np + step)
        up = value(x)
        w.assign(w_np - step)
        down = value(x)
        w.assign(w_np)
        fd_w[idx] = (up - down) / (2 * EPS)
    return fd_x, fd_w


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def exact_solution(f, x):
    """``z*`` to float64 precision by plain iteration (the map is a contraction)."""
    z = z0()
    for _ in range(300):
        z = f(z, x)
    return z


@pytest.mark.parametrize(
    "adjoint", [ImplicitAdjoint(tol=1e-13), ImplicitAdjoint(solver="fixed_point", max_iter=300, tol=1e-13)]
)
def test_implicit_adjoint_is_the_derivative_of_the_solution(adjoint):
    # The second case solves the adjoint system by plain iteration under an Anderson
    # forward solve.
    f, x, w, loss = make_problem(seed=1)
    grads = solve_gradients(f, x, w, loss, solver="anderson", max_iter=200, tol=1e-13, adjoint=adjoint)
    value = tf.function(lambda x: loss(exact_solution(f, x)))
    for name, grad, fd in zip(["x", "W"], grads, central_differences(value, x, w)):
        assert rel_err(grad, fd) < 1e-7, name


def test_phantom_adjoint_is_the_derivative_of_its_damped_steps_from_the_solution():
    # The phantom gradient is exact for the map x -> k damped steps from a z* held fixed.
    f, x, w, loss = make_problem(seed=2)
    adjoint = PhantomAdjoint(steps=3, damping=0.7)
    grads = solve_gradients(f, x, w, loss, solver="anderson", max_iter=200, tol=1e-13, adjoint=adjoint)
    z_star = exact_solution(f, x)

    def steps_from_fixed_solution(x):
        z = z_star
        for _ in range(3):
            z = 0.3 * z + 0.7 * f(z, x)
        return loss(z)

    value = tf.function(steps_from_fixed_solution)
    for name, grad, fd in zip(["x", "W"], grads, central_differences(value, x, w)):
        assert rel_err(grad, fd) < 1e-7, name


def test_unrolled_adjoint_is_the_derivative_of_max_iter_plain_iterations():
    f, x, w, loss = make_problem(seed=3)
    grads = solve_gradients(f, x, w, loss, max_iter=4, adjoint=UnrolledAdjoint())

    def four_iterations(x):
        z = z0()
        for _ in range(4):
            z = f(z, x)
        return loss(z)

    value = tf.function(four_iterations)
    for name, grad, fd in zip(["x", "W"], grads, central_differences(value, x, w)):
        assert rel_err(grad, fd) < 1e-7, name


@pytest.mark.parametrize(
    "name, settings, obj",
    [
        ("implicit", dict(backward_max_iter=7, backward_tol=1e-9), ImplicitAdjoint(max_iter=7, tol=1e-9)),
        ("implicit", {}, ImplicitAdjoint()),
        ("phantom", dict(phantom_steps=2, phantom_damping=0.9), PhantomAdjoint(2, 0.9)),
        ("unrolled", {}, UnrolledAdjoint()),
    ],
)
def test_each_shorthand_name_gives_exactly_its_objects_gradient(name, settings, obj):
    assert as_adjoint(name, **settings) == obj
    f, x, w, loss = make_problem(seed=4)
    common = dict(solver="broyden", max_iter=30, tol=1e-6)
    by_object = solve_gradients(f, x, w, loss, adjoint=obj, **common)
    by_name = solve_gradients(f, x, w, loss, adjoint=as_adjoint(name, **settings), **common)
    for a, b in zip(by_object, by_name):
        np.testing.assert_array_equal(a, b)
    if not settings:
        for a, b in zip(by_object, solve_gradients(f, x, w, loss, adjoint=name, **common)):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(by_object, solve_gradients(f, x, w, loss, backward=name, **common)):
            np.testing.assert_array_equal(a, b)


def test_an_adjoint_solver_of_its_own_runs_its_own_iterations():
    # Plain iteration needs more steps on the adjoint system than Anderson does.
    f, x, w, loss = make_problem(seed=5)
    steps = {}
    for solver in [None, "fixed_point"]:
        recorded = []
        solve_gradients(f, x, w, loss, solver="anderson", max_iter=100, tol=1e-10,
                        adjoint=ImplicitAdjoint(solver=solver), backward_callback=recorded.append)
        steps[solver] = int(recorded[-1].steps)
        assert bool(tf.reduce_all(recorded[-1].converged)), solver
    assert steps["fixed_point"] > steps[None] + 5, steps


@pytest.mark.parametrize(
    "adjoint", [ImplicitAdjoint(solver="broyden", max_iter=9, tol=1e-3, stop_mode="abs"), PhantomAdjoint(4, 0.25),
                UnrolledAdjoint()]
)
def test_adjoint_objects_serialize(adjoint):
    config = serialize_adjoint(adjoint)
    assert deserialize_adjoint(config) == adjoint
    assert type(adjoint).from_config(adjoint.get_config()) == adjoint


def test_bad_adjoint_settings_and_configs_are_refused():
    with pytest.raises(ValueError, match="solver must be one of"):
        ImplicitAdjoint(solver="newton")
    with pytest.raises(ValueError, match="stop_mode must be one of"):
        ImplicitAdjoint(stop_mode="relative")
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        PhantomAdjoint(steps=0)
    with pytest.raises(ValueError, match="An adjoint config must name one of"):
        deserialize_adjoint({"class_name": "os.system", "config": {}})
    f, x, _, _ = make_problem()
    with pytest.raises(ValueError, match="Give adjoint or backward, not both"):
        fixed_point_solve(f, x, z0(), adjoint="phantom", backward="implicit")
