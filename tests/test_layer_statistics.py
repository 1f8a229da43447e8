"""The layer statistics module, its ``keras_mmfusion.metrics`` alias, and the scopes that
carry state between a model's layers and the code that runs it."""

import threading

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_mmfusion as mmf
from keras_mmfusion import layer_statistics, metrics
from keras_mmfusion.layer_statistics import (
    collecting_solver_stats,
    recording_statistics,
    report_solver_stats,
    statistics_paused,
)
from keras_mmfusion.layers import ConcatFusion, ConfidenceHead, DEQFusion, DynamicFusion, training_labels

from helpers import random_inputs


def in_thread(function):
    """``function()`` run on a new thread; its return value."""
    result = {}
    thread = threading.Thread(target=lambda: result.update(value=function()))
    thread.start()
    thread.join()
    return result["value"]


def test_metrics_module_re_exports_every_public_name_of_layer_statistics():
    public = {
        name for name, value in vars(layer_statistics).items()
        if not name.startswith("_") and getattr(value, "__module__", None) == layer_statistics.__name__
    }
    assert public == set(metrics.__all__)
    for name in public:
        assert getattr(metrics, name) is getattr(layer_statistics, name), name
    assert mmf.SolverStatsMetric is layer_statistics.SolverStatsMetric
    assert mmf.RoutingMetric is layer_statistics.RoutingMetric


def test_statistics_paused_holds_for_its_block_on_its_own_thread():
    assert recording_statistics()
    with statistics_paused():
        assert not recording_statistics()
        assert in_thread(recording_statistics)
        with statistics_paused():
            assert not recording_statistics()
        assert not recording_statistics()
    assert recording_statistics()
    with pytest.raises(RuntimeError), statistics_paused():
        raise RuntimeError
    assert recording_statistics()


def test_collecting_solver_stats_gets_the_reports_of_its_block_only():
    report_solver_stats("outside", "ignored")  # no block: nothing collects, nothing fails
    with collecting_solver_stats() as outer:
        report_solver_stats("a", 1)
        with collecting_solver_stats() as inner:
            report_solver_stats("b", 2)
            in_thread(lambda: report_solver_stats("other_thread", 3))
        report_solver_stats("c", 4)
    assert outer == {"a": 1, "c": 4}
    assert inner == {"b": 2}


def test_paused_layers_leave_their_statistics_as_they_were():
    x = random_inputs(batch=6, widths=(3, 5), seed=1)
    routing = DynamicFusion([keras.layers.Dense(4), ConcatFusion(4)], expert_inputs=[[0], [0, 1]])
    deq = DEQFusion(units=4, max_iter=10)
    routing(x)
    deq(x)
    before = (routing.routing_metric.result(), routing.last_routing, deq.stats_metric.result(), deq.last_stats)
    with statistics_paused(), collecting_solver_stats() as collected:
        routing([a[:2] for a in x])
        deq([a[:2] for a in x])
    after = (routing.routing_metric.result(), routing.last_routing, deq.stats_metric.result(), deq.last_stats)
    for old, new in zip(tf.nest.flatten(before), tf.nest.flatten(after)):
        np.testing.assert_array_equal(np.asarray(new), np.asarray(old))
    # Collecting is independent of recording: the paused solve still reports its statistics.
    assert list(collected) == [deq.name]
    assert tuple(collected[deq.name].residual.shape) == (2,)


def test_training_labels_reach_confidence_heads_in_its_block_on_its_own_thread():
    head = ConfidenceHead(num_classes=3)
    h = np.random.default_rng(0).normal(size=(4, 8)).astype("float32")
    labels = tf.constant([0, 1, 2, 1])
    with pytest.raises(ValueError, match="needs the batch's labels"):
        head(h, training=True)
    with training_labels(labels):
        head(h, training=True)
        assert len(head.losses) == 1 and float(head.losses[0]) > 0

        def train_elsewhere():
            try:
                head(h, training=True)
            except ValueError as error:
                return str(error)

        assert "needs the batch's labels" in in_thread(train_elsewhere)
    with pytest.raises(ValueError, match="needs the batch's labels"):
        head(h, training=True)
