"""Layer statistics as Keras metrics, so that they reach ``model.fit`` logs."""

import contextlib
import threading
import weakref

import keras
import tensorflow as tf
from keras import ops

from keras_mmfusion._internals import connected_layers

_STATE = threading.local()


def gather_replicas(value):
    """``value`` concatenated along axis 0 over the replicas of a ``tf.distribute`` step.

    Outside a distributed step (or with one replica) it is ``value`` itself. Layer
    statistics use it so that a replica records what the whole global batch did.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return value
    return context.all_gather(value, axis=0)


def _largest_over_replicas(value):
    return ops.max(gather_replicas(ops.reshape(value, (1,))))


def recording_statistics():
    """Whether layers update their statistics (solver stats, routing) when called."""
    return getattr(_STATE, "recording", True)


@contextlib.contextmanager
def statistics_paused():
    """Trace or run layers without updating their statistics variables.

    Used when tracing a model for export, so that the exported graph is a pure
    function of its inputs with no variable writes.
    """
    previous = recording_statistics()
    _STATE.recording = False
    try:
        yield
    finally:
        _STATE.recording = previous


@contextlib.contextmanager
def collecting_solver_stats():
    """Collect the ``SolverStats`` of every equilibrium layer called inside the block.

    Yields a dict that fills with ``layer name -> SolverStats`` as layers report them
    (see :func:`report_solver_stats`). Export uses it to return the solver's
    per-sample diagnostics from a traced model, next to its outputs.
    """
    previous = getattr(_STATE, "collected", None)
    _STATE.collected = collected = {}
    try:
        yield collected
    finally:
        _STATE.collected = previous


def report_solver_stats(name, stats):
    """Hand ``stats`` of layer ``name`` to the enclosing :func:`collecting_solver_stats`, if any."""
    collected = getattr(_STATE, "collected", None)
    if collected is not None:
        collected[name] = stats


def logged_prefix(layer, prefix):
    """The prefix of the log keys of ``layer``'s statistics.

    ``prefix`` itself (``deq_steps``, ``dynmm_cost``, ...) when no other layer of the
    same class is connected to ``layer`` in a functional model; otherwise
    ``"<layer name>_<prefix>"`` (``fusion_a_deq_steps``), so that two such layers in one
    model log under different keys. Layer names are unique within a model.
    """
    if layer is None:
        return prefix
    same_kind = [other for other in connected_layers(layer) if other is not layer and type(other) is type(layer)]
    return f"{layer.name}_{prefix}" if same_kind else prefix


class _LayerStatistic(keras.metrics.Metric):
    """A metric that logs a layer's statistics under the keys :func:`logged_prefix` gives."""

    def __init__(self, prefix, layer=None, **kwargs):
        super().__init__(**kwargs)
        self.prefix = prefix
        # A weak reference: the layer owns the metric, and Keras must not track the layer here.
        self._layer = (lambda: None) if layer is None else weakref.ref(layer)

    @property
    def key_prefix(self):
        """The prefix of the keys of :meth:`result` (see :func:`logged_prefix`)."""
        return logged_prefix(self._layer(), self.prefix)


@keras.saving.register_keras_serializable(package="keras_mmfusion")
class SolverStatsMetric(_LayerStatistic):
    """Running means of an equilibrium layer's solver statistics, and the last values.

    ``result()`` is ``{"<prefix>_steps": ..., "<prefix>_residual": ...,
    "<prefix>_converged": ...}``: the mean over the calls since the last reset of the
    forward solver's steps and of the batch's largest per-sample residual, and the
    fraction of all samples solved since the last reset whose solve met the
    tolerance. Keras merges a dict result into the training logs.
    The values of the most recent call are kept across resets and read with
    :meth:`last`.

    Under a ``tf.distribute`` strategy a call's steps and largest residual are the
    largest over the replicas (those of the global batch), its ``converged`` holds
    only if every replica's solve converged, and the converged fraction counts the
    samples of every replica.

    Args:
        prefix: the prefix of the logged names.
        name: the metric's name.
        layer: the layer whose solves are recorded; with another layer of its class in
            the same model, the names are prefixed with its name (see
            :func:`logged_prefix`).
    """

    def __init__(self, prefix="deq", name=None, dtype="float32", layer=None):
        super().__init__(prefix, layer=layer, name=name or f"{prefix}_solver_stats", dtype=dtype)
        self._steps_sum = self._scalar("steps_sum")
        self._residual_sum = self._scalar("residual_sum")
        self._count = self._scalar("count")
        self._converged_sum = self._scalar("converged_sum")
        self._sample_count = self._scalar("sample_count")
        # Every replica records the same last values, so the first replica's are the call's.
        self._last_steps = self._scalar("last_steps", "only_first_replica")
        self._last_residual = self._scalar("last_residual", "only_first_replica")
        self._last_converged = self._scalar("last_converged", "only_first_replica")

    def _scalar(self, name, aggregation="sum"):
        return self.add_variable(shape=(), initializer="zeros", name=name, dtype=self.dtype, aggregation=aggregation)

    def update_state(self, stats):
        """Record one solve; ``stats`` is a ``SolverStats``."""
        # Summed over replicas, the sums and the count below grow by the replica count
        # alike, so their ratios are the means over calls of these global values.
        steps = _largest_over_replicas(ops.cast(stats.steps, self.dtype))
        residual = _largest_over_replicas(ops.cast(ops.max(stats.residual), self.dtype))
        converged = -_largest_over_replicas(-ops.cast(ops.all(stats.converged), self.dtype))
        self._steps_sum.assign_add(steps)
        self._residual_sum.assign_add(residual)
        self._count.assign_add(ops.ones((), self.dtype))
        self._converged_sum.assign_add(ops.sum(ops.cast(stats.converged, self.dtype)))
        self._sample_count.assign_add(ops.cast(ops.shape(stats.converged)[0], self.dtype))
        self._last_steps.assign(steps)
        self._last_residual.assign(residual)
        self._last_converged.assign(converged)

    def result(self):
        prefix = self.key_prefix
        return {
            f"{prefix}_steps": ops.divide_no_nan(self._steps_sum, self._count),
            f"{prefix}_residual": ops.divide_no_nan(self._residual_sum, self._count),
            f"{prefix}_converged": ops.divide_no_nan(self._converged_sum, self._sample_count),
        }

    def reset_state(self):
        for variable in (self._steps_sum, self._residual_sum, self._count, self._converged_sum, self._sample_count):
            variable.assign(ops.zeros((), self.dtype))

    def last(self):
        """``{"steps", "residual", "converged"}`` of the most recent call."""
        # tf.convert_to_tensor reads a distributed variable as its aggregation says.
        read = lambda variable: tf.convert_to_tensor(variable.value)  # noqa: E731
        return {
            "steps": tf.cast(read(self._last_steps), "int32"),
            "residual": read(self._last_residual),
            "converged": tf.cast(read(self._last_converged), "bool"),
        }

    def get_config(self):
        return {"prefix": self.prefix, "name": self.name, "dtype": self.dtype}


@keras.saving.register_keras_serializable(package="keras_mmfusion")
class RoutingMetric(_LayerStatistic):
    """Running routing fractions and realised cost of a dynamic-routing layer.

    ``result()`` is ``{"<prefix>_cost": ..., "<prefix>_expert_0": ..., ...}``: the mean
    over samples since the last reset of the chosen expert's cost divided by the
    largest cost, and the fraction of samples routed to each expert.

    Args:
        num_experts: the number of experts.
        prefix: the prefix of the logged names.
        name: the metric's name.
        layer: the routing layer; as for :class:`SolverStatsMetric`.
    """

    def __init__(self, num_experts, prefix="dynmm", name=None, dtype="float32", layer=None):
        super().__init__(prefix, layer=layer, name=name or f"{prefix}_routing", dtype=dtype)
        self.num_experts = num_experts
        self._counts = self.add_variable(shape=(num_experts,), initializer="zeros", name="counts", dtype=dtype)
        self._cost_sum = self.add_variable(shape=(), initializer="zeros", name="cost_sum", dtype=dtype)

    def update_state(self, route, relative_costs):
        """Record one batch: ``route`` int ``(batch,)``, ``relative_costs`` ``(num_experts,)``."""
        onehot = ops.one_hot(route, self.num_experts, dtype=self.dtype)
        self._counts.assign_add(ops.sum(onehot, axis=0))
        self._cost_sum.assign_add(ops.sum(onehot * ops.cast(relative_costs, self.dtype)))

    def result(self):
        total = ops.sum(self._counts)
        fractions = ops.divide_no_nan(self._counts, total)
        prefix = self.key_prefix
        out = {f"{prefix}_cost": ops.divide_no_nan(self._cost_sum, total)}
        out.update({f"{prefix}_expert_{i}": fractions[i] for i in range(self.num_experts)})
        return out

    def reset_state(self):
        self._counts.assign(ops.zeros((self.num_experts,), self.dtype))
        self._cost_sum.assign(ops.zeros((), self.dtype))

    def get_config(self):
        return {"num_experts": self.num_experts, "prefix": self.prefix, "name": self.name, "dtype": self.dtype}
