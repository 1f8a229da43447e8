"""Adam as PyTorch's: coupled weight decay added after clipping, and its epsilon's placement."""

import keras
from keras import ops

from keras_mmfusion._checks import check_non_negative


@keras.saving.register_keras_serializable(package="keras_mmfusion")
class CoupledDecayAdam(keras.optimizers.Adam):
    """Adam whose weight decay is an L2 term added to the gradient, as in PyTorch's
    ``torch.optim.Adam(weight_decay=...)``.

    Every step, after the gradients are clipped (``clipnorm``, ``global_clipnorm`` or
    ``clipvalue``), ``coupled_weight_decay * w`` is added to each variable's gradient,
    and Adam's moments see the sum. So the decay is outside the clip, as when a PyTorch
    training loop calls ``clip_grad_norm_`` before ``optimizer.step()``, and it covers
    every trainable variable (kernels, biases, normalisation scales). Keras's own
    ``weight_decay`` is decoupled instead (AdamW's ``w -= lr * decay * w``); the two can
    be combined, though one is the usual choice.

    Keras's Adam adds ``epsilon`` to ``sqrt(v)`` before the bias correction, so at step
    ``t`` it acts as PyTorch's epsilon times ``1 / sqrt(1 - beta_2^t)`` (31.6 times at the
    first step, 2.3 times at the 200th); it also computes the bias correction with the
    betas rounded to float32, a relative 6e-6 on float64 steps. With
    ``torch_epsilon=True`` the step is PyTorch's Adam in the variable's dtype:
    ``w -= lr * m_hat / (sqrt(v_hat) + epsilon)`` with the bias-corrected moments. The
    epsilon then decides the first steps of variables whose gradients are small.

    Args:
        coupled_weight_decay: the L2 coefficient, at least 0.
        torch_epsilon: take PyTorch's Adam step (no ``amsgrad``).
        **kwargs: ``keras.optimizers.Adam`` arguments.
    """

    def __init__(self, learning_rate=0.001, coupled_weight_decay=0.0, torch_epsilon=False, **kwargs):
        super().__init__(learning_rate=learning_rate, **kwargs)
        check_non_negative("coupled_weight_decay", coupled_weight_decay)
        if torch_epsilon and self.amsgrad:
            raise ValueError("CoupledDecayAdam: torch_epsilon takes PyTorch's Adam step, which has no amsgrad here.")
        self.coupled_weight_decay = coupled_weight_decay
        self.torch_epsilon = bool(torch_epsilon)

    def update_step(self, gradient, variable, learning_rate):
        # Called per variable after apply() has clipped the gradients.
        if self.coupled_weight_decay:
            gradient = gradient + ops.cast(self.coupled_weight_decay, variable.dtype) * variable
        if not self.torch_epsilon:
            super().update_step(gradient, variable, learning_rate)
            return
        dtype = variable.dtype

        def constant(value):
            # Python floats straight into the variable's dtype (a cast would pass float32).
            return ops.convert_to_tensor(value, dtype=dtype)

        beta_1, beta_2 = constant(self.beta_1), constant(self.beta_2)
        step = ops.cast(self.iterations + 1, dtype)
        gradient = ops.cast(gradient, dtype)
        m = self._momentums[self._get_variable_index(variable)]
        v = self._velocities[self._get_variable_index(variable)]
        self.assign(m, beta_1 * m + (1 - beta_1) * gradient)
        self.assign(v, beta_2 * v + (1 - beta_2) * ops.square(gradient))
        m_hat = m / (1 - ops.power(beta_1, step))
        v_hat = v / (1 - ops.power(beta_2, step))
        self.assign_sub(variable, ops.cast(learning_rate, dtype) * m_hat / (ops.sqrt(v_hat) + constant(self.epsilon)))

    def get_config(self):
        return {**super().get_config(), "coupled_weight_decay": self.coupled_weight_decay,
                "torch_epsilon": self.torch_epsilon}
