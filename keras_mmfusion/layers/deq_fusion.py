"""DEQ fusion (Ni et al., "Deep Equilibrium Multimodal Fusion", arXiv 2306.16645)."""

import warnings

import keras
from keras import ops

from keras_mmfusion import defaults
from keras_mmfusion._checks import (
    check_choice,
    check_fraction,
    check_int,
    check_non_negative,
    check_solver_arguments,
    check_units,
    check_warmup_arguments,
)
from keras_mmfusion.equilibrium.adjoint import ImplicitAdjoint, UnrolledAdjoint, as_adjoint, serialize_adjoint
from keras_mmfusion.equilibrium.iteration import internal_dtype, resolvable_tol
from keras_mmfusion.equilibrium.jacobian import gaussian_probes
from keras_mmfusion.equilibrium.solve import fixed_point_solve
from keras_mmfusion.equilibrium.solvers import available_solvers
from keras_mmfusion.layers.fusion_layer import FusionLayer
from keras_mmfusion.layers.normalization import ExactGroupNormalization
from keras_mmfusion.layers.weight_normalization import WeightNormalizedDense
from keras_mmfusion.layer_statistics import SolverStatsMetric, recording_statistics, report_solver_stats

# The fused state's injections: trained weights per modality and a bias, or the plain sum.
INJECTIONS = ("weighted", "sum")
# The Dense class of the update's layers, by ``DEQFusion``'s ``kernel_normalization``.
_DENSE = {None: keras.layers.Dense, "weight": WeightNormalizedDense}
# The settings of the backward shorthand names, at their defaults.
_SHORTHAND_DEFAULTS = dict(
    backward_max_iter=None,
    backward_tol=None,
    backward_stop_mode=defaults.BACKWARD_STOP_MODE,
    phantom_steps=defaults.PHANTOM_STEPS,
    phantom_damping=defaults.PHANTOM_DAMPING,
)


class _ModalityBlock(keras.layers.Layer):
    """One modality's update: ``GN3(relu(GN2(W2 relu(GN1(W1 z)) + x) + z))``."""

    def __init__(self, dense, groups, **kwargs):
        super().__init__(**kwargs)
        self.dense1 = dense("dense1")
        self.dense2 = dense("dense2")
        norm = dict(groups=groups, epsilon=1e-5, dtype=self.dtype_policy)
        self.norm1 = ExactGroupNormalization(name="norm1", **norm)
        self.norm2 = ExactGroupNormalization(name="norm2", **norm)
        self.norm3 = ExactGroupNormalization(name="norm3", **norm)

    def build(self, input_shape):
        for layer in (self.dense1, self.dense2, self.norm1, self.norm2, self.norm3):
            layer.build(input_shape)

    def call(self, z, x):
        h = ops.relu(self.norm1(self.dense1(z)))
        h = self.norm2(self.dense2(h) + x)
        return self.norm3(ops.relu(h + z))


class _PurifyCombineBlock(keras.layers.Layer):
    """The fused state's update: ``GN(relu(W_f sum_i z_f * W_g(z_i' + z_f) + x_fuse))``.

    The gate ``W_g`` is shared by the modalities and, as in the paper's code, linear.
    GroupNorm comes after the ReLU, as in the modality blocks' last step, so the fused
    state is normalised rather than clipped at zero.
    """

    def __init__(self, dense, groups, **kwargs):
        super().__init__(**kwargs)
        self.gate = dense("gate")
        self.combine = dense("combine")
        self.norm = ExactGroupNormalization(groups=groups, epsilon=1e-5, name="norm", dtype=self.dtype_policy)

    def build(self, input_shape):
        for layer in (self.gate, self.combine, self.norm):
            layer.build(input_shape)

    def call(self, z_fuse, modality_states, x_fuse, presence=None):
        purified = [z_fuse * self.gate(z_i + z_fuse) for z_i in modality_states]
        if presence is not None:
            purified = [p * presence[:, i : i + 1] for i, p in enumerate(purified)]
        return self.norm(ops.relu(self.combine(ops.sum(ops.stack(purified), axis=0)) + x_fuse))


def _adjoint_of(label, backward, **shorthand):
    """The adjoint object of ``DEQFusion(backward=...)``; the shorthand settings must keep
    their defaults when ``backward`` is an adjoint object (or its config)."""
    adjoint = as_adjoint(backward, **shorthand)
    if not isinstance(backward, str) and shorthand != _SHORTHAND_DEFAULTS:
        raise ValueError(
            f"{label}: backward is an adjoint object ({adjoint!r}), so the backward_* and phantom_* "
            "arguments, which configure the shorthand names only, must keep their defaults."
        )
    return adjoint


@keras.saving.register_keras_serializable(package="keras_mmfusion")
class DEQFusion(FusionLayer):
    """Deep equilibrium multimodal fusion.

    One update ``f`` refreshes a state ``z_i`` per modality and a fused state
    ``z_fuse``: each ``z_i`` goes through a residual block with GroupNorm and its
    injected input ``x_i``; ``z_fuse`` is purified by a gate shared across modalities,
    and the purified copies are summed, mapped by a Dense layer, added to the injection
    ``x_fuse = sum_i w_i x_i + b`` (or the plain sum, see ``injection``), passed
    through a ReLU and normalised. The layer
    returns ``z_fuse`` at the fixed point ``z* = f(z*; x)``, solved from ``z = 0`` in a
    bounded ``tf.while_loop``; the implicit gradient needs no memory per iteration.
    Under ``modality_mask`` (boolean ``(batch, N)``) an absent modality's state stays 0
    and it is neither summed nor injected. Solver statistics reach ``fit`` logs as
    ``deq_steps``, ``deq_residual``, ``deq_converged`` (``deq_backward_*`` for the
    adjoint) and :attr:`last_stats`. ``docs/guide.md`` explains the defaults.

    Args:
        units: width of every state. Inputs of another width are projected to it by a
            Dense layer. ``None`` (the default) uses the inputs' common width.
        solver: the forward solver, ``"anderson"`` (the default), ``"broyden"`` or
            ``"fixed_point"``.
        max_iter: the largest number of evaluations of ``f`` per forward solve.
            Defaults to 50.
        tol: the forward stopping tolerance on every sample's residual. Defaults to
            1e-4. A relative ``tol`` below 8 epsilons of the compute dtype (9.5e-7 in
            float32, 7.8e-3 in float16) is raised to it, with a warning
            (:attr:`effective_tol`).
        stop_mode: ``"rel"`` (the default, ``||f(z) - z|| / ||f(z)||``) or ``"abs"``.
        backward: the gradient: ``"implicit"`` (the default), ``"phantom"``,
            ``"unrolled"``, or an adjoint object of :mod:`keras_mmfusion.equilibrium`
            (:class:`~keras_mmfusion.equilibrium.ImplicitAdjoint` and the others).
            The names stand for the objects made from the ``backward_*`` and
            ``phantom_*`` arguments, which apply to the names only.
        backward_max_iter: the implicit adjoint solve's budget. ``None`` (the
            default) uses ``max_iter``.
        backward_tol: the implicit adjoint solve's tolerance. ``None`` (the default)
            uses ``tol``; a relative one is raised as ``tol`` is.
        backward_stop_mode: the implicit adjoint solve's stopping rule: ``"rel"`` (the
            default) relative to the upstream gradient's norm, or ``"abs"``
            (:func:`~keras_mmfusion.equilibrium.solve_adjoint`).
        jacobian_weight: weight of the Jacobian penalty, the Hutchinson estimate of
            ``||J_f(z*)||_F^2 / dim`` (Bai et al., "Stabilizing Equilibrium Models by
            Jacobian Regularization", 2021), added with ``add_loss`` in training calls.
            0 disables it. Defaults to 50. ``fit`` logs the unweighted penalty as
            ``<name>_jacobian``.
        jacobian_probes: the number of probe vectors of that estimate. Defaults to 1.
        jacobian_frequency: the probability, in ``(0, 1]``, that a training call
            computes the penalty (Bai et al.'s ``jac_loss_freq``). Defaults to 1.
        num_groups: GroupNorm groups in the update; ``units`` must be divisible by it.
            Defaults to 1.
        phantom_steps: unrolled steps of ``backward="phantom"`` (Geng et al., "On
            Training Implicit Models", 2021). Defaults to 5.
        phantom_damping: damping of those steps, in ``(0, 1]``. Defaults to 0.5.
        warmup_steps: the number of first training calls that replace the solve by
            ``warmup_depth`` plain iterations from ``z = 0``, differentiated by
            autodiff (Bai et al.'s pretraining of DEQ models). They are counted in the
            saved non-trainable variable ``training_calls``. Defaults to 0.
        warmup_depth: the iterations of a warm-up call. Defaults to 5.
        solver_options: extra keyword arguments for the solver, e.g.
            ``{"memory": 5, "ridge": 1e-4}`` for Anderson.
        kernel_initializer: initializer of the update's Dense kernels. ``None`` (the
            default) is ``RandomNormal(stddev=0.01)``, which makes the untrained update
            a contraction for most draws. The input projections use Glorot uniform.
        bias_initializer: initializer of every Dense bias. Defaults to zeros.
        kernel_regularizer: regularizer of every Dense kernel. Defaults to ``None``.
        bias_regularizer: regularizer of every Dense bias. Defaults to ``None``.
        kernel_constraint: constraint of every Dense kernel. Defaults to ``None``.
        bias_constraint: constraint of every Dense bias. Defaults to ``None``.
        kernel_normalization: ``None`` (the default) or ``"weight"``, which makes the
            update's Dense layers :class:`~keras_mmfusion.layers.WeightNormalizedDense`
            (Salimans & Kingma, 2016).
        injection: the fused state's injection ``x_fuse``: ``"weighted"`` (the
            default), ``sum_i w_i x_i + b`` with a trained weight per modality (starting
            at 1) and a trained bias (starting at 0); or ``"sum"``, the plain sum
            ``sum_i x_i`` without parameters, as in the paper's code.
        seed: seed of the Jacobian probes and of ``jacobian_frequency``'s draws.
        **kwargs: base ``Layer`` arguments (``name``, ``dtype``, ...).

    Input shape:
        A list of ``N >= 2`` tensors ``(batch, d_i)``; optionally ``modality_mask``,
        boolean ``(batch, N)``.

    Output shape:
        ``(batch, units)``.

    Example:

    >>> import numpy as np
    >>> fused = DEQFusion(units=16)([np.ones((4, 8)), np.ones((4, 12))])
    >>> tuple(fused.shape)
    (4, 16)

    Reference:

    - [Ni et al., 2023](https://arxiv.org/abs/2306.16645)
    """

    def __init__(
        self,
        units=None,
        solver=defaults.SOLVER,
        max_iter=defaults.MAX_ITER,
        tol=defaults.TOL,
        stop_mode=defaults.STOP_MODE,
        backward=defaults.BACKWARD,
        backward_max_iter=None,
        backward_tol=None,
        backward_stop_mode=defaults.BACKWARD_STOP_MODE,
        jacobian_weight=50.0,
        jacobian_probes=1,
        jacobian_frequency=1.0,
        num_groups=1,
        phantom_steps=defaults.PHANTOM_STEPS,
        phantom_damping=defaults.PHANTOM_DAMPING,
        warmup_steps=0,
        warmup_depth=defaults.WARMUP_DEPTH,
        solver_options=None,
        kernel_initializer=None,
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        kernel_normalization=None,
        injection="weighted",
        seed=None,
        **kwargs,
    ):
        super().__init__(
            kernel_initializer=kernel_initializer or keras.initializers.RandomNormal(stddev=0.01),
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            bias_regularizer=bias_regularizer,
            kernel_constraint=kernel_constraint,
            bias_constraint=bias_constraint,
            **kwargs,
        )
        check_units(units)
        check_choice("solver", solver, available_solvers())
        check_solver_arguments(max_iter, tol, stop_mode)
        adjoint = _adjoint_of(
            self.label,
            backward,
            backward_max_iter=backward_max_iter,
            backward_tol=backward_tol,
            backward_stop_mode=backward_stop_mode,
            phantom_steps=phantom_steps,
            phantom_damping=phantom_damping,
        )
        check_non_negative("jacobian_weight", jacobian_weight)
        check_int("jacobian_probes", jacobian_probes)
        check_fraction("jacobian_frequency", jacobian_frequency)
        check_int("num_groups", num_groups)
        check_int("warmup_steps", warmup_steps, minimum=0)
        check_warmup_arguments(warmup_steps > 0, warmup_depth, isinstance(adjoint, UnrolledAdjoint))
        check_choice("kernel_normalization", kernel_normalization, tuple(_DENSE))
        check_choice("injection", injection, INJECTIONS)
        if solver_options is not None and not isinstance(solver_options, dict):
            raise ValueError(f"solver_options must be a dict or None, got {solver_options!r}.")
        self.units = units
        self.solver = solver
        self.max_iter = max_iter
        self.tol = tol
        self.stop_mode = stop_mode
        self.backward = backward if isinstance(backward, str) else adjoint
        self.backward_max_iter, self.backward_tol = backward_max_iter, backward_tol
        self.backward_stop_mode = backward_stop_mode
        self.phantom_steps, self.phantom_damping = phantom_steps, phantom_damping
        self.jacobian_weight, self.jacobian_probes = jacobian_weight, jacobian_probes
        self.jacobian_frequency = jacobian_frequency
        self.num_groups = num_groups
        self.warmup_steps, self.warmup_depth = warmup_steps, warmup_depth
        self.solver_options = dict(solver_options or {})
        self.kernel_normalization = kernel_normalization
        self.injection = injection
        self.seed = seed
        self.stats_metric = SolverStatsMetric(
            prefix="deq", name=f"{self.name}_solver_stats", layer=self, backward=isinstance(adjoint, ImplicitAdjoint)
        )
        self._seed_generator = keras.random.SeedGenerator(seed) if jacobian_weight > 0 else None
        # The unweighted penalty of the training calls, logged as ``<name>_jacobian``.
        self.jacobian_metric = keras.metrics.Mean(name=f"{self.name}_jacobian") if jacobian_weight > 0 else None

    def output_width(self, widths):
        return self.units if self.units is not None else widths[0]

    def build_fusion(self, widths):
        units = self.units
        if units is None and len(set(widths)) != 1:
            raise ValueError(
                f"{self.label}: the input widths {widths} differ, so units=None cannot "
                "use a common width; pass units=... to project every input to it."
            )
        units = self.output_width(widths)
        if units % self.num_groups:
            raise ValueError(
                f"{self.label}: the state width {units} "
                f"({'units' if self.units else 'the common input width'}) must be "
                f"divisible by num_groups={self.num_groups}."
            )
        self._state_units = units
        # The input projections keep Glorot-uniform kernels whatever kernel_initializer is.
        self.projections = [
            self.dense(units, f"projection_{i}", input_width=width, kernel_initializer="glorot_uniform")
            if width != units
            else None
            for i, width in enumerate(widths)
        ]
        layer_class = _DENSE[self.kernel_normalization]

        def dense(name):
            return self.dense(units, name, layer_class=layer_class)

        block = dict(dense=dense, groups=self.num_groups, dtype=self.dtype_policy)
        self.modality_blocks = [_ModalityBlock(name=f"modality_block_{i}", **block) for i in range(len(widths))]
        self.fusion_block = _PurifyCombineBlock(name="fusion_block", **block)
        for layer in self.modality_blocks + [self.fusion_block]:
            layer.build((None, units))
        if self.injection == "weighted":
            self.injection_weights = self.add_weight(
                shape=(len(widths),), initializer="ones", name="injection_weights"
            )
            self.injection_bias = self.add_weight(shape=(1,), initializer="zeros", name="injection_bias")
        if self.warmup_steps:
            # Updated once per training call on the first replica, like an optimizer's
            # iteration count.
            self.training_calls = self.add_weight(
                shape=(),
                dtype="int64",
                initializer="zeros",
                trainable=False,
                aggregation="only_first_replica",
                name="training_calls",
            )

    @property
    def adjoint(self):
        """The adjoint object of the layer's solves: ``backward`` when it is one; for a
        name, the object it stands for, with :attr:`effective_backward_tol`."""
        if not isinstance(self.backward, str):
            return self.backward
        return as_adjoint(
            self.backward,
            backward_max_iter=self.backward_max_iter,
            backward_tol=self.effective_backward_tol,
            backward_stop_mode=self.backward_stop_mode,
            phantom_steps=self.phantom_steps,
            phantom_damping=self.phantom_damping,
        )

    @property
    def effective_tol(self):
        """The forward tolerance of the solves: ``tol``, raised to what the update's
        compute dtype resolves
        (:func:`~keras_mmfusion.equilibrium.iteration.resolvable_tol`), with one warning."""
        tol = resolvable_tol(self.tol, self.stop_mode, self.compute_dtype)
        if tol != self.tol and not getattr(self, "_warned_tol", False):
            self._warned_tol = True
            warnings.warn(
                f"{self.label}: tol={self.tol:g} is below what its {self.compute_dtype} update "
                f"resolves; its solves stop at a relative residual of {tol:.2g} instead.",
                stacklevel=2,
            )
        return tol

    @property
    def effective_backward_tol(self):
        """The implicit adjoint solves' tolerance: ``backward_tol``, or ``tol`` when it is
        ``None``, raised as :attr:`effective_tol` is when
        ``backward_stop_mode`` is ``"rel"``."""
        tol = self.tol if self.backward_tol is None else self.backward_tol
        return resolvable_tol(tol, self.backward_stop_mode, self.compute_dtype)

    def _equilibrium_map(self, z, x):
        xs, x_fuse = x[:2]
        presence = x[2] if len(x) > 2 else None
        states = ops.split(z, len(xs) + 1, axis=-1)
        updated = [block(s, xi) for block, s, xi in zip(self.modality_blocks, states[:-1], xs)]
        if presence is not None:
            updated = [u * presence[:, i : i + 1] for i, u in enumerate(updated)]
        fused = self.fusion_block(states[-1], updated, x_fuse, presence)
        return ops.concatenate(updated + [fused], axis=-1)

    def _injections(self, inputs, presence=None):
        """The solver's inputs ``(xs, x_fuse[, presence])`` and the start ``z0 = 0``."""
        xs = [x if p is None else p(x) for x, p in zip(inputs, self.projections)]
        if self.injection == "weighted":
            weights = ops.cast(self.injection_weights, xs[0].dtype)
            bias = ops.cast(self.injection_bias, xs[0].dtype)
        else:
            weights, bias = ops.ones((len(xs),), xs[0].dtype), 0.0
        if presence is not None:
            weights = weights * presence
        x_fuse = sum(weights[..., i : i + 1] * x for i, x in enumerate(xs)) + bias
        z0 = ops.zeros((ops.shape(xs[0])[0], self._state_units * (len(xs) + 1)), dtype=xs[0].dtype)
        return ((xs, x_fuse) if presence is None else (xs, x_fuse, presence)), z0

    def _solve_state(self, x, z0, jacobian_probes=None, jacobian_active=None, warmup=None):
        return fixed_point_solve(
            self._equilibrium_map,
            x,
            z0,
            solver=self.solver,
            max_iter=self.max_iter,
            tol=self.effective_tol,
            stop_mode=self.stop_mode,
            adjoint=self.adjoint,
            solver_options=self.solver_options,
            jacobian_probes=jacobian_probes,
            jacobian_active=jacobian_active,
            warmup=warmup,
            warmup_depth=self.warmup_depth,
            backward_callback=self._record_backward,
        )

    def _record_backward(self, stats):
        if recording_statistics():
            self.stats_metric.update_backward_state(stats)

    def solve(self, inputs, modality_mask=None):
        """The forward solve on ``inputs``: ``(z_fuse*, stats)``.

        ``stats`` is the full :class:`~keras_mmfusion.equilibrium.SolverStats`,
        including the per-step ``trace`` of the batch-mean residual (for plots).
        Statistics are not recorded into :attr:`last_stats`.
        """
        inputs = [ops.convert_to_tensor(a) for a in inputs]
        if not self.built:
            self.build([tuple(x.shape) for x in inputs])
        z, stats = self._solve_state(*self._injections(*self.checked_inputs(inputs, modality_mask)))
        return z[:, -self._state_units :], stats

    def fuse(self, inputs, presence, training):
        x, z0 = self._injections(inputs, presence)
        probes = active = None
        if training and self.jacobian_weight > 0:
            probes = gaussian_probes(z0, self.jacobian_probes, seed=self._seed_generator.next())
            if self.jacobian_frequency < 1:
                active = keras.random.uniform((), seed=self._seed_generator) < self.jacobian_frequency
        warmup = None
        if training and self.warmup_steps:
            warmup = self.training_calls < self.warmup_steps
            self.training_calls.assign_add(1)
        z, stats = self._solve_state(x, z0, jacobian_probes=probes, jacobian_active=active, warmup=warmup)
        report_solver_stats(self.name, stats)
        if recording_statistics():
            self.stats_metric.update_state(stats)
        if probes is not None:
            # The penalty keeps the solver's precision: float64 for float64 layers,
            # float32 otherwise (mixed precision included).
            penalty = ops.cast(stats.jacobian, internal_dtype(z0.dtype))
            if recording_statistics():
                self.jacobian_metric.update_state(penalty)
            self.add_loss(ops.cast(self.jacobian_weight, penalty.dtype) * penalty)
        return z[:, -self._state_units :]

    @property
    def last_stats(self):
        """``{"steps", "residual", "converged"}`` of the last forward solve.

        ``steps`` counts evaluations of the update, ``residual`` is the largest
        per-sample residual in the batch and ``converged`` says whether every sample
        met ``tol``. With the implicit adjoint, ``backward_steps``,
        ``backward_residual`` and ``backward_converged`` say the same of the last
        adjoint solve. Values are zero before the first call (before the first
        gradient for the adjoint's).
        """
        return self.stats_metric.last()

    def get_config(self):
        config = super().get_config()
        config.update(
            units=self.units,
            solver=self.solver,
            max_iter=self.max_iter,
            tol=self.tol,
            stop_mode=self.stop_mode,
            backward=self.backward if isinstance(self.backward, str) else serialize_adjoint(self.backward),
            backward_max_iter=self.backward_max_iter,
            backward_tol=self.backward_tol,
            backward_stop_mode=self.backward_stop_mode,
            jacobian_weight=self.jacobian_weight,
            jacobian_probes=self.jacobian_probes,
            jacobian_frequency=self.jacobian_frequency,
            num_groups=self.num_groups,
            phantom_steps=self.phantom_steps,
            phantom_damping=self.phantom_damping,
            warmup_steps=self.warmup_steps,
            warmup_depth=self.warmup_depth,
            solver_options=dict(self.solver_options),
            kernel_normalization=self.kernel_normalization,
            injection=self.injection,
            seed=self.seed,
        )
        return config
