"""The loop's per-sample sums, its count of map evaluations and its guard against
non-finite proposals."""

import numpy as np
import pytest
import tensorflow as tf

from keras_mmfusion.equilibrium import get_solver
from keras_mmfusion.equilibrium.iteration import _sums_by_product, iterate, row_sum
from keras_mmfusion._internals import gpu_visible


def rows_with_non_finite_entries():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 37)).astype(np.float32)
    x[1, 3] = np.nan
    x[2, 0] = np.inf
    x[3, 5], x[3, 6] = np.inf, -np.inf
    x[4] = 3e38  # finite entries whose sum overflows
    return x


@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
def test_row_sum_matches_numpy_and_flags_non_finite_rows(mode):
    x = rows_with_non_finite_entries()
    run = row_sum if mode == "eager" else tf.function(row_sum, jit_compile=mode == "xla")
    got = run(tf.constant(x)).numpy()
    with np.errstate(invalid="ignore", over="ignore"):
        want = x.astype(np.float64).sum(axis=-1)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    assert np.isfinite(got).tolist() == [True, False, False, False, False]


def graph_ops(fn, x):
    return {op.type for op in fn.get_concrete_function(x).graph.get_operations()}


def test_sums_are_products_only_in_xla_graphs_without_a_gpu():
    x = tf.constant(np.ones((3, 5), np.float32))
    assert not _sums_by_product()  # eagerly
    plain = graph_ops(tf.function(row_sum), x)
    compiled = graph_ops(tf.function(row_sum, jit_compile=True), x)
    assert "Sum" in plain and "MatMul" not in plain
    # Under XLA a product with a ones vector, unless a GPU would run it (TF32 products).
    if gpu_visible():
        assert "Sum" in compiled and "MatMul" not in compiled
    else:
        assert "MatMul" in compiled and "Sum" not in compiled


@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "broyden"])
@pytest.mark.parametrize("max_iter, tol", [(1, 1e-6), (40, 1e-6), (7, 1e-30)])
def test_steps_counts_every_evaluation_of_the_map(solver, max_iter, tol):
    # Eagerly, tf.while_loop runs the Python body once per iteration, so a counter in
    # the map sees every evaluation; none may go uncounted or be made and discarded.
    calls = []
    a = tf.constant(np.diag(np.linspace(0.1, 0.8, 6)))

    def f(z):
        calls.append(1)
        return z @ a + 1.0

    _, stats = get_solver(solver)(f, tf.zeros([3, 6], tf.float64), max_iter=max_iter, tol=tol)
    assert len(calls) == int(stats.steps)
    assert 1 <= int(stats.steps) <= max_iter
    if tol == 1e-30:
        assert int(stats.steps) == max_iter


def _solve_with_a_nan_proposal(f, z0):
    """Plain iteration whose step proposes NaN for sample 0 at step 3 (the 4th step)."""

    def init(z):
        return tf.zeros([], z.dtype)

    def step(z, fz, g, state, k):
        poisoned = tf.logical_and(tf.equal(k, 3), tf.range(tf.shape(z)[0]) == 0)
        nan = tf.fill(tf.shape(fz), tf.constant(np.nan, fz.dtype))
        return tf.compat.v1.where(poisoned, nan, fz), state

    return iterate(f, z0, init, step, max_iter=60, tol=1e-10, stop_mode="abs")


def test_a_non_finite_proposal_restarts_from_the_best_iterate():
    a = tf.constant(np.diag(np.linspace(0.1, 0.6, 5)))
    points = []

    def affine(z):
        return z @ a + 1.0

    def f(z):
        points.append(z.numpy())
        return affine(z)

    z0 = tf.zeros([2, 5], tf.float64)
    z, stats = _solve_with_a_nan_proposal(f, z0)
    # The residual falls at every step of a contraction, so after four evaluations
    # sample 0's best iterate is the fourth point, and the fifth evaluation repeats it;
    # sample 1 is unaffected and evaluates f of its fourth point.
    np.testing.assert_array_equal(points[4][0], points[3][0])
    np.testing.assert_allclose(points[4][1], points[3][1] @ a.numpy() + 1.0, rtol=1e-15)
    assert stats.converged.numpy().all() and np.isfinite(z.numpy()).all()
    np.testing.assert_allclose(z.numpy(), np.broadcast_to(1.0 / (1.0 - np.diag(a)), (2, 5)), rtol=1e-9)
    # Compiled, the same solve gives the same result.
    for jit in (False, True):
        run = tf.function(lambda z0: _solve_with_a_nan_proposal(affine, z0), jit_compile=jit)
        z_graph, stats_graph = run(z0)
        assert int(stats_graph.steps) == int(stats.steps)
        np.testing.assert_allclose(z_graph.numpy(), z.numpy(), rtol=1e-12)
