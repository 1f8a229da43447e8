"""Jacobian regularisation of an equilibrium map (Bai et al., "Stabilizing Equilibrium
Models by Jacobian Regularization", 2021)."""

import tensorflow as tf

from keras_mmfusion.validation import check_int


@tf.autograph.experimental.do_not_convert
def hutchinson_jacobian_norm(f, z, num_probes=1, probes=None):
    """Hutchinson estimate of ``||J_f(z)||_F^2`` divided by the state size.

    For a probe ``e ~ N(0, I)``, ``E ||e^T J||^2 = ||J||_F^2``. The estimate averages
    ``||e^T J_b||^2 / dim`` over probes and samples ``b``. It is differentiable with
    respect to the variables ``f`` reads (the products are recorded by any outer
    tape), so it can be added to a training loss.

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
    if probes is None:
        check_int("num_probes", num_probes)
        probes = tf.random.normal(tf.concat([[num_probes], tf.shape(z)], 0), dtype=z.dtype)
    else:
        probes = tf.cast(tf.convert_to_tensor(probes), z.dtype)
        num_probes = probes.shape[0]
        if probes.shape.rank != 3 or num_probes is None:
            raise ValueError(
                f"probes must have shape (num_probes, batch, dim), got {probes.shape}."
            )
    with tf.GradientTape(persistent=num_probes > 1, watch_accessed_variables=False) as tape:
        tape.watch(z)
        fz = f(z)
    total = tf.zeros([], z.dtype)
    for i in range(num_probes):
        vjp = tape.gradient(fz, z, output_gradients=tf.cast(probes[i], fz.dtype))
        total += tf.reduce_sum(tf.square(tf.cast(vjp, z.dtype)))
    size = tf.cast(tf.size(z), z.dtype)
    return total / (num_probes * size)
