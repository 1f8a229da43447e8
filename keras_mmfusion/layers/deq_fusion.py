"""DEQ fusion (Ni et al., "Deep Equilibrium Multimodal Fusion", arXiv 2306.16645)."""

import warnings

import keras
from keras import ops

from keras_mmfusion.equilibrium.iteration import check_solver_arguments, internal_dtype, resolvable_tol
from keras_mmfusion.equilibrium.solve import check_backward_arguments, check_warmup_arguments, fixed_point_solve
from keras_mmfusion.equilibrium.solvers import available_solvers
from keras_mmfusion.layers.modality_inputs import check_modalities, modality_widths
from keras_mmfusion.layers.modality_mask import masked_inputs
from keras_mmfusion.layers.normalization import ExactGroupNormalization
from keras_mmfusion.layers.weight_normalization import WeightNormalizedDense
from keras_mmfusion.metrics import SolverStatsMetric, recording_statistics, report_solver_stats
from keras_mmfusion._checks import check_fraction, check_int, check_non_negative


# The Dense layers of the update, by ``DEQFusion``'s ``kernel_normalization``.
_DENSE = {None: keras.layers.Dense, "weight": WeightNormalizedDense}


class _ModalityBlock(keras.layers.Layer):
    """One modality's update: ``GN3(relu(GN2(W2 relu(GN1(W1 z)) + x) + z))``."""

    def __init__(self, units, groups, kernel_initializer, kernel_normalization, **kwargs):
        super().__init__(**kwargs)
        dense = dict(kernel_initializer=kernel_initializer, dtype=self.dtype_policy)
        norm = dict(groups=groups, epsilon=1e-5, dtype=self.dtype_policy)
        Dense = _DENSE[kernel_normalization]
        self.dense1 = Dense(units, name="dense1", **dense)
        self.dense2 = Dense(units, name="dense2", **dense)
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

    The gate ``W_g`` is shared by the modalities and, as in the reference code, linear.
    GroupNorm comes after the ReLU, as in the modality blocks' last step, so the fused
    state is normalised rather than clipped at zero.
    """

    def __init__(self, units, groups, kernel_initializer, kernel_normalization, **kwargs):
        super().__init__(**kwargs)
        dense = dict(kernel_initializer=kernel_initializer, dtype=self.dtype_policy)
        Dense = _DENSE[kernel_normalization]
        self.gate = Dense(units, name="gate", **dense)
        self.combine = Dense(units, name="combine", **dense)
        self.norm = ExactGroupNormalization(
            groups=groups, epsilon=1e-5, name="norm", dtype=self.dtype_policy
        )

    def build(self, input_shape):
        for layer in (self.gate, self.combine, self.norm):
            layer.build(input_shape)

    def call(self, z_fuse, modality_states, x_fuse, presence=None):
        purified = [z_fuse * self.gate(z_i + z_fuse) for z_i in modality_states]
        if presence is not None:
            purified = [p * presence[:, i : i + 1] for i, p in enumerate(purified)]
        return self.norm(ops.relu(self.combine(ops.sum(ops.stack(purified), axis=0)) + x_fuse))


@keras.saving.register_keras_serializable(package="keras_mmfusion")
class DEQFusion(keras.layers.Layer):
    """Deep equilibrium multimodal fusion.

    Each modality ``i`` has a state ``z_i`` and there is a fused state ``z_fuse``. One
    update ``f`` refreshes all of them: every ``z_i`` goes through a residual block
    with GroupNorm and the injected input ``x_i``; then ``z_fuse`` is "purified" by a
    shared gate computed from ``z_i' + z_fuse`` for every modality, and the purified
    copies are summed, passed through a linear layer plus the injected weighted sum
    ``x_fuse = sum_i w_i x_i + b``, a ReLU and GroupNorm. The layer solves for the
    fixed point ``z* = f(z*; x)`` from ``z = 0`` and returns ``z_fuse*``.

    Missing modalities. Called as ``layer(inputs, modality_mask=mask)`` (boolean
    ``(batch, N)``, True where present), the update leaves every absent modality out:
    its state stays 0, its purified copy is not added to the fused state's sum and its
    input is not injected into ``x_fuse``. The layer is then the equilibrium model of
    the present modalities, with the same weights; the solver statistics are those of
    that smaller model too. A sample with no modality present is refused (see
    :func:`~keras_mmfusion.layers.modality_mask.require_present`).

    The solve runs in a bounded ``tf.while_loop``; gradients come from the backward
    mode chosen (implicit differentiation by default), so training memory does not
    grow with the number of solver iterations. Solver statistics are logged by
    ``model.fit``/``evaluate`` as ``deq_steps``, ``deq_residual`` and
    ``deq_converged`` and are readable after any call from :attr:`last_stats`; with
    ``backward="implicit"`` those of the adjoint solve are logged as
    ``deq_backward_steps``, ``deq_backward_residual`` and ``deq_backward_converged``.

    Args:
        units: width of every state. Inputs whose width differs are projected to it
            by a Dense layer. ``None`` uses the inputs' common width, and then all
            input widths must be equal.
        solver: ``"anderson"``, ``"broyden"`` or ``"fixed_point"``.
        max_iter: the largest number of evaluations of ``f`` per forward solve.
        tol: the forward stopping tolerance on every sample's residual. Under a mixed
            precision policy a relative ``tol`` below what the compute dtype resolves
            is raised to it, with a warning (see :attr:`effective_tol`).
        stop_mode: ``"rel"`` (``||f(z) - z|| / ||f(z)||``) or ``"abs"``.
        backward: ``"implicit"``, ``"phantom"`` or ``"unrolled"``; see
            :func:`keras_mmfusion.equilibrium.fixed_point_solve`.
        backward_max_iter: iterations of the implicit adjoint solve (default
            ``max_iter``).
        backward_tol: tolerance of the adjoint solve (default ``tol``). Under a mixed
            precision policy a relative tolerance is raised as ``tol`` is.
        backward_stop_mode: the adjoint solve's stopping rule, independent of
            ``stop_mode``: ``"rel"`` (the default) stops a sample once its adjoint
            residual is at most ``backward_tol`` times its upstream gradient's norm,
            so the gradient scales with the loss however small it is; ``"abs"`` stops
            on the residual itself. Either way the adjoint solve starts from the
            upstream gradient, never from zero (see
            :func:`keras_mmfusion.equilibrium.solve.solve_adjoint`).
        jacobian_weight: weight of the Hutchinson estimate of ``||J_f(z*)||_F^2 / dim``,
            added with ``add_loss`` in training calls only. 0 disables it. The default,
            50, keeps the trained update a contraction, so training solves converge and
            the implicit gradient is the model's gradient; it was chosen on the
            cross-modal XOR task of ``benchmarks/deq_trainability.py``, where weights of
            10 or less learnt more slowly and left some solves unconverged (see
            ``benchmarks/RESULTS.md``). The penalty is part of the training loss that
            ``fit`` logs.
        jacobian_probes: the number of probe vectors of that estimate.
        jacobian_frequency: the probability, in ``(0, 1]``, that a training call
            computes the penalty (Bai et al. 2021's ``jac_loss_freq``); on the other
            calls it is 0 and its vector-Jacobian products are skipped, which saves
            their cost (not under XLA, which computes them and zeroes the penalty).
            The default, 1, applies it on every call.
        num_groups: GroupNorm groups; ``units`` must be divisible by it. The default, 1,
            normalises each state as a whole, which keeps the relative sizes of all its
            features; the reference code uses 4 groups, which learnt the cross-modal XOR
            task more slowly (``benchmarks/RESULTS.md``).
        phantom_steps: unrolled steps of the phantom gradient.
        phantom_damping: damping of the phantom steps.
        warmup_steps: the number of the layer's first training calls that replace
            the solve by ``warmup_depth`` plain iterations of the update from
            ``z = 0``, differentiated by autodiff, so that the model trains as a
            shallow weight-tied network before it trains as an equilibrium model
            (Bai et al.'s pretraining of DEQ models). The calls are counted in the
            non-trainable variable ``training_calls``, saved with the model, so a
            resumed training does not warm up again; a call counts whether or not the
            optimizer applies its update (mixed precision's loss scaling skips those
            that overflow). During the warm-up the logged ``deq_steps`` is
            ``warmup_depth``, the residual is that of the last iterate and the
            Jacobian penalty is taken there. The training step holds both the
            warm-up and the solve, so it takes longer to trace and compile (about
            three times as long for a small model on a CPU, ``benchmarks/RESULTS.md``).
            It needs ``backward="implicit"`` or ``"phantom"``. The default, 0, never
            warms up: on the cross-modal XOR task it changed neither the accuracy nor
            the convergence, and on ROSMAP it raised the standard classifier's
            validation loss and did not keep the reference classifier's late training
            solves converged (``benchmarks/RESULTS.md``).
        warmup_depth: the number of iterations of a warm-up call.
        solver_options: extra keyword arguments for the solver, e.g.
            ``{"memory": 5, "ridge": 1e-4}`` for Anderson.
        kernel_initializer: initializer of the Dense kernels inside the update ``f``.
            ``None`` (the default) draws them from ``RandomNormal(stddev=0.01)``: with
            small weights the injected inputs dominate each update, so for most draws
            ``f`` is a contraction at initialisation and the solver converges from the
            first training step. Glorot-scaled kernels can leave the
            untrained ``f`` far from a contraction: on the standardised ROSMAP omics
            views (three weight draws, width 32), Anderson's mean relative residual
            after 100 steps was 5e-2 with Glorot kernels, and 8e-7 to 5e-5 within 60
            steps with the small kernels. The input projections always use Glorot
            uniform.
        kernel_normalization: ``None`` (the default) or ``"weight"``: the update's
            Dense layers become :class:`~keras_mmfusion.layers.WeightNormalizedDense`
            (each kernel column ``scale * v / ||v||``, Salimans & Kingma 2016, which
            TorchDEQ applies to equilibrium updates by default). The input projections
            stay plain. On the cross-modal XOR task of
            ``benchmarks/deq_trainability.py`` it converged more training solves than
            the plain kernels when the Jacobian penalty was off, but fewer than the
            penalty, and with the penalty on it changed neither the accuracy nor the
            convergence (``benchmarks/RESULTS.md``), so it is off by default.
        seed: seed of the Jacobian probes.
        **kwargs: base ``Layer`` arguments (``name``, ``dtype``, ...).

    Input shape:
        A list of ``N >= 2`` tensors ``(batch, d_i)``; optionally
        ``modality_mask``, boolean ``(batch, N)``.

    Output shape:
        ``(batch, units)``.

    Example:

    >>> import numpy as np
    >>> fused = DEQFusion(units=16)([np.ones((4, 8)), np.ones((4, 12))])
    >>> tuple(fused.shape)
    (4, 16)
    """

    def __init__(
        self,
        units=None,
        solver="anderson",
        max_iter=50,
        tol=1e-4,
        stop_mode="rel",
        backward="implicit",
        backward_max_iter=None,
        backward_tol=None,
        backward_stop_mode="rel",
        jacobian_weight=50.0,
        jacobian_probes=1,
        jacobian_frequency=1.0,
        num_groups=1,
        phantom_steps=5,
        phantom_damping=0.5,
        warmup_steps=0,
        warmup_depth=5,
        solver_options=None,
        kernel_initializer=None,
        kernel_normalization=None,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if units is not None and (isinstance(units, bool) or not isinstance(units, int) or units < 1):
            raise ValueError(f"units must be None or a positive integer, got {units!r}.")
        if solver not in available_solvers():
            raise ValueError(f"solver must be one of {available_solvers()}, got {solver!r}.")
        check_solver_arguments(max_iter, tol, stop_mode)
        check_backward_arguments(
            backward, backward_max_iter, backward_tol, phantom_steps, phantom_damping, backward_stop_mode
        )
        check_non_negative("jacobian_weight", jacobian_weight)
        check_int("jacobian_probes", jacobian_probes)
        check_fraction("jacobian_frequency", jacobian_frequency)
        check_int("num_groups", num_groups)
        check_int("warmup_steps", warmup_steps, minimum=0)
        check_warmup_arguments(warmup_steps > 0, warmup_depth, backward)
        if kernel_normalization not in _DENSE:
            raise ValueError(
                f"kernel_normalization must be one of {sorted(_DENSE, key=str)}, got {kernel_normalization!r}."
            )
        if solver_options is not None and not isinstance(solver_options, dict):
            raise ValueError(f"solver_options must be a dict or None, got {solver_options!r}.")
        self.units = units
        self.solver = solver
        self.max_iter = max_iter
        self.tol = tol
        self.stop_mode = stop_mode
        self.backward = backward
        self.backward_max_iter = backward_max_iter
        self.backward_tol = backward_tol
        self.backward_stop_mode = backward_stop_mode
        self.jacobian_weight = jacobian_weight
        self.jacobian_probes = jacobian_probes
        self.jacobian_frequency = jacobian_frequency
        self.num_groups = num_groups
        self.phantom_steps = phantom_steps
        self.phantom_damping = phantom_damping
        self.warmup_steps = warmup_steps
        self.warmup_depth = warmup_depth
        self.solver_options = dict(solver_options or {})
        if kernel_initializer is None:
            kernel_initializer = keras.initializers.RandomNormal(stddev=0.01)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.kernel_normalization = kernel_normalization
        self.seed = seed
        self.stats_metric = SolverStatsMetric(
            prefix="deq", name=f"{self.name}_solver_stats", layer=self, backward=backward == "implicit"
        )
        self._seed_generator = keras.random.SeedGenerator(seed) if jacobian_weight > 0 else None

    def build(self, input_shape):
        name = f"DEQFusion '{self.name}'"
        widths = modality_widths(name, input_shape)
        units = self.units
        if units is None:
            if len(set(widths)) != 1:
                raise ValueError(
                    f"{name}: the input widths {widths} differ, so units=None cannot "
                    "use a common width; pass units=... to project every input to it."
                )
            units = widths[0]
        if units % self.num_groups:
            raise ValueError(
                f"{name}: the state width {units} "
                f"({'units' if self.units else 'the common input width'}) must be "
                f"divisible by num_groups={self.num_groups}."
            )
        self._widths = widths
        self._state_units = units
        self.projections = [
            keras.layers.Dense(
                units,
                name=f"projection_{i}",
                dtype=self.dtype_policy,
            )
            if width != units
            else None
            for i, width in enumerate(widths)
        ]
        for width, projection in zip(widths, self.projections):
            if projection is not None:
                projection.build((None, width))
        block = dict(
            units=units,
            groups=self.num_groups,
            kernel_initializer=self.kernel_initializer,
            kernel_normalization=self.kernel_normalization,
            dtype=self.dtype_policy,
        )
        self.modality_blocks = [
            _ModalityBlock(name=f"modality_block_{i}", **block) for i in range(len(widths))
        ]
        self.fusion_block = _PurifyCombineBlock(name="fusion_block", **block)
        for layer in self.modality_blocks + [self.fusion_block]:
            layer.build((None, units))
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

    def _equilibrium_map(self, z, x):
        xs, x_fuse = x[:2]
        presence = x[2] if len(x) > 2 else None
        states = ops.split(z, len(xs) + 1, axis=-1)
        updated = [block(s, xi) for block, s, xi in zip(self.modality_blocks, states[:-1], xs)]
        if presence is not None:
            updated = [u * presence[:, i : i + 1] for i, u in enumerate(updated)]
        fused = self.fusion_block(states[-1], updated, x_fuse, presence)
        return ops.concatenate(updated + [fused], axis=-1)

    def _injections(self, inputs, modality_mask=None):
        """The solver's inputs ``(xs, x_fuse[, presence])`` and the start ``z0 = 0``."""
        inputs, presence = masked_inputs(f"DEQFusion '{self.name}'", inputs, modality_mask, inputs[0].dtype)
        xs = [x if p is None else p(x) for x, p in zip(inputs, self.projections)]
        weights = ops.cast(self.injection_weights, xs[0].dtype)
        if presence is not None:
            weights = weights * presence
        x_fuse = sum(weights[..., i : i + 1] * x for i, x in enumerate(xs)) + ops.cast(
            self.injection_bias, xs[0].dtype
        )
        width = self._state_units * (len(xs) + 1)
        z0 = ops.zeros((ops.shape(xs[0])[0], width), dtype=xs[0].dtype)
        x = (xs, x_fuse) if presence is None else (xs, x_fuse, presence)
        return x, z0

    def _solve_state(self, x, z0, jacobian_probes=None, jacobian_active=None, warmup=None):
        return fixed_point_solve(
            self._equilibrium_map,
            x,
            z0,
            solver=self.solver,
            max_iter=self.max_iter,
            tol=self.effective_tol,
            stop_mode=self.stop_mode,
            backward=self.backward,
            backward_max_iter=self.backward_max_iter,
            backward_tol=self.effective_backward_tol,
            backward_stop_mode=self.backward_stop_mode,
            backward_callback=self._record_backward,
            phantom_steps=self.phantom_steps,
            phantom_damping=self.phantom_damping,
            solver_options=self.solver_options,
            jacobian_probes=jacobian_probes,
            jacobian_active=jacobian_active,
            warmup=warmup,
            warmup_depth=self.warmup_depth,
        )

    @property
    def effective_tol(self):
        """The forward tolerance the solves use: ``tol``, raised under mixed precision to
        what the update's compute dtype resolves (see
        :func:`keras_mmfusion.equilibrium.iteration.resolvable_tol`); the layer warns
        once when it raises it."""
        tol = resolvable_tol(self.tol, self.stop_mode, self.compute_dtype)
        if tol != self.tol and not getattr(self, "_warned_tol", False):
            self._warned_tol = True
            warnings.warn(
                f"DEQFusion '{self.name}': tol={self.tol:g} is below what its {self.compute_dtype} update "
                f"resolves; its solves stop at a relative residual of {tol:.2g} instead.",
                stacklevel=2,
            )
        return tol

    @property
    def effective_backward_tol(self):
        """The adjoint solves' tolerance: ``backward_tol``, or ``tol`` when it is
        ``None``, raised under mixed precision as :attr:`effective_tol` is when
        ``backward_stop_mode`` is ``"rel"``."""
        tol = self.tol if self.backward_tol is None else self.backward_tol
        return resolvable_tol(tol, self.backward_stop_mode, self.compute_dtype)

    def _record_backward(self, stats):
        if recording_statistics():
            self.stats_metric.update_backward_state(stats)

    def solve(self, inputs, modality_mask=None):
        """The forward solve on ``inputs``: ``(z_fuse*, stats)``.

        ``stats`` is the full :class:`~keras_mmfusion.equilibrium.SolverStats`,
        including the per-step ``trace`` of the batch-mean residual (for plots).
        Statistics are not recorded into :attr:`last_stats`.
        """
        if not self.built:
            self.build([tuple(x.shape) for x in inputs])
        check_modalities(f"DEQFusion '{self.name}'", inputs, self._widths)
        x, z0 = self._injections([ops.convert_to_tensor(a) for a in inputs], modality_mask)
        z, stats = self._solve_state(x, z0)
        return z[:, -self._state_units :], stats

    def call(self, inputs, modality_mask=None, training=None):
        check_modalities(f"DEQFusion '{self.name}'", inputs, self._widths)
        x, z0 = self._injections(list(inputs), modality_mask)
        probes = active = None
        if training and self.jacobian_weight > 0:
            probes = keras.random.normal(
                (self.jacobian_probes,) + tuple(ops.shape(z0)), dtype=z0.dtype, seed=self._seed_generator
            )
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
            self.add_loss(ops.cast(self.jacobian_weight, penalty.dtype) * penalty)
        return z[:, -self._state_units :]

    @property
    def last_stats(self):
        """``{"steps", "residual", "converged"}`` of the last forward solve.

        ``steps`` counts evaluations of the update, ``residual`` is the largest
        per-sample residual in the batch and ``converged`` says whether every sample
        met ``tol``. With ``backward="implicit"``, ``backward_steps``,
        ``backward_residual`` and ``backward_converged`` say the same of the last
        adjoint solve (its residual in ``backward_stop_mode``, relative to each
        sample's upstream gradient by default). Values are zero before the first call
        (before the first gradient for the adjoint's).
        """
        return self.stats_metric.last()

    def compute_output_shape(self, input_shape):
        widths = modality_widths(f"DEQFusion '{self.name}'", input_shape)
        units = self.units if self.units is not None else widths[0]
        return (tuple(input_shape[0])[0], units)

    def get_config(self):
        config = super().get_config()
        config.update(
            units=self.units,
            solver=self.solver,
            max_iter=self.max_iter,
            tol=self.tol,
            stop_mode=self.stop_mode,
            backward=self.backward,
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
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            kernel_normalization=self.kernel_normalization,
            seed=self.seed,
        )
        return config
