import gc
import weakref

import numpy as np
import pytest
import tensorflow as tf

from keras_mmfusion.equilibrium import ImplicitAdjoint, PhantomAdjoint, fixed_point_solve, hutchinson_jacobian_norm

DIM, IN, BATCH = 6, 4, 3


def make_problem(seed=0):
    """f(z, x) = tanh(z W + x U + b), a contraction (||W||_2 = 0.6), in float64."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(DIM, DIM))
    w = tf.Variable(0.6 * w / np.linalg.norm(w, 2), name="W")
    u = tf.Variable(rng.normal(size=(IN, DIM)), name="U")
    b = tf.Variable(rng.normal(size=(DIM,)), name="b")
    x = tf.constant(rng.normal(size=(BATCH, IN)))
    weights = tf.constant(rng.normal(size=(BATCH, DIM)))

    def f(z, x):
        return tf.tanh(z @ w + x @ u + b)

    def loss(z):
        return tf.reduce_sum(tf.sin(z) * weights)

    return f, x, (w, u, b), loss


def solution_loss(f, x, loss, **kwargs):
    z, _ = fixed_point_solve(f, x, tf.zeros((BATCH, DIM), tf.float64), **kwargs)
    return loss(z)


def gradients(f, x, variables, loss, **kwargs):
    with tf.GradientTape() as tape:
        tape.watch(x)
        value = solution_loss(f, x, loss, **kwargs)
    return tape.gradient(value, [x, *variables])


def rel_err(a, b):
    return float(np.linalg.norm(np.ravel(a) - np.ravel(b)) / np.linalg.norm(np.ravel(b)))


IMPLICIT = dict(adjoint=ImplicitAdjoint(tol=1e-13), max_iter=200, tol=1e-13)


@pytest.mark.parametrize("solver", ["anderson", "broyden", "fixed_point"])
def test_implicit_matches_unrolled_autodiff(solver):
    f, x, variables, loss = make_problem()
    implicit = gradients(f, x, variables, loss, solver=solver, **IMPLICIT)
    unrolled = gradients(f, x, variables, loss, adjoint="unrolled", max_iter=120)
    for name, a, b in zip(["x", "W", "U", "b"], implicit, unrolled):
        assert rel_err(a, b) < 1e-4, name


def test_implicit_matches_central_finite_differences():
    f, x, variables, loss = make_problem(seed=1)
    grads = gradients(f, x, variables, loss, solver="anderson", **IMPLICIT)
    # The loss at the perturbed points, as one traced function (it reads the variables,
    # so assigning them does not retrace): 156 solves, which eager execution runs op by op.
    value = tf.function(lambda x: solution_loss(f, x, loss, **IMPLICIT))
    eps = 1e-6
    x_np = x.numpy()
    fd_x = np.zeros_like(x_np)
    for idx in np.ndindex(*x_np.shape):
        step = np.zeros_like(x_np)
        step[idx] = eps
        up, down = value(tf.constant(x_np + step)), value(tf.constant(x_np - step))
        fd_x[idx] = (up - down) / (2 * eps)
    assert rel_err(grads[0], fd_x) < 1e-4
    for var, grad in zip(variables, grads[1:]):
        start = var.numpy()
        fd = np.zeros_like(start)
        for idx in np.ndindex(*start.shape):
            step = np.zeros_like(start)
            step[idx] = eps
            var.assign(start + step)
            up = value(x)
            var.assign(start - step)
            down = value(x)
            var.assign(start)
            fd[idx] = (up - down) / (2 * eps)
        assert rel_err(grad, fd) < 1e-4, var.name


@pytest.mark.parametrize("mode", ["tf_function", "xla"])
def test_implicit_gradients_in_graph_mode_and_xla(mode):
    f, x, variables, loss = make_problem(seed=2)
    eager = gradients(f, x, variables, loss, solver="anderson", **IMPLICIT)
    compiled = tf.function(
        lambda x: gradients(f, x, variables, loss, solver="anderson", **IMPLICIT),
        jit_compile=(mode == "xla"),
    )(x)
    for a, b in zip(compiled, eager):
        assert rel_err(a, b) < 1e-8


def test_phantom_gradient_points_the_same_way():
    f, x, variables, loss = make_problem(seed=3)
    exact = gradients(f, x, variables, loss, solver="anderson", **IMPLICIT)
    phantom = gradients(f, x, variables, loss, solver="anderson", adjoint="phantom", max_iter=200, tol=1e-12)
    a = np.concatenate([np.ravel(g) for g in phantom])
    b = np.concatenate([np.ravel(g) for g in exact])
    cosine = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    assert cosine > 0.9


def test_nested_inputs_and_unused_inputs_get_gradients():
    f, x, variables, loss = make_problem(seed=4)
    unused = tf.constant(np.ones((BATCH, 2)))

    def g(z, inputs):
        return f(z, inputs["x"])

    with tf.GradientTape() as tape:
        tape.watch([x, unused])
        z, _ = fixed_point_solve(g, {"x": x, "unused": unused}, tf.zeros((BATCH, DIM), tf.float64), **IMPLICIT)
        value = loss(z)
    gx, gu = tape.gradient(value, [x, unused])
    reference = gradients(f, x, variables, loss, **IMPLICIT)[0]
    assert rel_err(gx, reference) < 1e-10
    np.testing.assert_array_equal(gu.numpy(), 0.0)


def _alive_update_outputs(backward, iters):
    """How many outputs of f an open tape keeps alive after a solve of ``iters`` steps."""
    f, x, _, loss = make_problem(seed=5)
    refs = []

    def tracked(z, x):
        out = f(z, x)
        refs.append(weakref.ref(out))
        return out

    with tf.GradientTape() as tape:
        tape.watch(x)
        solution_loss(tracked, x, loss, adjoint=backward, max_iter=iters, tol=1e-30)
        gc.collect()
        return sum(ref() is not None for ref in refs)


def test_implicit_forward_keeps_no_per_iteration_tensors():
    assert _alive_update_outputs("implicit", 40) == _alive_update_outputs("implicit", 10)
    assert _alive_update_outputs("implicit", 40) <= 3
    # The unrolled reference keeps one per iteration, which is what the implicit mode avoids.
    assert _alive_update_outputs("unrolled", 40) >= 40


def test_bad_backward_arguments_raise_value_error():
    f, x, _, _ = make_problem()
    z0 = tf.zeros((BATCH, DIM), tf.float64)
    with pytest.raises(ValueError, match="backward must be one of"):
        fixed_point_solve(f, x, z0, adjoint="adjoint")
    with pytest.raises(ValueError, match="damping must be in"):
        fixed_point_solve(f, x, z0, adjoint=PhantomAdjoint(damping=2.0))
    with pytest.raises(ValueError, match="max_iter must be an integer"):
        fixed_point_solve(f, x, z0, adjoint=ImplicitAdjoint(max_iter=0))


def test_hutchinson_estimate_and_its_gradient():
    rng = np.random.default_rng(6)
    w = tf.Variable(rng.normal(size=(DIM, DIM)))
    z = tf.constant(rng.normal(size=(BATCH, DIM)))
    probes = rng.normal(size=(4, BATCH, DIM))

    def f(z):
        return z @ w

    with tf.GradientTape() as tape:
        estimate = hutchinson_jacobian_norm(f, z, probes=probes)
    # For f(z) = z W, e^T J = e W^T; the estimate is the mean of ||e W^T||^2 / dim.
    expected = np.sum((probes @ w.numpy().T) ** 2) / (4 * BATCH * DIM)
    np.testing.assert_allclose(float(estimate), expected, rtol=1e-12)
    # d/dW of e^T W^T W e is 2 W e e^T; summed over the probes and normalised.
    outer = np.einsum("pbi,pbj->ij", probes, probes)
    expected_grad = 2 * w.numpy() @ outer / (4 * BATCH * DIM)
    np.testing.assert_allclose(tape.gradient(estimate, w).numpy(), expected_grad, rtol=1e-10)
    # Without fixed probes the estimate is unbiased: many probes approach ||W||_F^2 / dim.
    many = hutchinson_jacobian_norm(f, z, num_probes=2000)
    np.testing.assert_allclose(float(many), np.sum(w.numpy() ** 2) / DIM, rtol=0.05)


def test_unrolled_map_with_unknown_batch_size():
    f, x, _, loss = make_problem(seed=7)

    def g(z, x):
        return tf.reshape(f(z, x), [-1, DIM])

    z, stats = tf.function(lambda: fixed_point_solve(g, x, tf.zeros((BATCH, DIM), tf.float64), adjoint="unrolled", max_iter=5))()
    assert z.shape == (BATCH, DIM) and int(stats.steps) == 5


def test_penalty_and_implicit_backward_share_one_evaluation_at_the_solution():
    f, x, variables, loss = make_problem(seed=2)
    calls = []

    def counted(z, x):
        calls.append(1)
        return f(z, x)

    probes = tf.constant(np.random.default_rng(5).normal(size=(2, BATCH, DIM)))
    options = dict(solver="anderson", **IMPLICIT)
    with tf.GradientTape() as tape:
        tape.watch(x)
        z, stats = fixed_point_solve(counted, x, tf.zeros((BATCH, DIM), tf.float64), jacobian_probes=probes, **options)
        total = loss(z) + 3.0 * stats.jacobian
    shared = tape.gradient(total, [x, *variables])
    # The forward solve evaluates f `steps` times; the penalty and the adjoint solve
    # both read the one evaluation at z* made after it.
    assert len(calls) == int(stats.steps) + 1

    # The same gradient from separate pieces: the implicit gradient of the loss, and
    # the penalty's gradient at the fixed point held constant.
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        z_alone, _ = fixed_point_solve(f, x, tf.zeros((BATCH, DIM), tf.float64), **options)
        value = loss(z_alone)
        penalty = hutchinson_jacobian_norm(lambda s: f(s, x), tf.stop_gradient(z_alone), probes=probes)
    separate = [a + 3.0 * b for a, b in zip(tape.gradient(value, [x, *variables]),
                                              tape.gradient(penalty, [x, *variables]))]
    np.testing.assert_allclose(float(stats.jacobian), float(penalty), rtol=1e-12)
    np.testing.assert_allclose(z.numpy(), z_alone.numpy(), rtol=0, atol=0)
    for name, a, b in zip(["x", "W", "U", "b"], shared, separate):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-8, err_msg=name)


@pytest.mark.parametrize("backward", ["phantom", "unrolled"])
def test_penalty_is_reported_for_every_backward_mode(backward):
    f, x, _, _ = make_problem(seed=2)
    probes = tf.constant(np.random.default_rng(5).normal(size=(1, BATCH, DIM)))
    z, stats = fixed_point_solve(f, x, tf.zeros((BATCH, DIM), tf.float64), adjoint=backward, max_iter=100,
                                 tol=1e-12, jacobian_probes=probes)
    expected = hutchinson_jacobian_norm(lambda s: f(s, x), tf.stop_gradient(z), probes=probes)
    # Phantom steps start from z* (to which the penalty refers) and stay within the tolerance of it.
    np.testing.assert_allclose(float(stats.jacobian), float(expected), rtol=1e-8)


@pytest.mark.parametrize("backward", ["implicit", "phantom", "unrolled"])
def test_penalty_switched_by_a_tensor_is_zero_when_off_and_exact_when_on(backward):
    f, x, variables, _ = make_problem(seed=2)
    probes = tf.constant(np.random.default_rng(5).normal(size=(1, BATCH, DIM)))
    z0 = tf.zeros((BATCH, DIM), tf.float64)
    options = dict(IMPLICIT) if backward == "implicit" else dict(adjoint=backward, max_iter=100,
                                                                                       tol=1e-12)

    def penalty_and_gradient(active):
        with tf.GradientTape() as tape:
            _, stats = fixed_point_solve(f, x, z0, jacobian_probes=probes, jacobian_active=active, **options)
        return stats.jacobian, tape.gradient(stats.jacobian, variables)

    # The switch is a graph input, so both branches of the conditional are traced.
    switched = tf.function(penalty_and_gradient, input_signature=[tf.TensorSpec((), tf.bool)])
    always, always_gradient = tf.function(lambda: penalty_and_gradient(None))()
    on, on_gradient = switched(tf.constant(True))
    off, off_gradient = switched(tf.constant(False))
    assert float(always) > 0 and float(off) == 0.0
    np.testing.assert_allclose(float(on), float(always), rtol=1e-12)
    for a, b, c in zip(on_gradient, always_gradient, off_gradient):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10)
        assert c is None or not np.any(c.numpy()), c


def shallow_network(f, x, depth):
    z = tf.zeros((BATCH, DIM), tf.float64)
    for _ in range(depth):
        z = f(z, x)
    return z


@pytest.mark.parametrize("backward, mode", [("implicit", "tf_function"), ("phantom", "xla")])
def test_warmup_switched_by_a_tensor_trains_the_shallow_network_then_the_equilibrium(backward, mode):
    f, x, variables, loss = make_problem(seed=8)
    probes = tf.constant(np.random.default_rng(5).normal(size=(1, BATCH, DIM)))
    options = dict(IMPLICIT, adjoint=IMPLICIT["adjoint"] if backward == "implicit" else backward, jacobian_probes=probes)

    def step(warmup):
        with tf.GradientTape() as tape:
            tape.watch(x)
            z, stats = fixed_point_solve(f, x, tf.zeros((BATCH, DIM), tf.float64), warmup=warmup, warmup_depth=3,
                                         **options)
            total = loss(z) + 2.0 * stats.jacobian
        return total, tape.gradient(total, [x, *variables]), stats.steps, stats.trace

    switched = tf.function(step, input_signature=[tf.TensorSpec((), tf.bool)], jit_compile=(mode == "xla"))

    with tf.GradientTape() as tape:
        tape.watch(x)
        z = shallow_network(f, x, 3)
        penalty = hutchinson_jacobian_norm(lambda s: f(s, x), tf.stop_gradient(z), probes=probes)
        expected = loss(z) + 2.0 * penalty
    expected_gradients = tape.gradient(expected, [x, *variables])
    total, grads, steps, trace = switched(tf.constant(True))
    np.testing.assert_allclose(float(total), float(expected), rtol=1e-12)
    for name, a, b in zip(["x", "W", "U", "b"], grads, expected_gradients):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, err_msg=name)
    assert int(steps) == 3 and trace.shape == (IMPLICIT["max_iter"],)
    assert np.all(trace.numpy()[:3] > 0) and np.all(trace.numpy()[3:] == 0)

    total, grads, steps, _ = switched(tf.constant(False))
    reference_total, reference_gradients, reference_steps, _ = tf.function(lambda: step(None))()
    assert int(steps) == int(reference_steps) > 3
    np.testing.assert_allclose(float(total), float(reference_total), rtol=1e-12)
    for name, a, b in zip(["x", "W", "U", "b"], grads, reference_gradients):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-8, err_msg=name)


def test_warmup_without_the_penalty_and_its_argument_checks():
    f, x, variables, loss = make_problem(seed=9)
    with tf.GradientTape() as tape:
        value = solution_loss(f, x, loss, warmup=tf.constant(False), **IMPLICIT)
    exact = gradients(f, x, variables, loss, **IMPLICIT)[1:]
    for a, b in zip(tape.gradient(value, variables), exact):
        assert rel_err(a, b) < 1e-10
    z, stats = fixed_point_solve(f, x, tf.zeros((BATCH, DIM), tf.float64), warmup=True, warmup_depth=60)
    np.testing.assert_allclose(z.numpy(), shallow_network(f, x, 60).numpy(), rtol=1e-14)
    assert stats.jacobian is None and stats.trace.shape == (50,) and int(stats.steps) == 60
    z0 = tf.zeros((BATCH, DIM), tf.float64)
    with pytest.raises(ValueError, match="warmup_depth must be an integer >= 1"):
        fixed_point_solve(f, x, z0, warmup=True, warmup_depth=0)
    with pytest.raises(ValueError, match=r"A warm-up \(warmup_steps > 0\) needs backward='implicit' or 'phantom'"):
        fixed_point_solve(f, x, z0, warmup=True, adjoint="unrolled")
