"""Jacobian regularisation of an equilibrium map (Bai et al., "Stabilizing Equilibrium
Models by Jacobian Regularization", 2021)."""

import tensorflow as tf

from keras_mmfusion._checks import check_int, check_probes
from keras_mmfusion._internals import in_xla_context


def gaussian_probes(z, num_probes, seed=None):
    """``(num_probes, batch, dim)`` standard-normal probes shaped like ``z``.

    With ``seed``, a ``(2,)`` integer tensor (e.g. from ``keras.random.SeedGenerator.next``),
    the draw is stateless and names the Philox algorithm: TensorFlow's automatic choice
    gives the same numbers, but XLA's CPU backend generates them many times more slowly,
    and the probes are as large as the solver state.
    """
    check_int("num_probes", num_probes)
    shape = tf.concat([[num_probes], tf.shape(z)], 0)
    if seed is None:
        return tf.random.normal(shape, dtype=z.dtype)
    return tf.random.stateless_normal(shape, seed=tf.cast(seed, tf.int64), dtype=z.dtype, alg="philox")


def jacobian_norm_from_vjp(vjp, z, probes):
    """The Hutchinson estimate ``mean_k ||e_k^T J||^2 / size(z)`` from a VJP function.

    ``vjp(e)`` returns ``e^T J`` for a ``(batch, dim)`` probe ``e``. The products are
    recorded by any active tape, so the estimate is differentiable wherever ``vjp`` is.
    """
    total = tf.zeros([], z.dtype)
    for i in range(probes.shape[0]):
        total += tf.reduce_sum(tf.square(tf.cast(vjp(probes[i]), z.dtype)))
    return total / (probes.shape[0] * tf.cast(tf.size(z), z.dtype))


@tf.autograph.experimental.do_not_convert
def hutchinson_jacobian_norm(f, z, num_probes=1, probes=None):
    """Hutchinson estimate of ``||J_f(z)||_F^2`` divided by the state size.

    For a probe ``e ~ N(0, I)``, ``E ||e^T J||^2 = ||J||_F^2``. The estimate averages
    ``||e^T J_b||^2 / dim`` over probes and samples ``b``. It is differentiable with
    respect to the variables ``f`` reads (the products are recorded by any outer
    tape), so it can be added to a training loss. Its gradient involves second
    derivatives of ``f``; every op in ``f`` must differentiate exactly to second order
    (see :class:`keras_mmfusion.layers.normalization.ExactGroupNormalization`).

    Args:
        f: maps a ``(batch, dim)`` tensor to one of the same shape.
        z: the point, ``(batch, dim)``; pass ``tf.stop_gradient(z*)`` for an equilibrium.
        num_probes: the number of Gaussian probes when ``probes`` is not given.
        probes: optional ``(num_probes, batch, dim)`` probes, e.g. from a seeded
            generator.

    Returns:
        A scalar in ``z``'s dtype.
    """
    z = tf.convert_to_tensor(z)
    probes = gaussian_probes(z, num_probes) if probes is None else check_probes(probes, z)
    with tf.GradientTape(persistent=probes.shape[0] > 1, watch_accessed_variables=False) as tape:
        tape.watch(z)
        fz = f(z)
    return jacobian_norm_from_vjp(
        lambda e: tape.gradient(fz, z, output_gradients=tf.cast(e, fz.dtype)), z, probes
    )


class JacobianPenalty:
    """The Hutchinson estimate of ``||J_f(z*)||_F^2 / dim`` that a solve reports as
    ``stats.jacobian``, for a training loss (Bai et al., 2021).

    Args:
        probes: ``(num_probes, batch, dim)`` probes, checked by the caller.
        active: ``None``, or a boolean scalar tensor; where it is false the estimate
            is 0 and its vector-Jacobian products are not computed (under XLA they are
            computed and the estimate multiplied by 0: XLA's CPU runtime aborts on the
            gradient of a ``tf.cond`` whose branch takes these products).
    """

    def __init__(self, probes, active=None):
        self.probes, self.active = probes, active

    def from_vjp(self, vjp, z):
        """The estimate at ``z`` from ``vjp(e) = e^T J``."""
        return self._when_active(lambda: jacobian_norm_from_vjp(vjp, z, self.probes), z)

    def at(self, fn, z):
        """The estimate at ``z`` from an evaluation of ``fn`` there, off ``z``'s gradient."""
        return self._when_active(lambda: hutchinson_jacobian_norm(fn, tf.stop_gradient(z), probes=self.probes), z)

    def _when_active(self, penalty, z):
        if self.active is None:
            return penalty()
        active = tf.convert_to_tensor(self.active)
        if in_xla_context():
            return penalty() * tf.cast(active, z.dtype)
        return tf.cond(active, penalty, lambda: tf.zeros([], z.dtype))
