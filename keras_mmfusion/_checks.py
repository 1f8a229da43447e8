"""Argument checks shared across the package; each raises a ValueError naming the argument."""


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
