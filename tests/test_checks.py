"""The shared argument checks: what each accepts, and that each error names the argument."""

import pytest

from keras_mmfusion._checks import check_fraction, check_int, check_non_negative, check_positive

CASES = [
    (check_int, [1, 7], [0, -1, 1.0, True, "3", None], "an integer >= 1"),
    (check_positive, [1e-9, 2, 0.5], [0, -1.0, True, "1", None], "a positive number"),
    (check_non_negative, [0, 0.0, 3.5], [-1e-9, True, "0", None], "a number >= 0"),
    (check_fraction, [1, 1.0, 0.25], [0, 1.5, -0.1, True, None], r"in \(0, 1\]"),
]


@pytest.mark.parametrize("check, good, bad, expected", CASES)
def test_checks_accept_what_they_document_and_name_the_argument(check, good, bad, expected):
    for value in good:
        check("the_argument", value)
    for value in bad:
        with pytest.raises(ValueError, match=rf"^the_argument must be {expected}, got {value!r:.4}"):
            check("the_argument", value)
