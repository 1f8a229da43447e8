"""The loop's per-sample sums and its count of map evaluations."""

import numpy as np
import pytest
import tensorflow as tf

from keras_mmfusion.equilibrium import get_solver
from keras_mmfusion.equilibrium.iteration import _sums_by_product, row_sum
from keras_mmfusion.graph_context import gpu_visible


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


def test_sums_are_products_only_in_xla_graphs_without_a_gpu():
    assert not _sums_by_product()
    assert not tf.function(_sums_by_product_as_tensor)().numpy()
    in_xla = tf.function(_sums_by_product_as_tensor, jit_compile=True)().numpy()
    assert bool(in_xla) == (not gpu_visible())


def _sums_by_product_as_tensor():
    return tf.constant(_sums_by_product())


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
