import numpy as np
import pytest
import tensorflow as tf

from keras_mmfusion.equilibrium import available_solvers, get_solver, residual_norm

SOLVERS = ["fixed_point", "anderson", "broyden"]


def affine_problem(dim=20, batch=4, spectrum=(0.1, 0.6), seed=0):
    """z = A z + b with known eigenvalues, and its closed-form fixed point."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    a = q @ np.diag(np.linspace(*spectrum, dim)) @ q.T
    b = rng.normal(size=(batch, dim))
    z_star = np.linalg.solve(np.eye(dim) - a, b.T).T
    a_t, b_t = tf.constant(a.T), tf.constant(b)
    return (lambda z: z @ a_t + b_t), z_star, tf.zeros((batch, dim), tf.float64)


def test_registry_lists_the_three_solvers():
    assert set(SOLVERS) <= set(available_solvers())
    with pytest.raises(ValueError, match="Unknown solver 'newton'"):
        get_solver("newton")


@pytest.mark.parametrize("solver", SOLVERS)
def test_converges_to_closed_form_fixed_point(solver):
    f, z_star, z0 = affine_problem()
    z, stats = get_solver(solver)(f, z0, max_iter=200, tol=1e-10)
    np.testing.assert_allclose(z.numpy(), z_star, atol=1e-8)
    assert stats.converged.numpy().all()
    assert int(stats.steps) < 200
    assert stats.residual.shape == (4,)
    assert (stats.residual.numpy() <= 1e-10).all()


@pytest.mark.parametrize("memory", [1, 2, 3])
def test_anderson_with_a_short_memory_runs_in_a_graph_as_eagerly(memory):
    f, z_star, z0 = affine_problem()
    solve = lambda: get_solver("anderson")(f, z0, max_iter=200, tol=1e-10, memory=memory)  # noqa: E731
    z_eager, eager = solve()
    z_graph, graph = tf.function(solve)()
    np.testing.assert_allclose(z_graph.numpy(), z_star, atol=1e-8)
    np.testing.assert_allclose(z_graph.numpy(), z_eager.numpy(), rtol=1e-9, atol=1e-12)
    assert int(graph.steps) == int(eager.steps)


def test_anderson_with_a_long_memory_is_not_held_back_by_the_ridge():
    # The history spans residuals many orders of magnitude apart; a ridge relative to
    # the largest of them would swamp the newest and make memory 20 slower than 10.
    f, _, z0 = affine_problem(dim=100, spectrum=(0.0, 0.95))
    steps = {m: int(get_solver("anderson")(f, z0, max_iter=500, tol=1e-8, memory=m)[1].steps) for m in (10, 20)}
    assert steps[20] <= steps[10]


@pytest.mark.parametrize("solver", ["anderson", "broyden"])
def test_accelerated_solvers_need_half_the_steps_on_ill_conditioned_contraction(solver):
    f, z_star, z0 = affine_problem(spectrum=(0.1, 0.98))
    _, plain = get_solver("fixed_point")(f, z0, max_iter=1000, tol=1e-8)
    z, fast = get_solver(solver)(f, z0, max_iter=1000, tol=1e-8)
    assert plain.converged.numpy().all() and fast.converged.numpy().all()
    assert int(fast.steps) <= 0.5 * int(plain.steps)
    np.testing.assert_allclose(z.numpy(), z_star, atol=1e-5)


@pytest.mark.parametrize("solver", SOLVERS)
def test_abs_and_rel_stop_modes(solver):
    f, z_star, z0 = affine_problem()
    for mode in ("abs", "rel"):
        z, stats = get_solver(solver)(f, z0, max_iter=200, tol=1e-9, stop_mode=mode)
        expected = residual_norm(z, f(z), mode).numpy()
        np.testing.assert_allclose(stats.residual.numpy(), expected, rtol=1e-6, atol=1e-14)
        assert (expected <= 1e-9).all()


@pytest.mark.parametrize("solver", SOLVERS)
def test_nonconvergence_returns_best_iterate_without_nan(solver):
    # f(z) = z + 1 + 0.5 sin(z) has no fixed point: every residual is at least 0.5.
    def f(z):
        return z + 1.0 + 0.5 * tf.sin(z)

    z0 = tf.constant(np.random.default_rng(1).normal(size=(3, 6)))
    z, stats = get_solver(solver)(f, z0, max_iter=10, tol=1e-6, stop_mode="abs")
    assert int(stats.steps) == 10
    assert not stats.converged.numpy().any()
    assert np.isfinite(z.numpy()).all()
    returned = residual_norm(z, f(z), "abs").numpy()
    np.testing.assert_allclose(stats.residual.numpy(), returned, rtol=1e-12)
    assert (returned <= residual_norm(z0, f(z0), "abs").numpy() + 1e-12).all()
    # The mean residual of the returned iterates is at most that of every iterate visited.
    assert returned.mean() <= stats.trace.numpy().min() + 1e-12


def test_fixed_point_never_returns_a_later_worse_iterate():
    # z <- -1.5 z + b moves away from its fixed point b / 2.5 from the start, so the
    # starting point z0 = 0 has the lowest residual of every iterate.
    b = tf.constant(np.random.default_rng(1).normal(size=(3, 6)))
    z0 = tf.zeros((3, 6), tf.float64)
    z, stats = get_solver("fixed_point")(lambda z: -1.5 * z + b, z0, max_iter=6, tol=1e-12)
    assert not stats.converged.numpy().any()
    np.testing.assert_array_equal(z.numpy(), z0.numpy())


@pytest.mark.parametrize("solver", SOLVERS)
def test_overflowing_map_gives_no_nan_and_no_false_convergence(solver):
    def f(z):
        return 1e30 * z + 1.0

    z, stats = get_solver(solver)(f, tf.zeros((2, 4)), max_iter=8, tol=1e-3)
    assert np.isfinite(z.numpy()).all()
    assert not stats.converged.numpy().any()


def test_anderson_singular_history_gives_no_nan():
    # For a translation every history column f(z_j) - z_j is the same vector c, so
    # the Gram matrix has rank one and is singular without the ridge term.
    c = tf.constant([[1.0, 2.0, 3.0, 4.0]])
    z, stats = get_solver("anderson")(lambda z: z + c, tf.zeros((1, 4)), max_iter=12, tol=1e-6)
    assert int(stats.steps) == 12
    assert np.isfinite(z.numpy()).all()
    np.testing.assert_allclose(stats.residual.numpy(), [np.linalg.norm(c) / np.linalg.norm(z + c)], rtol=1e-5)


@pytest.mark.parametrize("solver", SOLVERS)
def test_same_result_eager_in_tf_function_and_under_xla(solver):
    f, z_star, _ = affine_problem(spectrum=(0.1, 0.7))
    z0 = tf.zeros((4, 20), tf.float32)

    def g(z):
        return tf.cast(f(tf.cast(z, tf.float64)), tf.float32)

    def run(z0):
        z, stats = get_solver(solver)(g, z0, max_iter=100, tol=1e-5)
        return z, stats.steps

    eager = run(z0)
    graph = tf.function(run)(z0)
    xla = tf.function(run, jit_compile=True)(z0)
    # Stopping at a relative residual of 1e-5 with contraction rate 0.7 leaves an error
    # of order 1e-5 * ||z|| / (1 - 0.7); float32 reordering may also shift a step.
    for z, steps in (graph, xla):
        np.testing.assert_allclose(z.numpy(), eager[0].numpy(), atol=1e-3)
        assert abs(int(steps) - int(eager[1])) <= 1
    np.testing.assert_allclose(eager[0].numpy(), z_star, atol=1e-3)


@pytest.mark.parametrize("solver", SOLVERS)
def test_half_precision_state_is_solved_in_float32(solver):
    f, z_star, _ = affine_problem(spectrum=(0.1, 0.5))

    def g(z):
        assert z.dtype == tf.float16
        return tf.cast(f(tf.cast(z, tf.float64)), tf.float16)

    z, stats = get_solver(solver)(g, tf.zeros((4, 20), tf.float16), max_iter=60, tol=1e-2)
    assert z.dtype == tf.float16
    assert stats.residual.dtype == tf.float32
    np.testing.assert_allclose(z.numpy().astype(np.float64), z_star, atol=0.1)


def test_trace_records_mean_residual_per_evaluation():
    f, _, z0 = affine_problem()
    _, stats = get_solver("fixed_point")(f, z0, max_iter=50, tol=1e-6)
    steps = int(stats.steps)
    trace = stats.trace.numpy()
    assert trace.shape == (50,)
    assert (trace[:steps] > 0).all() and (trace[steps:] == 0).all()
    assert trace[steps - 1] < trace[0]
    np.testing.assert_allclose(trace[steps - 1], stats.residual.numpy().mean(), rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_iter": 0}, "max_iter"),
        ({"tol": -1.0}, "tol"),
        ({"stop_mode": "max"}, "stop_mode"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, message):
    f, _, z0 = affine_problem()
    with pytest.raises(ValueError, match=message):
        get_solver("anderson")(f, z0, **kwargs)


def test_bad_solver_options_raise_value_error():
    f, _, z0 = affine_problem()
    with pytest.raises(ValueError, match="memory"):
        get_solver("anderson")(f, z0, memory=0)
    with pytest.raises(ValueError, match="mixing"):
        get_solver("anderson")(f, z0, mixing=1.5)
    with pytest.raises(ValueError, match="damping"):
        get_solver("fixed_point")(f, z0, damping=0.0)
    with pytest.raises(ValueError, match=r"shape \(batch, dim\)"):
        get_solver("broyden")(f, tf.zeros((2, 3, 4)))


@pytest.mark.parametrize("solver", SOLVERS)
def test_solver_called_from_an_autograph_lambda(solver):
    f, z_star, z0 = affine_problem()
    solve = tf.function(lambda: get_solver(solver)(f, z0, max_iter=200, tol=1e-10))
    z, stats = solve()
    np.testing.assert_allclose(z.numpy(), z_star, atol=1e-8)


@pytest.mark.parametrize("solver", SOLVERS)
def test_map_with_unknown_batch_size_and_static_start(solver):
    f, z_star, z0 = affine_problem()

    @tf.function(input_signature=[tf.TensorSpec([None, 20], tf.float64)])
    def unknown_batch(z):
        return f(z)

    def solve():
        # z0 has a static batch of 4 while f's output shape is (None, 20) in the trace.
        return get_solver(solver)(lambda z: unknown_batch(tf.reshape(z, [-1, 20])), z0, max_iter=200, tol=1e-10)

    z, _ = tf.function(solve)()
    np.testing.assert_allclose(z.numpy(), z_star, atol=1e-8)


@pytest.mark.parametrize("mixing", [1.0, 0.7])
def test_anderson_under_xla_takes_the_same_steps_as_without(mixing):
    # Under XLA the history's writes are dynamic-update-slices and its reads elementwise
    # products summed by row, instead of scatters and batched matrix products. In
    # float64, on a map that is far from converged after 12 steps (so the history wraps
    # around twice with memory 4), every weight and iterate must agree.
    rng = np.random.default_rng(3)
    a = tf.constant(0.9 * rng.normal(size=(16, 16)) / 4.0)
    b = tf.constant(rng.normal(size=(5, 16)))

    def f(z):
        return tf.tanh(z @ a) * 1.5 + b

    def run(z0):
        z, stats = get_solver("anderson")(f, z0, max_iter=12, tol=1e-30, memory=4, mixing=mixing)
        return z, stats.residual, stats.trace

    z0 = tf.zeros((5, 16), tf.float64)
    eager = run(z0)
    xla = tf.function(run, jit_compile=True)(z0)
    assert int(np.count_nonzero(eager[2].numpy())) == 12
    for want, got in zip(eager, xla):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-9, atol=1e-12)


def test_anderson_weights_are_accurate_in_float32_when_the_residuals_span_orders_of_magnitude():
    # The Gram matrix of a non-converging solve's residuals, with the reference code's
    # absolute ridge: nearly parallel residuals whose sizes fall from 200 to 0.7, so its
    # diagonal spans five orders of magnitude and its condition number is about 4e7.
    from keras_mmfusion.equilibrium.solvers import _spd_solve

    grams = []
    for seed in range(5):
        rng = np.random.default_rng(seed)
        base = rng.standard_normal((4, 1200))
        sizes = [200.0, 40.0, 8.0, 2.0, 0.9, 0.7]
        g = np.stack([s * (base + 0.05 * (i + 1) / 6 * rng.standard_normal((4, 1200))) for i, s in enumerate(sizes)], 1)
        grams.append(np.einsum("bmd,bnd->bmn", g, g) + 1e-4 * np.eye(6))
    gram = np.concatenate(grams)
    ones = np.ones(gram.shape[:2])
    exact = np.linalg.solve(gram, ones[..., None])[..., 0]
    y = _spd_solve(tf.constant(gram, tf.float32), tf.constant(ones, tf.float32)).numpy().astype(np.float64)
    # Anderson's mixing weights: float32 elimination on the unscaled system is 2e-2 off.
    alpha, alpha_exact = y / y.sum(-1, keepdims=True), exact / exact.sum(-1, keepdims=True)
    assert np.abs(alpha - alpha_exact).max() < 1e-3 * np.abs(alpha_exact).max()
    assert np.abs(_spd_solve(tf.constant(gram), tf.constant(ones)).numpy() - exact).max() < 1e-9 * np.abs(exact).max()
