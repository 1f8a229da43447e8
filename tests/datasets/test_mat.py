"""``load_mat``: multi-view .mat files as MATLAB v5 (scipy) and v7.3 (HDF5) write them."""

import sys

import h5py
import numpy as np
import pytest
import scipy.io
import scipy.sparse

from keras_mmfusion.datasets import DataError, load_mat
from keras_mmfusion.datasets.mat import LABEL_KEYS

SAMPLES = 12


def views_and_labels(seed=0):
    rng = np.random.default_rng(seed)
    views = [rng.normal(size=(SAMPLES, 5)), rng.normal(size=(SAMPLES, 3))]
    labels = np.arange(SAMPLES) % 3
    return views, labels


def cell_array(matrices):
    cells = np.empty((1, len(matrices)), dtype=object)
    for i, m in enumerate(matrices):
        cells[0, i] = m
    return cells


def write_v5(path, views, labels, labels_key="gt", views_key="X"):
    scipy.io.savemat(path, {views_key: cell_array(views), labels_key: labels.reshape(-1, 1).astype(float)})


def write_v73(path, views, labels, labels_key="gt"):
    """A MATLAB v7.3 file: HDF5 behind a 512-byte MATLAB header, matrices column-major
    (stored transposed), the cell array as object references into '#refs#'."""
    with h5py.File(path, "w", userblock_size=512) as handle:
        refs = handle.create_group("#refs#")
        cells = handle.create_dataset("X", (len(views), 1), dtype=h5py.ref_dtype)
        for i, view in enumerate(views):
            cells[i, 0] = refs.create_dataset(f"v{i}", data=np.asarray(view).T).ref
        handle.create_dataset(labels_key, data=labels.reshape(1, -1).astype(float))
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Sun Dec  6 07:40:00 2026 HDF5 schema 1.00 ."
    with open(path, "r+b") as handle:
        handle.write(header.ljust(116) + b"\0" * 8 + b"\x00\x02" + b"IM")


@pytest.mark.parametrize("labels_key", LABEL_KEYS)
@pytest.mark.parametrize("writer", [write_v5, write_v73])
def test_views_in_either_orientation_and_labels_under_each_name(tmp_path, writer, labels_key, capsys):
    views, labels = views_and_labels()
    path = tmp_path / "data.mat"
    # The second view is stored features x samples.
    writer(path, [views[0], views[1].T], labels, labels_key=labels_key)
    inputs, read = load_mat(path)
    assert [x.shape for x in inputs] == [(SAMPLES, 5), (SAMPLES, 3)] and all(x.dtype == np.float32 for x in inputs)
    np.testing.assert_allclose(inputs[0], views[0], rtol=1e-6)
    np.testing.assert_allclose(inputs[1], views[1], rtol=1e-6)
    np.testing.assert_array_equal(read, labels)
    assert read.dtype == np.int32
    assert f"2 views from 'X' of widths [5, 3], {SAMPLES} samples, 3 classes from '{labels_key}'" in (
        capsys.readouterr().out)


@pytest.mark.parametrize("writer", [write_v5, write_v73])
def test_one_based_labels_are_refused_unless_the_base_is_given(tmp_path, writer):
    views, labels = views_and_labels()
    path = tmp_path / "data.mat"
    writer(path, views, labels + 1)
    with pytest.raises(DataError, match=r"labels in 'gt' are 1..3; .* Pass label_base=1 \(mmfusion: --label-base 1\)"):
        load_mat(path)
    np.testing.assert_array_equal(load_mat(path, label_base=1, verbose=0)[1], labels)
    # Base 0 says the labels are indices already: 1..3 then leaves class 0 empty, for the
    # class checks to refuse; a base of 1 under labels from 0 is refused here.
    np.testing.assert_array_equal(load_mat(path, label_base=0, verbose=0)[1], labels + 1)
    writer(path, views, labels)
    with pytest.raises(DataError, match="label 0 in 'gt' is below the label base 1"):
        load_mat(path, label_base=1)


def test_an_ambiguous_or_mismatched_orientation_is_refused(tmp_path):
    views, labels = views_and_labels()
    path = tmp_path / "data.mat"
    write_v5(path, [views[0], np.ones((SAMPLES, SAMPLES))], labels)
    with pytest.raises(DataError, match=r"X\{2\} is 12 x 12 and there are 12 labels: its orientation is ambiguous"):
        load_mat(path)
    write_v5(path, [views[0], np.ones((7, 4))], labels)
    with pytest.raises(DataError, match=r"X\{2\} is 7 x 4, but there are 12 labels"):
        load_mat(path)


def test_sparse_views_are_made_dense_only_below_the_limit(tmp_path):
    views, labels = views_and_labels()
    path = tmp_path / "data.mat"
    write_v5(path, [views[0], scipy.sparse.csc_matrix(views[1])], labels)
    np.testing.assert_allclose(load_mat(path, verbose=0)[0][1], views[1], rtol=1e-6)
    with pytest.raises(DataError, match=r"X\{2\} is a sparse 12 x 3 matrix, 0 MiB as dense float32, above the 0 MiB"):
        load_mat(path, max_dense_bytes=100)


def test_bad_values_and_missing_variables_are_named(tmp_path):
    views, labels = views_and_labels()
    path = tmp_path / "data.mat"
    views[1][4, 2] = np.nan
    write_v5(path, views, labels)
    with pytest.raises(DataError, match=r"data.mat: X\{2\}: sample 5, feature 3 is nan"):
        load_mat(path)
    scipy.io.savemat(path, {"X": cell_array(views), "classes": labels})
    with pytest.raises(DataError, match=r"no labels \(named gt, Y, .*\) found; the file holds X, classes"):
        load_mat(path)
    path.write_bytes(b"not a MATLAB file at all" * 10)
    with pytest.raises(DataError, match="not a readable MATLAB file"):
        load_mat(path)


def test_variables_other_than_the_views_and_labels_are_not_read(tmp_path):
    """Files such as the public handwritten-digits one hold a cell array of view names
    beside the views; a struct or a string is no view either."""
    views, labels = views_and_labels()
    v5, v73 = tmp_path / "v5.mat", tmp_path / "v73.mat"
    scipy.io.savemat(v5, {"X": cell_array(views), "Y": labels.reshape(-1, 1).astype(np.uint8),
                          "feas": cell_array([np.array(["pixel"]), np.array(["fourier"])]),
                          "info": {"source": "a struct"}, "title": "digits"})
    write_v73(v73, views, labels, labels_key="Y")
    with h5py.File(v73, "a") as handle:
        names = handle.create_dataset("feas", (2, 1), dtype=h5py.ref_dtype)
        for i, name in enumerate(["pixel", "fourier"]):
            chars = handle["#refs#"].create_dataset(f"n{i}", data=np.frombuffer(name.encode(), np.uint8)[:, None])
            chars.attrs["MATLAB_class"] = np.bytes_("char")
            names[i, 0] = chars.ref
        handle.create_group("info").attrs["MATLAB_class"] = np.bytes_("struct")
    for path in (v5, v73):
        inputs, read = load_mat(path, verbose=0)
        np.testing.assert_allclose(inputs[0], views[0], rtol=1e-6)
        np.testing.assert_allclose(inputs[1], views[1], rtol=1e-6)
        np.testing.assert_array_equal(read, labels)
    scipy.io.savemat(v5, {"X": cell_array(views), "gt": cell_array([labels[:6], labels[6:]])})
    with pytest.raises(DataError, match=r"labels 'gt' must be a vector, got a cell array of 2"):
        load_mat(v5)


def test_without_the_extra_the_error_names_it(tmp_path, monkeypatch):
    views, labels = views_and_labels()
    v5, v73 = tmp_path / "v5.mat", tmp_path / "v73.mat"
    write_v5(v5, views, labels)
    write_v73(v73, views, labels)
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(DataError, match=r"v7.3 files needs h5py: pip install 'keras_mmfusion\[mat\]'"):
        load_mat(v73)
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    with pytest.raises(DataError, match=r"reading .mat files needs scipy: pip install 'keras_mmfusion\[mat\]'"):
        load_mat(v5)


def test_the_tfds_builder_builds_from_a_mat_file_with_the_protocols_test_rows(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from keras_mmfusion.datasets.tfds_multiview import MultiviewConfig
    from keras_mmfusion.training import load_splits

    views, _ = views_and_labels()
    labels = np.arange(SAMPLES) % 2 + 1
    (tmp_path / "manual").mkdir()
    write_v73(tmp_path / "manual" / "toy.mat", [views[0].T, views[1]], labels, labels_key="Y")
    config = MultiviewConfig(name="toy", num_views=2, num_classes=2, label_base=1, test_fraction=0.25, split_seed=3)
    builder = tfds.builder("mmf_multiview", config=config, data_dir=str(tmp_path / "tfds"))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "manual")))
    test = sorted(builder.as_dataset(split="test").as_numpy_iterator(), key=lambda e: tuple(e["view_1"]))
    # The test split holds the rows that load_splits (and so mmfusion train) tests on.
    splits = load_splits(str(tmp_path / "manual" / "toy.mat"), seed=3, label_base=1, test_fraction=0.25)
    expected = sorted(zip(*splits.test[0], splits.test[1]), key=lambda row: tuple(row[0]))
    assert len(test) == len(expected) == 4 and builder.info.splits["train"].num_examples == 8
    for example, (view_1, view_2, label) in zip(test, expected):
        np.testing.assert_array_equal(example["view_1"], view_1)
        np.testing.assert_array_equal(example["view_2"], view_2)
        assert example["label"] == label
    wrong = MultiviewConfig(name="toy", num_views=3, num_classes=2, label_base=1)
    with pytest.raises(DataError, match="2 views and 2 classes, but config 'toy' declares 3 and 2"):
        tfds.builder("mmf_multiview", config=wrong, data_dir=str(tmp_path / "tfds2")).download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "manual")))
