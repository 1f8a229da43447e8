"""Each private TensorFlow/Keras API the package wraps in ``keras_mmfusion._internals`` still
does what the package relies on; and the package refuses a non-TensorFlow Keras backend."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_mmfusion import _internals


def test_stop_recording_keeps_ops_off_the_tape():
    x = tf.Variable(2.0)
    with tf.GradientTape(persistent=True) as tape:
        seen = x * x
        with _internals.stop_recording():
            hidden = x * x
    assert float(tape.gradient(seen, x)) == 4.0
    assert tape.gradient(hidden, x) is None


def test_dynamic_update_slice_writes_the_row_in_place_under_xla():
    @tf.function(jit_compile=True)
    def write(buffer, row, slot):
        return _internals.dynamic_update_slice(buffer, row[:, None], tf.stack([0, slot, 0]))

    buffer = np.zeros((2, 3, 4), np.float32)
    row = np.arange(8, dtype=np.float32).reshape(2, 4)
    expected = buffer.copy()
    expected[:, 1] = row
    np.testing.assert_array_equal(write(buffer, row, tf.constant(1)).numpy(), expected)


def test_in_xla_context_tells_xla_functions_apart():
    seen = {"eager": _internals.in_xla_context()}

    def probe(key):
        seen[key] = _internals.in_xla_context()
        return tf.constant(0.0)

    tf.function(lambda: probe("xla"), jit_compile=True)()
    tf.function(lambda: probe("graph"))()
    assert seen == {"eager": False, "xla": True, "graph": False}


def test_freeze_turns_variables_into_constants():
    v = tf.Variable([1.0, 2.0])
    concrete = tf.function(lambda x: x * v).get_concrete_function(tf.TensorSpec([2]))
    frozen = _internals.freeze(concrete)
    ops = {node.op for node in frozen.graph.as_graph_def().node}
    assert "ReadVariableOp" not in ops and "VarHandleOp" not in ops and "Const" in ops, ops
    np.testing.assert_array_equal(frozen(tf.constant([3.0, 4.0]))[0].numpy(), [3.0, 8.0])


def test_sublayers_finds_nested_layers():
    inner = keras.Sequential([keras.layers.Dense(2, name="a"), keras.layers.Dense(2, name="b")], name="inner")
    outer = keras.Sequential([inner, keras.layers.Dense(1, name="c")], name="outer")
    assert sorted(layer.name for layer in _internals.sublayers(outer)) == ["a", "b", "c", "inner"]
    assert _internals.sublayers(outer, include_self=True)[0] is outer


def test_connected_layers_follows_the_functional_graph():
    a, b = keras.Input((3,), name="in_a"), keras.Input((3,), name="in_b")
    left, right = keras.layers.Dense(2, name="left"), keras.layers.Dense(2, name="right")
    nested = keras.Sequential([keras.layers.Dense(2, name="deep")], name="nested")
    keras.Model([a, b], nested(keras.layers.Concatenate(name="join")([left(a), right(b)])))
    other = keras.Input((3,), name="in_other")
    keras.Model(other, keras.layers.Dense(2, name="elsewhere")(other))
    names = {layer.name for layer in _internals.connected_layers(left)}
    assert {"deep", "in_a", "in_b", "join", "left", "nested", "right"} <= names, names
    assert not {"in_other", "elsewhere"} & names, names
    loose = keras.layers.Dense(2, name="loose")
    loose(np.ones((1, 3), "float32"))
    assert _internals.connected_layers(loose) == [loose]


def test_untested_versions_warn():
    assert _internals.untested_versions() == {}
    assert _internals.untested_versions({"tensorflow": "2.210.0", "keras": "3.15.1"}) == {"tensorflow": "2.210.0"}
    with pytest.warns(RuntimeWarning, match="tested with .* found tensorflow 2.22.0"):
        _internals.warn_on_untested_versions({"tensorflow": "2.22.0", "keras": "3.15.1"})


def test_a_keras_backend_other_than_tensorflow_is_refused():
    # No other backend is installed here (JAX and PyTorch are not dependencies), so Keras is
    # told it runs on JAX, as it is when KERAS_BACKEND=jax.
    code = "import keras; keras.backend.backend = lambda: 'jax'; import keras_mmfusion"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode != 0
    assert ("ImportError: keras_mmfusion runs on Keras's TensorFlow backend, but Keras is set to the 'jax' "
            "backend. Set the environment variable KERAS_BACKEND=tensorflow") in done.stderr, done.stderr


def test_tf2onnx_wrappers_convert_a_select_to_an_exact_where():
    pytest.importorskip("tf2onnx")
    fn = tf.function(lambda c, x, y: tf.where(c, x, y))
    concrete = fn.get_concrete_function(
        tf.TensorSpec([3], tf.bool, "c"), tf.TensorSpec([3], tf.float32, "x"), tf.TensorSpec([3], tf.float32, "y")
    )
    graph_def = _internals.freeze(concrete).graph.as_graph_def()
    outputs = [t.name for t in _internals.freeze(concrete).outputs]

    def handler(ctx, node, name, args):
        _internals.convert_select(ctx, node, handles_nan=True)

    handlers = {op: (handler, []) for op in ("Select", "SelectV2")}
    graph = _internals.onnx_graph_from_tf(graph_def, ["c:0", "x:0", "y:0"], outputs, 17, handlers)
    graph = _internals.optimize_onnx_graph(graph)
    op_types = {node.type for node in graph.get_nodes()}
    assert "Where" in op_types and "Mul" not in op_types, op_types
    with pytest.warns(RuntimeWarning, match="found tf2onnx 1.99.0"):
        _internals.warn_on_untested_versions({"tf2onnx": "1.99.0"})
