"""Dynamic multimodal fusion (Xue & Marculescu, "Dynamic Multimodal Fusion",
arXiv 2204.00102): a gate routes every sample to one of several experts."""

import inspect

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from keras_mmfusion._internals import sublayers
from keras_mmfusion.costs import count_macs
from keras_mmfusion.layers.fusion_layer import FusionLayer
from keras_mmfusion._internals import in_xla_context
from keras_mmfusion.layers.modality_mask import masked_logits, require_present
from keras_mmfusion.layers.routing import masked_route, partitioned_route
from keras_mmfusion.layer_statistics import RoutingMetric, gather_replicas, recording_statistics
from keras_mmfusion._checks import check_int, check_positive


def _output_shape(layer, shape):
    try:
        out = layer.compute_output_shape(shape)
    except Exception:  # a layer without a static shape rule: trace it symbolically
        symbolic = [keras.KerasTensor(s) for s in shape] if isinstance(shape, list) else keras.KerasTensor(shape)
        out = layer.compute_output_spec(symbolic).shape
    return tuple(out)


def _loop_trips(layer):
    """The worst-case solver loop trips of any equilibrium layer inside ``layer``: one
    evaluation of its update per trip, at most ``max_iter``."""
    return max(getattr(sub, "max_iter", 1) for sub in sublayers(layer, include_self=True))


@keras.saving.register_keras_serializable(package="keras_mmfusion")
class DynamicFusion(FusionLayer):
    """Per-sample routing between experts of different cost (DynMM).

    A gate maps the inputs to one logit per expert. In training the choice is relaxed:
    ``w = softmax((logits + g) / temperature)``, with Gumbel noise ``g`` if ``gumbel``,
    and with ``straight_through`` the forward pass uses the hard one-hot of ``w``
    while gradients flow through the soft ``w``. Every expert runs on every sample and
    the output is ``sum_i w_i * expert_i(x)``, so both the gate and the experts are
    trained. The cost loss ``cost_weight * mean_b(sum_i w_i cost_i) / max(cost)`` is
    added with ``add_loss``.

    At inference (``training=False`` and ``hard_inference``) each sample goes to its
    highest-logit expert and **only that expert runs on it**: the batch is split by
    expert with gather/scatter, and an expert that received no sample is skipped by a
    ``tf.cond``; a batch of one therefore runs a single expert, also in TFLite. Under
    ``jit_compile=True`` XLA cannot handle the data-dependent row counts, so there
    every expert runs on the whole batch and the outputs are selected per sample
    (same result, no saving).

    Costs. By default ``costs[i]`` is the MACs per sample of expert ``i`` plus the
    gate's, counted by :func:`keras_mmfusion.costs.count_macs` on the expert's traced
    graph (matrix products only; an equilibrium solver loop inside an expert is
    charged at its ``max_iter``, the worst case). Any non-negative numbers may be
    passed instead.

    Missing modalities. The logits are the gate's output plus ``presence @ P``, where
    ``presence`` holds 1 or 0 for every modality (all ones without ``modality_mask``)
    and ``P`` (``presence_logits``, ``(N, num_experts)``, initially zero) is trained
    with the rest, so the routing sees which modalities a sample has. With
    ``modality_mask``, absent inputs are zeros, and an expert that cannot run without an
    absent modality gets the lowest logit for that sample, so it is never chosen and its
    training weight is 0. An expert that is
    itself a fusion layer (its ``call`` takes ``modality_mask``) and reads several
    modalities receives the mask of its modalities and needs one of them present;
    any other expert needs all the modalities it reads. A sample that no expert can
    take is refused like a sample with no modality (see
    :func:`~keras_mmfusion.layers.modality_mask.require_present`).

    Args:
        experts: a list of at least 2 Keras layers or models with the same output
            shape ``(batch, units)``.
        gate: a layer mapping the concatenated inputs ``(batch, sum d_i)`` to
            ``(batch, num_experts)`` logits. ``None`` builds
            ``Dense(gate_units, relu) -> Dense(num_experts)``.
        expert_inputs: for each expert, the list of modality indices it reads
            (default: all). An expert reading one modality gets that tensor; an expert
            reading several gets the list.
        costs: one non-negative cost per expert; ``None`` measures MACs.
        temperature: the softmax temperature (see :class:`TemperatureSchedule`).
        cost_weight: weight of the compute-cost loss.
        straight_through: hard forward, soft gradient, in training.
        gumbel: add Gumbel noise to the logits in training.
        hard_inference: route hard at inference; ``False`` mixes all experts softly.
        gate_units: width of the default gate's hidden layer.
        seed: seed of the Gumbel noise.
        **kwargs: initializers, regularizers and base ``Layer`` arguments.

    Input shape:
        A list of ``N >= 2`` tensors ``(batch, d_i)``; optionally
        ``modality_mask``, boolean ``(batch, N)``.

    Output shape:
        ``(batch, units)``, the experts' common output shape.

    Example:

    >>> import numpy as np, keras
    >>> from keras_mmfusion.layers import ConcatFusion
    >>> layer = DynamicFusion([keras.layers.Dense(4), ConcatFusion(4)], expert_inputs=[[0], [0, 1]])
    >>> tuple(layer([np.ones((3, 2)), np.ones((3, 5))]).shape)
    (3, 4)
    """

    def __init__(
        self,
        experts,
        gate=None,
        expert_inputs=None,
        costs=None,
        temperature=1.0,
        cost_weight=0.0,
        straight_through=True,
        gumbel=False,
        hard_inference=True,
        gate_units=16,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        experts = [keras.saving.deserialize_keras_object(e) if isinstance(e, dict) else e for e in experts]
        if len(experts) < 2 or not all(isinstance(e, keras.layers.Layer) for e in experts):
            raise ValueError(f"experts must be a list of at least 2 Keras layers or models, got {experts!r}.")
        if isinstance(gate, dict):
            gate = keras.saving.deserialize_keras_object(gate)
        if gate is not None and not isinstance(gate, keras.layers.Layer):
            raise ValueError(f"gate must be None or a Keras layer, got {gate!r}.")
        if expert_inputs is not None:
            if len(expert_inputs) != len(experts):
                raise ValueError(
                    f"expert_inputs has {len(expert_inputs)} entries but there are {len(experts)} experts."
                )
            for i, subset in enumerate(expert_inputs):
                if not subset or not all(isinstance(m, int) and not isinstance(m, bool) and m >= 0 for m in subset):
                    raise ValueError(
                        f"expert_inputs[{i}] must be a non-empty list of modality indices, got {subset!r}."
                    )
            expert_inputs = [list(s) for s in expert_inputs]
        if costs is not None:
            costs = [float(c) for c in costs]
            if len(costs) != len(experts):
                raise ValueError(f"costs has {len(costs)} entries but there are {len(experts)} experts.")
            if any(not np.isfinite(c) or c < 0 for c in costs) or max(costs) <= 0:
                raise ValueError(f"costs must be finite and >= 0 with a positive maximum, got {costs}.")
        check_positive("temperature", temperature)
        if not (isinstance(cost_weight, (int, float)) and cost_weight >= 0):
            raise ValueError(f"cost_weight must be a number >= 0, got {cost_weight!r}.")
        check_int("gate_units", gate_units)
        self.experts = experts
        self.gate = gate
        self._custom_gate = gate is not None
        self.expert_inputs = expert_inputs
        self.user_costs = costs
        self.initial_temperature = float(temperature)
        self.cost_weight = float(cost_weight)
        self.straight_through = bool(straight_through)
        self.gumbel = bool(gumbel)
        self.hard_inference = bool(hard_inference)
        self.gate_units = gate_units
        self.seed = seed
        self.routing_metric = RoutingMetric(len(experts), prefix="dynmm", name=f"{self.name}_routing", layer=self)
        self._seed_generator = keras.random.SeedGenerator(seed) if gumbel else None
        with tf.init_scope():
            self._last_routing = tf.Variable(
                tf.zeros([0], tf.int32), shape=tf.TensorShape([None]), trainable=False, name="last_routing"
            )

    # -- building -------------------------------------------------------------------

    def _subset(self, i, items):
        indices = self.expert_inputs[i] if self.expert_inputs is not None else range(len(items))
        picked = [items[m] for m in indices]
        return picked[0] if len(picked) == 1 else picked

    def build_fusion(self, widths):
        if self.expert_inputs is not None:
            for i, subset in enumerate(self.expert_inputs):
                bad = [m for m in subset if m >= len(widths)]
                if bad:
                    raise ValueError(
                        f"{self.label}: expert_inputs[{i}] names modality {bad[0]}, but the layer "
                        f"is called on {len(widths)} modalities (indices 0..{len(widths) - 1})."
                    )
        shapes = [(None, w) for w in widths]
        out_shapes = []
        for i, expert in enumerate(self.experts):
            shape = self._subset(i, shapes)
            if not expert.built:
                expert.build(shape)
            out_shapes.append(_output_shape(expert, shape))
        if any(s[1:] != out_shapes[0][1:] for s in out_shapes) or len(out_shapes[0]) != 2:
            raise ValueError(
                f"{self.label}: every expert must return the same shape (batch, units); "
                f"got {[tuple(s) for s in out_shapes]}."
            )
        self._units = out_shapes[0][-1]
        gate_width = sum(widths)
        if self.gate is None:
            hidden = self.dense(self.gate_units, "gate_hidden", "relu", input_width=gate_width)
            logits = self.dense(len(self.experts), "gate_logits", input_width=self.gate_units)
            self.gate = keras.Sequential([hidden, logits], name="gate")
        if not self.gate.built:
            self.gate.build((None, gate_width))
        gate_shape = _output_shape(self.gate, (None, gate_width))
        if gate_shape[1:] != (len(self.experts),):
            raise ValueError(
                f"{self.label}: the gate must return (batch, {len(self.experts)}) logits, got {gate_shape}."
            )
        if self.user_costs is not None:
            costs = self.user_costs
        else:
            gate_macs = count_macs(self.gate, [gate_width])
            costs = [
                float(
                    count_macs(lambda xs, i=i: self._run_expert(i, list(xs)), widths, loop_trips=_loop_trips(e))
                    + gate_macs
                )
                for i, e in enumerate(self.experts)
            ]
        self.costs = costs
        # reads[e, m] = 1 when expert e reads modality m.
        self._reads = np.zeros((len(self.experts), len(widths)), "float32")
        for i in range(len(self.experts)):
            self._reads[i, self._subset(i, list(range(len(widths))))] = 1
        self._takes_mask = [
            self._reads[i].sum() > 1 and "modality_mask" in inspect.signature(e.call).parameters
            for i, e in enumerate(self.experts)
        ]
        self.presence_logits = self.add_weight(
            shape=(len(widths), len(self.experts)), initializer="zeros", name="presence_logits"
        )
        self._relative_costs = np.asarray(costs, "float32") / max(costs)
        self._temperature = self.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(self.initial_temperature),
            trainable=False,
            name="temperature",
        )

    # -- calling --------------------------------------------------------------------

    @property
    def temperature(self):
        """The current softmax temperature (a non-trainable variable once built)."""
        return float(self._temperature.numpy()) if self.built else self.initial_temperature

    @temperature.setter
    def temperature(self, value):
        if not (isinstance(value, (int, float)) and value > 0):
            raise ValueError(f"temperature must be a positive number, got {value!r}.")
        if self.built:
            self._temperature.assign(value)
        else:
            self.initial_temperature = float(value)

    def _run_expert(self, i, inputs, training=None, presence=None):
        if presence is None or not self._takes_mask[i]:
            return self.experts[i](self._subset(i, inputs), training=training)
        mask = ops.take(presence, np.flatnonzero(self._reads[i]), axis=1) > 0
        # A sample that none of the expert's modalities reaches cannot be routed to it;
        # it gets an all-present mask so that the expert's own check does not refuse it.
        mask = ops.logical_or(mask, ops.logical_not(ops.any(mask, axis=1, keepdims=True)))
        return self.experts[i](self._subset(i, inputs), modality_mask=mask, training=training)

    def _eligible(self, presence):
        """``(batch, num_experts)``: which experts can run on each sample's modalities."""
        absent = ops.matmul(1.0 - ops.cast(presence, "float32"), ops.convert_to_tensor(self._reads.T))
        # An expert that takes a mask runs while fewer than all its modalities are
        # absent; any other expert while none is.
        limit = np.where(self._takes_mask, self._reads.sum(axis=1) - 0.5, 0.5).astype("float32")
        return absent < ops.convert_to_tensor(limit)

    def gate_logits(self, inputs, presence=None, training=None):
        """The ``(batch, num_experts)`` routing logits, given the inputs and the 0/1
        ``(batch, N)`` presence of every modality (``None``: all present)."""
        logits = self.gate(ops.concatenate(inputs, axis=-1), training=training)
        weights = ops.cast(self.presence_logits, logits.dtype)
        if presence is None:
            # All present: a constant per expert, which exporters fold.
            return logits + ops.sum(weights, axis=0)
        return logits + ops.matmul(ops.cast(presence, logits.dtype), weights)

    def fuse(self, inputs, presence, training):
        logits = ops.cast(self.gate_logits(inputs, presence, training=training), "float32")
        if presence is not None:
            eligible = require_present(
                self.label, self._eligible(presence), needed="an expert that can run on its modalities"
            )
            logits = masked_logits(logits, eligible)
        relative = ops.convert_to_tensor(self._relative_costs)
        dtype = self.compute_dtype
        if training:
            if self.gumbel:
                u = keras.random.uniform(ops.shape(logits), 1e-6, 1.0 - 1e-6, seed=self._seed_generator)
                logits = logits - ops.log(-ops.log(u))
            soft = ops.softmax(logits / ops.cast(self._temperature, "float32"), axis=-1)
            route = tf.math.argmax(soft, axis=-1, output_type=tf.int32)
            weights = soft
            if self.straight_through:
                hard = ops.one_hot(route, len(self.experts), dtype="float32")
                weights = hard + soft - ops.stop_gradient(soft)
            if self.cost_weight > 0:
                expected = ops.mean(ops.sum(weights * relative, axis=-1))
                self.add_loss(self.cost_weight * expected)
            outputs = ops.stack(
                [ops.cast(self._run_expert(i, inputs, True, presence), "float32") for i in range(len(self.experts))],
                axis=1,
            )
            fused = ops.cast(ops.einsum("be,bed->bd", weights, outputs), dtype)
        else:
            # tf.math.argmax rather than keras.ops.argmax: the latter's handling of
            # negative zero adds bitcasts that neither TFLite nor ONNX supports.
            route = tf.math.argmax(logits, axis=-1, output_type=tf.int32)
            # The presence weights travel with the inputs, so that routing gathers their rows too.
            routed = inputs if presence is None else inputs + [presence]
            count = len(inputs)
            branches = [
                lambda xs, i=i: self._run_expert(i, xs[:count], False, None if presence is None else xs[count])
                for i in range(len(self.experts))
            ]
            if not self.hard_inference:
                soft = ops.softmax(logits / ops.cast(self._temperature, "float32"), axis=-1)
                outputs = ops.stack([ops.cast(b(routed), "float32") for b in branches], axis=1)
                fused = ops.cast(ops.einsum("be,bed->bd", soft, outputs), dtype)
            elif in_xla_context():
                fused = masked_route(route, branches, routed, dtype)
            else:
                fused = partitioned_route(route, branches, routed, self._units, dtype)
        if recording_statistics():
            self.routing_metric.update_state(route, relative)
            # A variable whose shape changes between calls cannot be written under XLA.
            # Gathering the replicas' routes synchronises them, which must not happen
            # inside a distributed training step (see gather_replicas).
            several = getattr(tf.distribute.get_replica_context(), "num_replicas_in_sync", 1) > 1
            if not in_xla_context() and not (training and several):
                self._last_routing.assign(gather_replicas(route))
        return fused

    @property
    def last_routing(self):
        """The expert index chosen for each sample of the last call (int32); under a
        ``tf.distribute`` strategy, for every sample of the global batch, in replica
        order, and recorded by inference calls only (``evaluate``, ``predict``): a
        distributed training step leaves it unchanged."""
        return tf.convert_to_tensor(self._last_routing)

    def output_width(self, widths):
        if not self.built:
            self.build([(None, w) for w in widths])
        return self._units

    def get_config(self):
        config = super().get_config()
        config.update(
            experts=[keras.saving.serialize_keras_object(e) for e in self.experts],
            gate=keras.saving.serialize_keras_object(self.gate) if self._custom_gate else None,
            expert_inputs=self.expert_inputs,
            costs=self.user_costs,
            temperature=self.initial_temperature,
            cost_weight=self.cost_weight,
            straight_through=self.straight_through,
            gumbel=self.gumbel,
            hard_inference=self.hard_inference,
            gate_units=self.gate_units,
            seed=self.seed,
        )
        return config
