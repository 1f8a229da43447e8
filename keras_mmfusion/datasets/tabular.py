"""Reading one matrix per modality (CSV or NPY) plus a labels file, with validation.

Every check names the file and, where it applies, the row and column (1-based, as a
text editor shows them), so that a bad file is never read into a silently
mis-aligned dataset.
"""

import csv
import os

import numpy as np


class DataError(ValueError):
    """A data file is missing, malformed or inconsistent with the others."""


# Standardisation squares every value: beyond this magnitude the square overflows float32.
LARGEST_VALUE = float(np.sqrt(np.finfo(np.float32).max))


def _parse_row(path, row_number, row):
    """The numbers of one CSV row, or the first cell that is not a number (``(values, bad)``)."""
    cells = [c.strip() for c in row]
    # A trailing delimiter gives one empty last cell; it is not a value.
    if cells and cells[-1] == "":
        cells = cells[:-1]
    if not cells:
        raise DataError(f"{path}: row {row_number} is empty.")
    values = []
    for column, cell in enumerate(cells, start=1):
        try:
            values.append(float(cell))
        except ValueError:
            return values, (column, cell)
    return values, None


def _looks_like_column_numbers(values):
    """Whether a row is 0, 1, ..., n-1 or 1, 2, ..., n (n >= 3): column numbers, not data."""
    n = len(values)
    return n >= 3 and (values == list(range(n)) or values == list(range(1, n + 1)))


def _parse_csv(path, header):
    rows = []
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        if header and next(reader, None) is None:
            raise DataError(f"{path}: the file holds no rows, not even the header.")
        for row_number, row in enumerate(reader, start=2 if header else 1):
            values, bad = _parse_row(path, row_number, row)
            if bad is not None:
                column, cell = bad
                hint = " It looks like a header: pass header=True (mmfusion: --header) to skip it." if (
                    row_number == 1) else ""
                raise DataError(f"{path}: row {row_number}, column {column}: cannot read {cell!r} as a number.{hint}")
            if rows and len(values) != len(rows[0]):
                raise DataError(
                    f"{path}: row {row_number} has {len(values)} values but row {row_number - len(rows)} "
                    f"has {len(rows[0])}."
                )
            rows.append(values)
    if not rows:
        raise DataError(f"{path}: the file holds no rows{' after its header' if header else ''}.")
    # Column numbers above data that are not all whole numbers: a header, not a sample.
    if not header and len(rows) > 1 and _looks_like_column_numbers(rows[0]) and any(
        v != int(v) for row in rows[1:] for v in row
    ):
        raise DataError(
            f"{path}: row 1 is {rows[0][0]:g}, {rows[0][1]:g}, ..., {rows[0][-1]:g}, which looks like a header of "
            "column numbers rather than a sample; pass header=True (mmfusion: --header) to skip it."
        )
    return np.asarray(rows, dtype=np.float64)


def _first_data_row(path, header):
    """The file's row number of the first sample: 2 after a CSV header, else 1 (for messages)."""
    return 2 if header and not os.fspath(path).endswith(".npy") else 1


def read_matrix(path, header=False):
    """Read a ``(rows, features)`` float32 matrix from a CSV or an NPY file.

    Args:
        path: the file.
        header: whether a CSV file's first row is a header to skip (NPY files have none).
            Without it, a first row with a cell that is not a number, or that holds
            the column numbers (``0, 1, 2, ...`` or ``1, 2, 3, ...``) above data that
            are not all whole numbers, is refused as a header rather than read as a
            sample.

    Raises:
        DataError: the file is missing, a cell is not a number, rows differ in length,
            a headerless file's first row looks like a header, or a value is NaN,
            infinite or so large that its square overflows float32; the message names
            the file, row and column (rows counted as in the file, header included).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found.")
    if path.endswith(".npy"):
        values = np.load(path, allow_pickle=False)
        if not np.issubdtype(values.dtype, np.number):
            raise DataError(f"{path}: expected a numeric array, got dtype {values.dtype}.")
        values = values.reshape(len(values), -1) if values.ndim == 1 else values
        if values.ndim != 2:
            raise DataError(f"{path}: expected a 2-D array, got shape {values.shape}.")
    else:
        values = _parse_csv(path, header)
    return check_values(values, path, first_row=_first_data_row(path, header))


def check_values(values, where, row_word="row", column_word="column", first_row=1):
    """``values`` as float32, after refusing NaN, infinite values and values whose square
    overflows float32 (the standardisation squares them).

    Args:
        values: a 2-D array.
        where: what the message names first (a file, or a file and a variable).
        row_word, column_word: how the message names an axis (``"row"``, ``"sample"``).
        first_row: the number of the first row as the user counts it.

    Raises:
        DataError: naming ``where``, the row and the column of the first bad cell.
    """
    bad = np.argwhere(~np.isfinite(values))
    if bad.size:
        row, column = bad[0]
        raise DataError(
            f"{where}: {row_word} {row + first_row}, {column_word} {column + 1} is {values[row, column]}; "
            f"NaN and infinite values are not allowed ({len(bad)} such cells)."
        )
    huge = np.argwhere(np.abs(values) > LARGEST_VALUE)
    if huge.size:
        row, column = huge[0]
        raise DataError(
            f"{where}: {row_word} {row + first_row}, {column_word} {column + 1} is {values[row, column]:g}; values "
            f"beyond {LARGEST_VALUE:.3g} in magnitude overflow float32 when squared by the standardisation "
            f"({len(huge)} such cells)."
        )
    return values.astype(np.float32)


def read_labels(path, num_classes=None, header=False):
    """Read integer class labels, one per row, from a CSV or NPY file.

    Args:
        path: the labels file.
        num_classes: if given, every label must be in ``[0, num_classes)``.
        header: whether a CSV file's first row is a header to skip.

    Returns:
        An int32 array ``(rows,)``.
    """
    values = read_matrix(path, header)
    first_row = _first_data_row(path, header)
    if values.shape[1] != 1:
        raise DataError(f"{path}: expected one label per row, got {values.shape[1]} columns.")
    values = values[:, 0]
    fractional = np.nonzero(values != np.round(values))[0]
    if fractional.size:
        row = fractional[0]
        raise DataError(f"{path}: row {row + first_row}: label {values[row]} is not an integer class index.")
    labels = values.astype(np.int32)
    limit = num_classes if num_classes is not None else np.inf
    outside = np.nonzero((labels < 0) | (labels >= limit))[0]
    if outside.size:
        row = outside[0]
        declared = f"0..{num_classes - 1}" if num_classes is not None else "a non-negative index"
        raise DataError(
            f"{path}: row {row + first_row}: label {labels[row]} is outside the declared classes {declared}."
        )
    return labels


def load_modalities(modality_files, labels_file, num_classes=None, header=False):
    """Read one matrix per modality and the labels, and check that their rows align.

    Args:
        modality_files: one CSV or NPY path per modality; row ``r`` of every file is
            the same sample.
        labels_file: the labels, one integer class per row.
        num_classes: the declared number of classes, checked if given.
        header: whether every CSV file's first row is a header to skip.

    Returns:
        ``(inputs, labels)``: a list of float32 arrays ``(n, d_i)`` and int32 labels.

    Raises:
        DataError: naming the file (and row) at fault.
    """
    if not modality_files:
        raise DataError("No modality files were given.")
    inputs = [read_matrix(p, header) for p in modality_files]
    labels = read_labels(labels_file, num_classes, header)
    for path, x in zip(modality_files, inputs):
        if len(x) != len(labels):
            raise DataError(
                f"{os.fspath(path)} has {len(x)} rows but the labels file {os.fspath(labels_file)} "
                f"has {len(labels)}; every modality needs one row per sample, in the same order."
            )
    return inputs, labels


def check_splits(train, test, names=("train", "test"), modality_names=None):
    """Check before training that two splits describe the same problem.

    Args:
        train, test: ``(inputs, labels)`` pairs.
        names: how the messages name the two splits' labels (e.g. the labels files).
        modality_names: optional ``(train name, test name)`` of each modality (e.g. its
            two files), for the message about a modality whose widths differ; by
            default ``names``.

    Returns:
        The number of classes.

    Raises:
        DataError: the splits have different numbers of modalities or widths, the class
            labels have a gap (e.g. {0, 2}), or a class appears in only one split; the
            message gives the class counts per split.
    """
    if len(train[0]) != len(test[0]):
        raise DataError(f"{names[0]} has {len(train[0])} modalities but {names[1]} has {len(test[0])}.")
    for i, (a, b) in enumerate(zip(train[0], test[0])):
        if a.shape[1] != b.shape[1]:
            train_name, test_name = names if modality_names is None else modality_names[i]
            raise DataError(f"modality {i}: {train_name} has {a.shape[1]} features but {test_name} has {b.shape[1]}.")
    return check_classes([train[1], test[1]], names)


def check_classes(label_sets, names):
    """The number of classes, after checking that every class ``0..k-1`` occurs in every label set."""
    classes = np.unique(np.concatenate(label_sets))
    counts = "; ".join(
        f"{name}: " + ", ".join(f"class {c}: {int(np.sum(labels == c))}" for c in classes)
        for name, labels in zip(names, label_sets)
    )
    if not np.array_equal(classes, np.arange(len(classes))):
        missing = sorted(set(range(int(classes.max()) + 1)) - set(classes.tolist()))
        raise DataError(f"class labels must be 0..k-1 without gaps; no sample has label {missing} ({counts}).")
    for name, labels in zip(names, label_sets):
        absent = [int(c) for c in classes if not np.any(labels == c)]
        if absent:
            raise DataError(f"class {absent} does not occur in {name} ({counts}).")
    return len(classes)
