"""Multi-omics data in the MOGONET CSV layout.

A folder holds, for each view ``N = 1, 2, ...``, the files ``N_tr.csv`` and ``N_te.csv``
(headerless, one sample a row) and the labels ``labels_tr.csv`` and ``labels_te.csv``.
The views are found by listing the folder, so neither their number nor their widths
are fixed. This is the layout in which the MOGONET authors (Wang et al., Nature
Communications 2021) released the preprocessed ROSMAP and BRCA data.
"""

import os
import re

import numpy as np

from keras_mmfusion.datasets.tabular import DataError, load_modalities

SPLITS = {"train": "tr", "test": "te"}


def find_views(folder):
    """The sorted view numbers ``N`` for which ``N_tr.csv`` exists in ``folder``."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: data folder not found.")
    views = sorted(int(m.group(1)) for f in os.listdir(folder) if (m := re.fullmatch(r"(\d+)_tr\.csv", f)))
    if not views:
        raise DataError(f"{folder}: no view files N_tr.csv found (expected e.g. 1_tr.csv, 1_te.csv, labels_tr.csv).")
    return views


def load_multiomics(folder, split="train", num_classes=None, header=False):
    """Read one split of a MOGONET-layout folder.

    Args:
        folder: the folder with ``N_tr.csv``, ``N_te.csv``, ``labels_tr.csv``, ...
        split: ``"train"`` or ``"test"``.
        num_classes: the declared number of classes, checked if given.
        header: whether every CSV file's first row is a header to skip.

    Returns:
        ``(inputs, labels)``: one float32 ``(n, d_N)`` array per view, in view order,
        and int32 labels.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}.")
    folder = os.fspath(folder)
    suffix = SPLITS[split]
    files = [os.path.join(folder, f"{v}_{suffix}.csv") for v in find_views(folder)]
    return load_modalities(files, os.path.join(folder, f"labels_{suffix}.csv"), num_classes, header)


def stratified_split(labels, fraction, seed):
    """Indices ``(keep, held_out)`` holding out ``fraction`` of every class."""
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        idx = np.nonzero(labels == c)[0]
        rng.shuffle(idx)
        held.extend(idx[: int(round(fraction * len(idx)))])
    held = np.sort(np.asarray(held, dtype=np.int64))
    keep = np.setdiff1d(np.arange(len(labels)), held)
    return keep, held
