"""Multi-view datasets in MATLAB ``.mat`` files.

The public multi-view classification benchmarks (handwritten digits, faces, scenes,
birds, as the trusted multi-view classification line of work uses them) ship as one
``.mat`` file each: a cell array of views under ``X`` (or ``data``, ``views``, ``fea``),
each ``samples x features`` or transposed, and the labels under ``gt``, ``Y``, ``y``,
``truth``, ``gnd``, ``label`` or ``labels``, often numbered from 1.

MATLAB v5 files are read with ``scipy.io.loadmat`` and v7.3 (HDF5) files with ``h5py``;
both come with ``pip install keras_mmfusion[mat]``.
"""

import contextlib
import os

import numpy as np

from keras_mmfusion.datasets.tabular import DataError, check_values

VIEW_KEYS = ("X", "data", "views", "fea")
LABEL_KEYS = ("gt", "Y", "y", "truth", "gnd", "label", "labels")
# A sparse view (a bag of words, say) is made dense only up to this many bytes of float32.
MAX_DENSE_BYTES = 2**30
EXTRA = "pip install 'keras_mmfusion[mat]'"


def load_mat(path, label_base=None, max_dense_bytes=MAX_DENSE_BYTES, verbose=1):
    """Read the views and labels of a multi-view ``.mat`` file.

    The views are found under the first of ``VIEW_KEYS`` the file holds, as a cell array
    of matrices; the labels under the first of ``LABEL_KEYS``. Other variables (a cell
    array of view names, a struct) are not read. Each view's orientation is taken from
    the number of labels: the axis of that length is the samples' axis. A view with both
    axes of that length, or neither, is refused.

    Args:
        path: a MATLAB v5 or v7.3 ``.mat`` file.
        label_base: ``None``, 0 or 1. Labels are class indices from 0. With ``1`` they
            are shifted down by one (files numbered ``1..k``). With ``None``, labels that
            are exactly ``1..k`` are refused with a message naming this argument: they
            are never shifted silently.
        max_dense_bytes: the largest float32 size to which a sparse view is made dense;
            a larger one is refused with its size.
        verbose: 1 prints one line on what it read (views, widths, samples, classes).

    Returns:
        ``(inputs, labels)``: one float32 ``(samples, features)`` array per view, in the
        cell array's order, and int32 labels from 0.

    Raises:
        DataError: naming the file and what is wrong with it.
    """
    path = os.fspath(path)
    if label_base not in (None, 0, 1):
        raise ValueError(f"label_base must be None, 0 or 1, got {label_base!r}.")
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found.")
    with _open(path, max_dense_bytes) as (names, read):
        views_key = next((k for k in VIEW_KEYS if k in names), None)
        labels_key = next((k for k in LABEL_KEYS if k in names), None)
        if views_key is None or labels_key is None:
            missing = "views (a cell array named " + " or ".join(VIEW_KEYS) + ")" if views_key is None else (
                "labels (named " + ", ".join(LABEL_KEYS) + ")")
            raise DataError(f"{path}: no {missing} found; the file holds {', '.join(names) or 'no variables'}.")
        labels = _labels(path, labels_key, read(labels_key), label_base)
        views = read(views_key)
    if not isinstance(views, list):
        raise DataError(f"{path}: '{views_key}' must be a cell array of views, got one {np.shape(views)} matrix.")
    if len(views) < 2:
        raise DataError(f"{path}: '{views_key}' holds {len(views)} view; fusion needs at least 2.")
    inputs = [_oriented(path, f"{views_key}{{{i + 1}}}", view, len(labels)) for i, view in enumerate(views)]
    if verbose:
        print(f"{path}: {len(inputs)} views from '{views_key}' of widths {[x.shape[1] for x in inputs]}, "
              f"{len(labels)} samples, {len(np.unique(labels))} classes from '{labels_key}'"
              + (" (shifted from 1..k)" if label_base == 1 else ""))
    return inputs, labels


@contextlib.contextmanager
def _open(path, max_dense_bytes):
    """Yields ``(names, read)``: the file's variable names, sorted, and ``read(name)``,
    which converts that one variable: a cell array to a list of matrices, any other
    variable to a 2-D float64 array (a sparse one made dense). Only the variables asked
    for are converted, so others (a cell array of view names, a struct) play no part."""
    try:
        import scipy.io
    except ImportError:
        raise DataError(f"{path}: reading .mat files needs scipy: {EXTRA}") from None
    try:
        raw = scipy.io.loadmat(path)
    except NotImplementedError:  # MATLAB v7.3, an HDF5 file
        raw = None
    except (ValueError, TypeError, OSError) as error:
        if not _is_hdf5(path):  # else an HDF5 file without MATLAB's header
            raise DataError(f"{path}: not a readable MATLAB file ({error}).") from None
        raw = None
    if raw is not None:
        yield sorted(k for k in raw if not k.startswith("__")), lambda name: _v5_variable(
            path, name, raw[name], max_dense_bytes)
        return
    try:
        import h5py
    except ImportError:
        raise DataError(f"{path}: reading MATLAB v7.3 files needs h5py: {EXTRA}") from None
    with h5py.File(path, "r") as handle:
        # '#refs#' and '#subsystem#' are MATLAB's stores of referenced cells, not variables.
        yield sorted(k for k in handle if not k.startswith("#")), lambda name: _hdf5_variable(
            path, name, handle[name], max_dense_bytes)


def _v5_variable(path, name, value, max_dense_bytes):
    if isinstance(value, np.ndarray) and value.dtype == object:
        return [_dense(path, f"{name}{{{i + 1}}}", cell, max_dense_bytes) for i, cell in enumerate(value.ravel())]
    return _dense(path, name, value, max_dense_bytes)


def _dense(path, name, value, max_dense_bytes):
    """``value`` as a 2-D float64 array; a sparse matrix only below ``max_dense_bytes``."""
    if hasattr(value, "toarray"):
        size = int(np.prod(value.shape)) * 4
        if size > max_dense_bytes:
            raise DataError(f"{path}: {name} is a sparse {value.shape[0]} x {value.shape[1]} matrix, "
                            f"{size / 2**20:.0f} MiB as dense float32, above the {max_dense_bytes / 2**20:.0f} MiB "
                            "limit (max_dense_bytes).")
        value = value.toarray()
    value = np.asarray(value)
    if value.dtype == object or not np.issubdtype(value.dtype, np.number) and value.dtype != bool:
        raise DataError(f"{path}: {name} is not a numeric matrix (dtype {value.dtype}).")
    return np.atleast_2d(value).astype(np.float64)


def _is_hdf5(path):
    """Whether the file holds HDF5's signature where HDF5 looks for it (offset 0 or 512)."""
    with open(path, "rb") as handle:
        head = handle.read(520)
    return any(head[offset : offset + 8] == b"\x89HDF\r\n\x1a\n" for offset in (0, 512))


def _hdf5_variable(path, name, item, max_dense_bytes):
    import h5py

    if isinstance(item, h5py.Dataset) and item.dtype == h5py.ref_dtype:
        return [_hdf5_matrix(path, f"{name}{{{i + 1}}}", item.file[ref], max_dense_bytes)
                for i, ref in enumerate(item[()].ravel())]
    return _hdf5_matrix(path, name, item, max_dense_bytes)


def _hdf5_matrix(path, name, item, max_dense_bytes):
    """A v7.3 variable as a 2-D array. MATLAB writes column-major, so an ``n x d`` matrix
    is stored ``d x n``; the orientation is decided from the label count afterwards."""
    import h5py

    if isinstance(item, h5py.Group):
        if item.attrs.get("MATLAB_sparse") is None:
            raise DataError(f"{path}: {name} is a MATLAB {item.attrs.get('MATLAB_class', b'struct').decode()}, "
                            "not a matrix.")
        import scipy.sparse

        rows = int(item.attrs["MATLAB_sparse"])
        data = item["data"][()] if "data" in item else np.ones(len(item["ir"]))
        columns = item["jc"].shape[0] - 1
        matrix = scipy.sparse.csc_matrix((data, item["ir"][()], item["jc"][()]), shape=(rows, columns))
        # Stored as MATLAB's (rows x columns); transposed like the dense matrices.
        return _dense(path, name, matrix.T, max_dense_bytes)
    return _dense(path, name, item[()], max_dense_bytes)


def _labels(path, key, values, label_base):
    if isinstance(values, list):
        raise DataError(f"{path}: labels '{key}' must be a vector, got a cell array of {len(values)}.")
    if values.size != max(values.shape):
        raise DataError(f"{path}: labels '{key}' must be a vector, got a {values.shape[0]} x {values.shape[1]} matrix.")
    values = values.ravel()
    fractional = np.nonzero(values != np.round(values))[0]
    if fractional.size:
        raise DataError(f"{path}: label {fractional[0] + 1} of '{key}' is {values[fractional[0]]:g}, "
                        "not an integer class index.")
    labels = values.astype(np.int64)
    classes = np.unique(labels)
    if label_base == 1:
        labels = labels - 1
    elif label_base is None and classes[0] == 1 and np.array_equal(classes, np.arange(1, len(classes) + 1)):
        raise DataError(f"{path}: the labels in '{key}' are 1..{len(classes)}; labels are class indices from 0. "
                        "Pass label_base=1 (mmfusion: --label-base 1) to shift them to 0.."
                        f"{len(classes) - 1}.")
    if labels.min() < 0:
        raise DataError(f"{path}: label {int(labels.min()) + (label_base or 0)} in '{key}' is below the label base "
                        f"{label_base or 0}.")
    return labels.astype(np.int32)


def _oriented(path, name, matrix, samples):
    """``matrix`` as ``(samples, features)`` float32, its orientation read from ``samples``."""
    rows, columns = matrix.shape
    if rows == samples and columns == samples:
        raise DataError(f"{path}: {name} is {rows} x {columns} and there are {samples} labels: its orientation is "
                        "ambiguous (samples x features, or transposed); store it with one axis of another length.")
    if columns == samples:
        matrix = matrix.T
    elif rows != samples:
        raise DataError(f"{path}: {name} is {rows} x {columns}, but there are {samples} labels: neither axis "
                        "has one entry per sample.")
    return check_values(matrix, f"{path}: {name}", "sample", "feature")
