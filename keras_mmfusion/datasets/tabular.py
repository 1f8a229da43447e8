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


def _parse_csv(path):
    rows = []
    with open(path, newline="") as handle:
        for row_number, row in enumerate(csv.reader(handle), start=1):
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
                    raise DataError(
                        f"{path}: row {row_number}, column {column}: cannot read {cell!r} as a number."
                    ) from None
            if rows and len(values) != len(rows[0]):
                raise DataError(
                    f"{path}: row {row_number} has {len(values)} values but row 1 has {len(rows[0])}."
                )
            rows.append(values)
    if not rows:
        raise DataError(f"{path}: the file holds no rows.")
    return np.asarray(rows, dtype=np.float64)


def read_matrix(path):
    """Read a ``(rows, features)`` float32 matrix from a headerless CSV or an NPY file.

    Raises:
        DataError: the file is missing, a cell is not a number, rows differ in length,
            or a value is NaN or infinite; the message names the file, row and column.
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
        values = _parse_csv(path)
    bad = np.argwhere(~np.isfinite(values))
    if bad.size:
        row, column = bad[0]
        raise DataError(
            f"{path}: row {row + 1}, column {column + 1} is {values[row, column]}; "
            f"NaN and infinite values are not allowed ({len(bad)} such cells)."
        )
    return values.astype(np.float32)


def read_labels(path, num_classes=None):
    """Read integer class labels, one per row, from a CSV or NPY file.

    Args:
        path: the labels file.
        num_classes: if given, every label must be in ``[0, num_classes)``.

    Returns:
        An int32 array ``(rows,)``.
    """
    values = read_matrix(path)
    if values.shape[1] != 1:
        raise DataError(f"{path}: expected one label per row, got {values.shape[1]} columns.")
    values = values[:, 0]
    fractional = np.nonzero(values != np.round(values))[0]
    if fractional.size:
        row = fractional[0]
        raise DataError(f"{path}: row {row + 1}: label {values[row]} is not an integer class index.")
    labels = values.astype(np.int32)
    limit = num_classes if num_classes is not None else np.inf
    outside = np.nonzero((labels < 0) | (labels >= limit))[0]
    if outside.size:
        row = outside[0]
        declared = f"0..{num_classes - 1}" if num_classes is not None else "a non-negative index"
        raise DataError(f"{path}: row {row + 1}: label {labels[row]} is outside the declared classes {declared}.")
    return labels


def load_modalities(modality_files, labels_file, num_classes=None):
    """Read one matrix per modality and the labels, and check that their rows align.

    Args:
        modality_files: one CSV or NPY path per modality; row ``r`` of every file is
            the same sample.
        labels_file: the labels, one integer class per row.
        num_classes: the declared number of classes, checked if given.

    Returns:
        ``(inputs, labels)``: a list of float32 arrays ``(n, d_i)`` and int32 labels.

    Raises:
        DataError: naming the file (and row) at fault.
    """
    if not modality_files:
        raise DataError("No modality files were given.")
    inputs = [read_matrix(p) for p in modality_files]
    labels = read_labels(labels_file, num_classes)
    for path, x in zip(modality_files, inputs):
        if len(x) != len(labels):
            raise DataError(
                f"{os.fspath(path)} has {len(x)} rows but the labels file {os.fspath(labels_file)} "
                f"has {len(labels)}; every modality needs one row per sample, in the same order."
            )
    return inputs, labels
