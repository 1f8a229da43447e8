import numpy as np
import pytest
import tensorflow as tf

from keras_mmfusion.datasets import make_synthetic


def ridge_accuracy(features, labels, train=1500):
    """Accuracy of a least-squares linear classifier fit on the first ``train`` rows."""
    x = np.hstack([features, np.ones((len(features), 1))])
    target = 2.0 * labels - 1
    w = np.linalg.solve(x[:train].T @ x[:train] + 1e-3 * np.eye(x.shape[1]), x[:train].T @ target[:train])
    return np.mean((x[train:] @ w > 0) == (labels[train:] == 1))


def test_shapes_dtypes_and_determinism():
    a, y = make_synthetic(100, num_modalities=3, widths=[4, 5, 6], seed=7)
    b, y2 = make_synthetic(100, num_modalities=3, widths=[4, 5, 6], seed=7)
    c, _ = make_synthetic(100, num_modalities=3, widths=[4, 5, 6], seed=8)
    assert [x.shape for x in a] == [(100, 4), (100, 5), (100, 6)]
    assert all(x.dtype == np.float32 for x in a) and y.dtype == np.int32
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    np.testing.assert_array_equal(y, y2)
    assert not np.allclose(a[0], c[0])
    assert set(np.unique(y)) == {0, 1}


def test_no_single_modality_and_no_linear_model_solves_it():
    inputs, labels = make_synthetic(3000, widths=16, seed=0)
    assert ridge_accuracy(np.hstack(inputs), labels) < 0.58
    for x in inputs:
        assert ridge_accuracy(x, labels) < 0.58


def test_label_is_the_parity_of_the_recoverable_codes():
    # Nearest-prototype decoding of each modality's code, then parity, recovers the label:
    # the task is solvable, and only by combining modalities.
    inputs, labels = make_synthetic(2000, widths=16, noise=0.5, seed=1)
    codes = []
    for x in inputs:
        # Two prototypes per modality; the sign along their difference decodes the code.
        centre = x.mean(axis=0)
        direction = np.linalg.svd(x - centre, full_matrices=False)[2][0]
        codes.append(((x - centre) @ direction > 0).astype(int))
    parity = np.sum(codes, axis=0) % 2
    agreement = max(np.mean(parity == labels), np.mean(parity != labels))
    assert agreement > 0.95


def test_easy_samples_are_decided_by_modality_zero():
    inputs, labels, easy = make_synthetic(4000, widths=16, easy_fraction=0.5, seed=2, return_easy_mask=True)
    assert 0.45 < easy.mean() < 0.55
    x0 = inputs[0]
    acc_easy = ridge_accuracy(x0[easy], labels[easy], train=1000)
    acc_hard = ridge_accuracy(x0[~easy], labels[~easy], train=1000)
    assert acc_easy > 0.9
    assert acc_hard < 0.6


def test_dataset_output():
    data = make_synthetic(64, widths=4, num_classes=3, as_dataset=True, batch_size=16)
    (x0, x1, x2), y = next(iter(data))
    assert x0.shape == (16, 4) and y.shape == (16,)
    assert y.dtype == tf.int32
    assert int(tf.reduce_max(y)) <= 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_modalities=1), "num_modalities"),
        (dict(widths=[4, 4]), "widths"),
        (dict(num_classes=1), "num_classes"),
        (dict(easy_fraction=1.5), "easy_fraction"),
        (dict(noise=-1), "noise"),
        (dict(batch_size=8), "batch_size is only used"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_synthetic(10, **kwargs)
