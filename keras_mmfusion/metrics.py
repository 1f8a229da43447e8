"""Solver statistics as a Keras metric, so that they reach ``model.fit`` logs."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_mmfusion")
class SolverStatsMetric(keras.metrics.Metric):
    """Running means of an equilibrium layer's solver statistics, and the last values.

    ``result()`` is ``{"<prefix>_steps": ..., "<prefix>_residual": ...}``: the mean over
    the calls since the last reset of the forward solver's steps and of the batch's
    largest per-sample residual. Keras merges a dict result into the training logs.
    The values of the most recent call are kept across resets and read with
    :meth:`last`.

    Args:
        prefix: the prefix of the logged names.
        name: the metric's name.
    """

    def __init__(self, prefix="deq", name=None, dtype="float32"):
        super().__init__(name=name or f"{prefix}_solver_stats", dtype=dtype)
        self.prefix = prefix
        self._steps_sum = self._scalar("steps_sum")
        self._residual_sum = self._scalar("residual_sum")
        self._count = self._scalar("count")
        self._last_steps = self._scalar("last_steps")
        self._last_residual = self._scalar("last_residual")
        self._last_converged = self._scalar("last_converged")

    def _scalar(self, name):
        return self.add_variable(shape=(), initializer="zeros", name=name, dtype=self.dtype)

    def update_state(self, stats):
        """Record one solve; ``stats`` is a ``SolverStats``."""
        steps = ops.cast(stats.steps, self.dtype)
        residual = ops.cast(ops.max(stats.residual), self.dtype)
        converged = ops.cast(ops.all(stats.converged), self.dtype)
        self._steps_sum.assign_add(steps)
        self._residual_sum.assign_add(residual)
        self._count.assign_add(ops.ones((), self.dtype))
        self._last_steps.assign(steps)
        self._last_residual.assign(residual)
        self._last_converged.assign(converged)

    def result(self):
        return {
            f"{self.prefix}_steps": ops.divide_no_nan(self._steps_sum, self._count),
            f"{self.prefix}_residual": ops.divide_no_nan(self._residual_sum, self._count),
        }

    def reset_state(self):
        for variable in (self._steps_sum, self._residual_sum, self._count):
            variable.assign(ops.zeros((), self.dtype))

    def last(self):
        """``{"steps", "residual", "converged"}`` of the most recent call."""
        return {
            "steps": ops.cast(self._last_steps, "int32"),
            "residual": ops.convert_to_tensor(self._last_residual),
            "converged": ops.cast(self._last_converged, "bool"),
        }

    def get_config(self):
        return {"prefix": self.prefix, "name": self.name, "dtype": self.dtype}
