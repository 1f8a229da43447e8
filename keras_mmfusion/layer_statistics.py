"""Statistics that layers record about their own calls: the solver statistics of
equilibrium layers (``DEQFusion``) and the routing statistics of dynamic routing
(``DynamicFusion``).

They are kept as Keras metrics (:class:`SolverStatsMetric`, :class:`RoutingMetric`), so
that they reach ``model.fit`` logs, and this module also holds the scopes that pause
their recording (:func:`statistics_paused`) and collect the solver's per-call values
(:func:`collecting_solver_stats`). Scores of a classifier's predictions (accuracy, F1,
AUC) are in :mod:`keras_mmfusion.training.scores`.
"""

import contextlib
import threading
import weakref

import keras
import tensorflow as tf
from keras import ops

from keras_mmfusion._internals import connected_layers

# The recording flag and the collecting dict of the scopes below. They are per thread,
# as Keras keeps its own scopes (``keras.StatelessScope``, a layer call's context), so
# that a scope opened while one thread traces a model does not reach another thread.
_STATE = threading.local()


def gather_replicas(value):
    """``value`` concatenated along axis 0 over the replicas of a ``tf.distribute`` step.

    Outside a distributed step (or with one replica) it is ``value`` itself. A gather
    synchronises the replicas, and Keras keeps a model's ``add_loss`` terms in one list
    that every replica's call clears and refills: a synchronisation inside a training
    step's forward pass lets another replica's call replace a replica's loss terms
    before its gradient is taken. Layers gather only outside training.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return value
    return context.all_gather(value, axis=0)


def _replica_slot(count):
    """A one-hot ``(count,)`` float32 row of the current replica (``[1]`` without a strategy)."""
    context = tf.distribute.get_replica_context()
    replica = 0 if context is None else context.replica_id_in_sync_group
    return ops.one_hot(replica, count, dtype="float32")


def recording_statistics():
    """Whether layers update their statistics (solver stats, routing) when called:
    ``False`` inside :func:`statistics_paused`, ``True`` otherwise."""
    return getattr(_STATE, "recording", True)


@contextlib.contextmanager
def statistics_paused():
    """Trace or run layers without updating their statistics variables.

    Used when tracing a model for export, so that the exported graph is a pure
    function of its inputs with no variable writes. Layers read the flag with
    :func:`recording_statistics` when they are traced.

    The flag is a scope rather than a call argument or a Keras mechanism because Keras
    3 has no public one that reaches a layer inside a model: a functional model passes
    only ``training`` (and masks) to its layers, and further call-context arguments are
    registered with the private ``Layer._register_call_context_args``.
    ``keras.StatelessScope`` discards writes to Keras variables, but a layer has no
    public way to tell that it runs inside one (``in_stateless_scope`` is in
    ``keras.src.backend``), and it leaves ``tf.Variable`` writes alone, such as
    ``DynamicFusion``'s ``last_routing``, whose batch-sized shape no Keras variable can
    have (Keras variables need fully defined shapes).
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

    Keras 3 has no public route for these values: a model returns only its declared
    outputs, and what else a layer hands out of a call is its losses (``add_loss``)
    and its variables' updates, while the per-sample residuals and flags of one call
    have the batch's size, which no Keras variable's shape can follow.
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

    With ``backward=True`` the metric also records the adjoint solves of implicit
    gradients (:meth:`update_backward_state`), and ``result()`` adds
    ``"<prefix>_backward_steps"``, ``"<prefix>_backward_residual"`` (the same means of
    the adjoint solves) and ``"<prefix>_backward_converged"``, the fraction of samples
    whose adjoint solve met its tolerance. A call with no gradient (evaluation,
    prediction) records no adjoint solve: its logs show 0 steps, a residual of 0 and
    a converged fraction of 1.

    Under a ``tf.distribute`` strategy every replica records its own solves in its own
    slot, without synchronising the replicas (which would break Keras's ``add_loss``
    bookkeeping, see :func:`gather_replicas`); the slots are combined when read. The
    logged steps and residual are then the largest over the replicas of each
    replica's mean over calls (for one call, those of the global batch), ``last()``
    gives the largest steps and residual of the last call over the replicas and
    ``converged`` only if every replica's solve converged, and the converged fraction
    counts the samples of every replica. The number of slots is the replica count of
    the strategy in scope when the metric is made, so a layer must be made inside the
    strategy's scope, as Keras requires of models anyway.

    Args:
        prefix: the prefix of the logged names.
        name: the metric's name.
        layer: the layer whose solves are recorded; with another layer of its class in
            the same model, the names are prefixed with its name (see
            :func:`logged_prefix`).
        backward: whether to record and log the adjoint solves too.
    """

    def __init__(self, prefix="deq", name=None, dtype="float32", layer=None, backward=False):
        super().__init__(prefix, layer=layer, name=name or f"{prefix}_solver_stats", dtype=dtype)
        self.backward = backward
        self._replicas = tf.distribute.get_strategy().num_replicas_in_sync
        # Per-replica slots, summed over replicas when read: each replica adds to its own.
        self._steps_sum = self._slots("steps_sum")
        self._residual_sum = self._slots("residual_sum")
        self._count = self._slots("count")
        self._last_steps = self._slots("last_steps")
        self._last_residual = self._slots("last_residual")
        self._last_converged = self._slots("last_converged")
        self._converged_sum = self._slots("converged_sum", shape=())
        self._sample_count = self._slots("sample_count", shape=())
        if backward:
            self._adjoint = {
                name: self._slots(f"backward_{name}", shape=() if name in ("unconverged_sum", "sample_count") else None)
                for name in (
                    "steps_sum", "residual_sum", "count", "unconverged_sum", "sample_count",
                    "last_steps", "last_residual", "last_converged",
                )
            }

    def _slots(self, name, shape=None):
        shape = (self._replicas,) if shape is None else shape
        return self.add_variable(shape=shape, initializer="zeros", name=name, dtype=self.dtype, aggregation="sum")

    def update_state(self, stats):
        """Record one solve; ``stats`` is a ``SolverStats``."""
        converged = ops.cast(stats.converged, self.dtype)
        self._record(stats, self._steps_sum, self._residual_sum, self._count, self._last_steps,
                     self._last_residual, self._last_converged)
        self._converged_sum.assign_add(ops.sum(converged))
        self._sample_count.assign_add(ops.cast(ops.shape(converged)[0], self.dtype))

    def update_backward_state(self, stats):
        """Record one adjoint solve; ``stats`` is its ``SolverStats``."""
        adjoint = self._adjoint
        self._record(stats, adjoint["steps_sum"], adjoint["residual_sum"], adjoint["count"], adjoint["last_steps"],
                     adjoint["last_residual"], adjoint["last_converged"])
        unconverged = 1.0 - ops.cast(stats.converged, self.dtype)
        adjoint["unconverged_sum"].assign_add(ops.sum(unconverged))
        adjoint["sample_count"].assign_add(ops.cast(ops.shape(unconverged)[0], self.dtype))

    def _record(self, stats, steps_sum, residual_sum, count, last_steps, last_residual, last_converged):
        slot = ops.cast(_replica_slot(self._replicas), self.dtype)
        steps = ops.cast(stats.steps, self.dtype)
        residual = ops.cast(ops.max(stats.residual), self.dtype)
        steps_sum.assign_add(slot * steps)
        residual_sum.assign_add(slot * residual)
        count.assign_add(slot)
        # Each replica owns its copy of these; written as the slot row, they sum to the
        # vector of every replica's last values when read.
        last_steps.assign(slot * steps)
        last_residual.assign(slot * residual)
        last_converged.assign(slot * ops.cast(ops.all(stats.converged), self.dtype))

    def result(self):
        prefix = self.key_prefix
        out = {
            f"{prefix}_steps": ops.max(ops.divide_no_nan(self._steps_sum, self._count)),
            f"{prefix}_residual": ops.max(ops.divide_no_nan(self._residual_sum, self._count)),
            f"{prefix}_converged": ops.divide_no_nan(self._converged_sum, self._sample_count),
        }
        if self.backward:
            adjoint = self._adjoint
            out.update({
                f"{prefix}_backward_steps": ops.max(ops.divide_no_nan(adjoint["steps_sum"], adjoint["count"])),
                f"{prefix}_backward_residual": ops.max(ops.divide_no_nan(adjoint["residual_sum"], adjoint["count"])),
                f"{prefix}_backward_converged": 1.0
                - ops.divide_no_nan(adjoint["unconverged_sum"], adjoint["sample_count"]),
            })
        return out

    def reset_state(self):
        running = [self._steps_sum, self._residual_sum, self._count, self._converged_sum, self._sample_count]
        if self.backward:
            running += [self._adjoint[k] for k in ("steps_sum", "residual_sum", "count", "unconverged_sum",
                                                   "sample_count")]
        for variable in running:
            variable.assign(ops.zeros(variable.shape, self.dtype))

    def last(self):
        """``{"steps", "residual", "converged"}`` of the most recent call, and with
        ``backward=True`` ``{"backward_steps", "backward_residual",
        "backward_converged"}`` of the most recent adjoint solve."""
        out = _last_values(self._last_steps, self._last_residual, self._last_converged)
        if self.backward:
            adjoint = self._adjoint
            last = _last_values(adjoint["last_steps"], adjoint["last_residual"], adjoint["last_converged"])
            out.update({f"backward_{k}": v for k, v in last.items()})
        return out

    def get_config(self):
        return {"prefix": self.prefix, "name": self.name, "dtype": self.dtype, "backward": self.backward}


def _last_values(steps, residual, converged):
    """The most recent ``steps``, ``residual`` and ``converged`` from per-replica slot variables."""
    # tf.convert_to_tensor reads a distributed variable as its aggregation says.
    read = lambda variable: tf.convert_to_tensor(variable.value)  # noqa: E731
    return {
        "steps": tf.cast(tf.reduce_max(read(steps)), "int32"),
        "residual": tf.reduce_max(read(residual)),
        "converged": tf.reduce_min(read(converged)) == 1,
    }


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
