"""Anderson's history gives the same reads as NumPy, eagerly, in graphs and under XLA."""

import numpy as np
import pytest
import tensorflow as tf

from keras_mmfusion.equilibrium.history import CircularHistory

BATCH, DIM = 3, 4


def pushed(history, entries):
    """The history ``(fs, gs)`` after pushing ``entries``, a list of ``(f, g)`` pairs."""
    fs, gs = history.empty(tf.zeros([BATCH, DIM], tf.float64))
    for k, (f, g) in enumerate(entries):
        fs, gs = history.push(fs, gs, f, g, k)
    return fs, gs


def reads(history, entries, g):
    """The dot products of ``g`` with every stored residual, and the weighted sum of the
    stored updates with those products as weights: a step's two reads, chained as
    Anderson chains them."""
    fs, gs = pushed(history, entries)
    dots = history.dots(gs, g)
    return dots, history.combine(fs, dots)


def expected(entries, g, memory):
    """NumPy: the newest ``memory`` entries, and the same two reads."""
    kept = entries[-memory:]
    dots = np.stack([np.sum(e_g * g, axis=-1) for _, e_g in kept], axis=-1)
    combined = sum(dots[:, j, None] * e_f for j, (e_f, _) in enumerate(kept))
    return dots, combined


@pytest.mark.parametrize("memory", [1, 2, 3])
@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
def test_reads_match_numpy_in_every_execution_mode(memory, mode):
    rng = np.random.default_rng(memory)
    entries = [(rng.normal(size=(BATCH, DIM)), rng.normal(size=(BATCH, DIM))) for _ in range(memory + 2)]
    g = rng.normal(size=(BATCH, DIM))
    # Arguments, not captured constants, so that the graph cannot be constant-folded.
    run = lambda entries, g: reads(CircularHistory(memory), entries, g)  # noqa: E731
    if mode != "eager":
        run = tf.function(run, jit_compile=mode == "xla")
    dots, combined = run([tuple(map(tf.constant, e)) for e in entries], tf.constant(g))
    want_dots, want_combined = expected(entries, g, memory)
    # Slots are written in rotation; compare as sets of slots.
    np.testing.assert_allclose(np.sort(dots.numpy(), axis=-1), np.sort(want_dots, axis=-1), rtol=1e-12)
    np.testing.assert_allclose(combined.numpy(), want_combined, rtol=1e-10)
