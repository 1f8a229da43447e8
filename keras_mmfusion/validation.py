"""Argument checks shared across the package; each raises a ValueError naming the argument."""


def check_int(name, value, minimum=1):
    """``value`` must be an int (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
