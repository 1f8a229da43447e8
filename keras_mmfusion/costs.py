"""Counting multiply-accumulates (MACs) per sample of a layer or model.

The count walks the TensorFlow graph of one traced call at batch size 1 and adds the
MACs of the matrix products in it: ``MatMul``, ``BatchMatMul`` and ``Einsum`` (the
product of the sizes of all distinct indices), and ``Conv2D``. Element-wise ops,
normalisations and reductions are not counted; in the dense fusion layers of this
package the matrix products dominate the cost.

Control flow is followed into its function bodies: a ``While`` body is counted
``loop_trips`` times (an equilibrium solve's trip count depends on the data, so the
caller supplies it, e.g. the mean solver steps), and an ``If``/``Case`` counts its most
expensive branch.
"""

import numpy as np
import tensorflow as tf


def _dims(tensor_shape):
    return [1 if d is None else int(d) for d in tensor_shape]


def _einsum_macs(op):
    equation = op.get_attr("equation").decode()
    lhs = equation.split("->")[0].split(",")
    sizes = {}
    for spec, tensor in zip(lhs, op.inputs):
        for label, dim in zip(spec.replace("...", ""), _dims(tensor.shape)[-len(spec.replace("...", "")):]):
            sizes[label] = max(sizes.get(label, 1), dim)
    return int(np.prod(list(sizes.values()), dtype=np.int64)) if sizes else 0


def _op_macs(op):
    kind = op.type
    if kind == "MatMul":
        a, b = (_dims(t.shape) for t in op.inputs[:2])
        m = a[1] if op.get_attr("transpose_a") else a[0]
        k = a[0] if op.get_attr("transpose_a") else a[1]
        n = b[0] if op.get_attr("transpose_b") else b[1]
        return m * k * n
    if kind in ("BatchMatMul", "BatchMatMulV2", "BatchMatMulV3"):
        out = _dims(op.outputs[0].shape)
        a = _dims(op.inputs[0].shape)
        k = a[-2] if op.get_attr("adj_x") else a[-1]
        return int(np.prod(out, dtype=np.int64)) * k
    if kind == "Einsum":
        return _einsum_macs(op)
    if kind == "Conv2D":
        out = _dims(op.outputs[0].shape)
        kernel = _dims(op.inputs[1].shape)
        return int(np.prod(out, dtype=np.int64)) * kernel[0] * kernel[1] * kernel[2]
    return 0


def _function_macs(graph, name, loop_trips):
    function = graph._get_function(name)  # noqa: SLF001 - the graph's function library
    if function is None:
        return 0
    return _graph_macs(function.graph, loop_trips)


def _graph_macs(graph, loop_trips):
    total = 0
    for op in graph.get_operations():
        total += _op_macs(op)
        if op.type in ("While", "StatelessWhile"):
            body = op.get_attr("body").name
            total += loop_trips * _function_macs(graph, body, loop_trips)
        elif op.type in ("If", "StatelessIf"):
            total += max(
                _function_macs(graph, op.get_attr(b).name, loop_trips)
                for b in ("then_branch", "else_branch")
            )
        elif op.type in ("Case", "StatelessCase"):
            branches = op.get_attr("branches")
            total += max((_function_macs(graph, b.name, loop_trips) for b in branches), default=0)
        elif op.type in ("PartitionedCall", "StatefulPartitionedCall"):
            total += _function_macs(graph, op.get_attr("f").name, loop_trips)
    return total


def count_macs(fn, input_widths, loop_trips=1, training=False):
    """MACs per sample of ``fn`` on one sample of each modality.

    Args:
        fn: a Keras layer or model, or any callable, taking the list of modality
            tensors (or the tensor itself when there is one modality).
        input_widths: the width ``d_i`` of each modality.
        loop_trips: how many times a ``while`` loop body is counted.
        training: passed to Keras layers and models.

    Returns:
        The number of multiply-accumulates, an int.
    """
    import keras

    specs = [tf.TensorSpec((1, int(w)), tf.float32) for w in input_widths]
    is_keras = isinstance(fn, keras.layers.Layer)

    @tf.function(autograph=False)
    def traced(*xs):
        # One modality is passed as a tensor, several as a list (the fusion layers' convention).
        inputs = xs[0] if len(xs) == 1 else list(xs)
        return fn(inputs, training=training) if is_keras else fn(inputs)

    graph = traced.get_concrete_function(*specs).graph
    return int(_graph_macs(graph, loop_trips))
