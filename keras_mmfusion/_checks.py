"""The package's argument checks, in one place; each raises a ``ValueError`` naming the
argument and what it expected.

The checks of the modality tensors a fusion layer is called on live with the input
handling, in :mod:`keras_mmfusion.layers.modality_inputs`.
"""

import tensorflow as tf

from keras_mmfusion.defaults import BACKWARD_MODES, STOP_MODES


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(name, value, minimum=1):
    """``value`` must be an int (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def check_positive(name, value):
    """``value`` must be a number > 0."""
    if not (_is_number(value) and value > 0):
        raise ValueError(f"{name} must be a positive number, got {value!r}.")


def check_non_negative(name, value):
    """``value`` must be a number >= 0."""
    if not (_is_number(value) and value >= 0):
        raise ValueError(f"{name} must be a number >= 0, got {value!r}.")


def check_fraction(name, value):
    """``value`` must be a number in ``(0, 1]``."""
    if not (_is_number(value) and 0 < value <= 1):
        raise ValueError(f"{name} must be in (0, 1], got {value!r}.")


def check_choice(name, value, choices):
    """``value`` must be one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}.")


def check_units(units, allow_none=True):
    """``units`` must be a positive int (or ``None`` when ``allow_none``)."""
    if units is None and allow_none:
        return
    if isinstance(units, bool) or not isinstance(units, int) or units < 1:
        expected = "None or a positive integer" if allow_none else "a positive integer"
        raise ValueError(f"units must be {expected}, got {units!r}.")


def check_solver_arguments(max_iter, tol, stop_mode, prefix=""):
    """A solve's budget, tolerance and stopping rule; ``prefix`` (e.g. ``"backward_"``)
    names the arguments in the message. ``None`` is refused."""
    check_int(f"{prefix}max_iter", max_iter)
    check_positive(f"{prefix}tol", tol)
    check_choice(f"{prefix}stop_mode", stop_mode, STOP_MODES)


def check_optional_solver_arguments(max_iter, tol, stop_mode, prefix=""):
    """As :func:`check_solver_arguments`, with ``None`` ("as the forward solve") allowed."""
    if max_iter is not None:
        check_int(f"{prefix}max_iter", max_iter)
    if tol is not None and not (_is_number(tol) and tol > 0):
        raise ValueError(f"{prefix}tol must be None or a positive number, got {tol!r}.")
    if stop_mode is not None:
        check_choice(f"{prefix}stop_mode", stop_mode, STOP_MODES)


def check_backward(backward):
    """``backward`` must be one of the shorthand names of the adjoint objects."""
    check_choice("backward", backward, BACKWARD_MODES)


def check_phantom_arguments(steps, damping, prefix="phantom_"):
    """The phantom gradient's number of steps and damping in ``(0, 1]``."""
    check_int(f"{prefix}steps", steps)
    check_fraction(f"{prefix}damping", damping)


def check_warmup_arguments(warming_up, warmup_depth, unrolled):
    """The warm-up's depth; a warm-up cannot go with the unrolled adjoint."""
    check_int("warmup_depth", warmup_depth)
    if warming_up and unrolled:
        raise ValueError(
            "A warm-up (warmup_steps > 0) needs backward='implicit' or 'phantom': "
            "backward='unrolled' already trains the weight-tied network by autodiff."
        )


def check_state(z0):
    """``z0`` as a ``(batch, dim)`` floating tensor with a static ``dim``."""
    z0 = tf.convert_to_tensor(z0)
    if z0.shape.rank != 2 or z0.shape[-1] is None:
        raise ValueError(
            "The solver state must have shape (batch, dim) with a known dim; "
            f"got a tensor of shape {z0.shape}."
        )
    if not z0.dtype.is_floating:
        raise ValueError(f"The solver state must be floating point, got dtype {z0.dtype.name}.")
    return z0


def check_probes(probes, z):
    """``probes`` as a ``(num_probes, batch, dim)`` tensor in ``z``'s dtype."""
    probes = tf.cast(tf.convert_to_tensor(probes), z.dtype)
    if probes.shape.rank != 3 or probes.shape[0] is None:
        raise ValueError(f"probes must have shape (num_probes, batch, dim), got {probes.shape}.")
    return probes
