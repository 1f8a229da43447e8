import os

import numpy as np
import pytest

from keras_mmfusion.datasets import DataError, load_modalities, load_multiomics, read_labels, stratified_split

ROSMAP = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "rosmap")
needs_rosmap = pytest.mark.skipif(not os.path.isdir(ROSMAP), reason=f"ROSMAP data not found at {ROSMAP}")


def write_csv(path, rows):
    path.write_text("\n".join(",".join(str(v) for v in row) for row in rows) + "\n")
    return path


def mogonet_folder(tmp_path, n_train=6, n_test=4, widths=(3, 2)):
    rng = np.random.default_rng(0)
    for v, w in enumerate(widths, start=1):
        write_csv(tmp_path / f"{v}_tr.csv", rng.normal(size=(n_train, w)).round(4))
        write_csv(tmp_path / f"{v}_te.csv", rng.normal(size=(n_test, w)).round(4))
    write_csv(tmp_path / "labels_tr.csv", [[i % 2] for i in range(n_train)])
    write_csv(tmp_path / "labels_te.csv", [[i % 2] for i in range(n_test)])
    return tmp_path


@needs_rosmap
def test_rosmap_reader_shapes_counts_and_labels():
    x, y = load_multiomics(ROSMAP, "train", num_classes=2)
    xt, yt = load_multiomics(ROSMAP, "test", num_classes=2)
    assert [a.shape for a in x] == [(245, 200)] * 3
    assert [a.shape for a in xt] == [(106, 200)] * 3
    assert set(np.unique(y)) == {0, 1} and set(np.unique(yt)) == {0, 1}
    assert x[0].dtype == np.float32 and y.dtype == np.int32


@needs_rosmap
def test_tfds_builder_reads_rosmap_offline(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    import keras_mmfusion.datasets.tfds_multiomics  # noqa: F401 - registers the builder

    kwargs = {"download_config": tfds.download.DownloadConfig(manual_dir=ROSMAP)}
    train, info = tfds.load("mmf_multiomics/rosmap", split="train", data_dir=str(tmp_path),
                            download_and_prepare_kwargs=kwargs, with_info=True)
    assert info.splits["train"].num_examples == 245 and info.splits["test"].num_examples == 106
    assert info.features["label"].num_classes == 2
    examples = list(train.as_numpy_iterator())
    assert {tuple(sorted(e)) for e in examples} == {("label", "view_1", "view_2", "view_3")}
    assert all(e[f"view_{v}"].shape == (200,) for e in examples for v in (1, 2, 3))
    reference, labels = load_multiomics(ROSMAP, "train")
    np.testing.assert_array_equal(sorted(e["label"] for e in examples), sorted(labels))
    first = {tuple(e["view_1"][:5]) for e in examples}
    assert tuple(reference[0][0][:5]) in first


def test_tfds_builder_rejects_a_folder_with_another_view_count(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    import keras_mmfusion.datasets.tfds_multiomics  # noqa: F401

    (tmp_path / "data").mkdir()
    folder = mogonet_folder(tmp_path / "data", widths=(3, 2))
    kwargs = {"download_config": tfds.download.DownloadConfig(manual_dir=str(folder))}
    with pytest.raises(DataError, match=r"found 2 views \[1, 2\], but config 'rosmap' declares 3"):
        tfds.load("mmf_multiomics/rosmap", data_dir=str(tmp_path / "tfds"), download_and_prepare_kwargs=kwargs)


def test_reader_finds_any_number_of_views_and_widths(tmp_path):
    (tmp_path / "d").mkdir()
    folder = mogonet_folder(tmp_path / "d", widths=(4, 1, 7, 2))
    x, y = load_multiomics(folder, "test")
    assert [a.shape for a in x] == [(4, 4), (4, 1), (4, 7), (4, 2)] and y.shape == (4,)


def test_missing_file_is_named(tmp_path):
    (tmp_path / "d").mkdir()
    folder = mogonet_folder(tmp_path / "d")
    os.remove(folder / "2_te.csv")
    with pytest.raises(DataError, match=r"2_te\.csv: file not found"):
        load_multiomics(folder, "test")


def test_row_counts_that_differ_between_views(tmp_path):
    (tmp_path / "d").mkdir()
    folder = mogonet_folder(tmp_path / "d")
    write_csv(folder / "2_tr.csv", np.ones((5, 2)))
    with pytest.raises(DataError, match=r"2_tr\.csv has 5 rows but the labels file .*labels_tr\.csv has 6"):
        load_multiomics(folder, "train")


def test_non_numeric_cell_names_file_row_and_column(tmp_path):
    path = write_csv(tmp_path / "m.csv", [[1, 2], [3, "abc"], [5, 6]])
    with pytest.raises(DataError, match=r"m\.csv: row 2, column 2: cannot read 'abc' as a number"):
        load_modalities([path, path], write_csv(tmp_path / "labels.csv", [[0], [1], [0]]))


def test_label_outside_the_declared_classes(tmp_path):
    path = write_csv(tmp_path / "labels.csv", [[0], [1], [2], [1]])
    with pytest.raises(DataError, match=r"labels\.csv: row 3: label 2 is outside the declared classes 0\.\.1"):
        read_labels(path, num_classes=2)
    with pytest.raises(DataError, match=r"row 2: label 0.5 is not an integer"):
        read_labels(write_csv(tmp_path / "l2.csv", [[0], [0.5]]))


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_nan_or_inf_values_are_refused(tmp_path, bad):
    path = write_csv(tmp_path / "m.csv", [[1, 2], [3, 4], [5, bad]])
    with pytest.raises(DataError, match=r"m\.csv: row 3, column 2 is .*NaN and infinite values are not allowed"):
        load_modalities([path, path], write_csv(tmp_path / "labels.csv", [[0], [1], [0]]))
    np.save(tmp_path / "m.npy", np.array([[1.0, float(bad)]]))
    with pytest.raises(DataError, match=r"m\.npy: row 1, column 2"):
        load_modalities([tmp_path / "m.npy"], write_csv(tmp_path / "l1.csv", [[0]]))


def test_generic_reader_mixes_csv_and_npy(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(6.0).reshape(3, 2))
    write_csv(tmp_path / "b.csv", [[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    x, y = load_modalities([tmp_path / "a.npy", tmp_path / "b.csv"], write_csv(tmp_path / "labels.csv", [[1], [0], [2]]))
    assert [a.shape for a in x] == [(3, 2), (3, 3)]
    np.testing.assert_array_equal(y, [1, 0, 2])


def test_stratified_split_holds_out_each_class_proportionally():
    labels = np.array([0] * 50 + [1] * 30)
    keep, held = stratified_split(labels, 0.2, seed=3)
    assert len(np.intersect1d(keep, held)) == 0 and len(keep) + len(held) == 80
    assert (labels[held] == 0).sum() == 10 and (labels[held] == 1).sum() == 6
    again, _ = stratified_split(labels, 0.2, seed=3)
    np.testing.assert_array_equal(keep, again)


def test_values_whose_square_overflows_float32_are_refused(tmp_path):
    write_csv(tmp_path / "a.csv", [[1.0, 2.0], [3.0, 1e30]])
    write_csv(tmp_path / "labels.csv", [[0], [1]])
    with pytest.raises(DataError, match=r"a.csv: row 2, column 2 is 1e\+30; values beyond 1.84e\+19 .* overflow"):
        load_modalities([tmp_path / "a.csv"], tmp_path / "labels.csv")
    write_csv(tmp_path / "a.csv", [[1.0, 2.0], [3.0, 1e18]])  # large, but its square fits
    assert load_modalities([tmp_path / "a.csv"], tmp_path / "labels.csv")[0][0][1, 1] == np.float32(1e18)


def test_splits_are_checked_against_each_other_before_training(tmp_path):
    from keras_mmfusion.training import load_splits

    folder = mogonet_folder(tmp_path)
    assert load_splits(str(folder)).num_classes == 2
    write_csv(folder / "2_te.csv", np.zeros((4, 3)))
    with pytest.raises(DataError, match="modality 1: 2_tr.csv has 2 features but 2_te.csv has 3"):
        load_splits(str(folder))
    write_csv(folder / "2_te.csv", np.zeros((4, 2)))
    write_csv(folder / "labels_te.csv", [[0], [0], [0], [2]])
    with pytest.raises(DataError, match=r"class \[2\] does not occur in labels_tr.csv \(labels_tr.csv: class 0: 3, "
                                         r"class 1: 3, class 2: 0; labels_te.csv: class 0: 3, class 1: 0, class 2: 1\)"):
        load_splits(str(folder))
    write_csv(folder / "labels_tr.csv", [[0], [2]] * 3)
    with pytest.raises(DataError, match=r"without gaps; no sample has label \[1\] \(labels_tr.csv: class 0: 3, "
                                         r"class 2: 3; labels_te.csv: class 0: 3, class 2: 1\)"):
        load_splits(str(folder))
    write_csv(folder / "labels_tr.csv", [[0], [1]] * 3)
    write_csv(folder / "labels_te.csv", [[0], [0], [0], [0]])
    with pytest.raises(DataError, match=r"class \[1\] does not occur in labels_te.csv \(labels_tr.csv: class 0: 3, "
                                         r"class 1: 3; labels_te.csv: class 0: 4, class 1: 0\)"):
        load_splits(str(folder))


def test_generic_folder_labels_with_a_gap_are_refused(tmp_path):
    from keras_mmfusion.training import load_splits

    write_csv(tmp_path / "a.csv", np.zeros((10, 2)))
    write_csv(tmp_path / "b.csv", np.zeros((10, 3)))
    write_csv(tmp_path / "labels.csv", [[0], [2]] * 5)
    with pytest.raises(DataError, match=r"no sample has label \[1\] \(labels.csv: class 0: 5, class 2: 5\)"):
        load_splits(str(tmp_path))


def with_header(tmp_path, header, n=6, widths=(3, 2)):
    """A MOGONET folder whose every CSV file starts with the row ``header(width)``."""
    folder = mogonet_folder(tmp_path, n_train=n, widths=widths)
    for path in folder.glob("*.csv"):
        rows = [line.split(",") for line in path.read_text().split()]
        write_csv(path, [header(len(rows[0]))] + rows)
    return folder


@pytest.mark.parametrize("header, seen", [
    (lambda w: [f"feature_{j}" for j in range(w)], r"cannot read 'feature_0' as a number\. It looks like a header"),
    (lambda w: list(range(1, w + 1)) if w > 1 else ["label"], r"row 1 is 1, 2, \.\.\., 3, which looks like a header"),
])
def test_a_header_row_is_refused_unless_declared_and_then_skipped(tmp_path, header, seen):
    folder = with_header(tmp_path, header)
    with pytest.raises(DataError, match=seen + r".*header=True \(mmfusion: --header\)"):
        load_multiomics(folder, "train")
    x, y = load_multiomics(folder, "train", header=True)
    (tmp_path / "plain").mkdir()
    expected_x, expected_y = load_multiomics(mogonet_folder(tmp_path / "plain", n_train=6), "train")
    assert [a.shape for a in x] == [(6, 3), (6, 2)]
    np.testing.assert_array_equal(y, expected_y)
    for got, expected in zip(x, expected_x):
        np.testing.assert_array_equal(got, expected)


def test_rows_are_numbered_as_in_the_file_when_a_header_is_skipped(tmp_path):
    path = write_csv(tmp_path / "m.csv", [["a", "b"], [1, 2], [3, "nan"]])
    with pytest.raises(DataError, match=r"m\.csv: row 3, column 2 is nan"):
        load_modalities([path, path], write_csv(tmp_path / "l.csv", [["y"], [0], [1]]), header=True)
    labels = write_csv(tmp_path / "labels.csv", [["y"], [0], [3]])
    with pytest.raises(DataError, match=r"labels\.csv: row 3: label 3 is outside"):
        read_labels(labels, num_classes=2, header=True)


def test_a_numeric_first_row_that_is_not_column_numbers_is_data(tmp_path):
    path = write_csv(tmp_path / "m.csv", [[1, 2, 4], [3, 4, 5]])
    x, _ = load_modalities([path, path], write_csv(tmp_path / "labels.csv", [[0], [1]]))
    np.testing.assert_array_equal(x[0], [[1, 2, 4], [3, 4, 5]])
