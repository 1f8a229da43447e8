import numpy as np
import pytest
import keras

import keras_mmfusion as mmf
from keras_mmfusion.costs import count_macs
from keras_mmfusion.training import classification_metrics


def test_macs_of_dense_layers_and_fusion_layers():
    assert count_macs(keras.layers.Dense(7), [5]) == 35
    assert count_macs(mmf.ConcatFusion(6), [3, 5]) == 8 * 6
    assert count_macs(mmf.LowRankTensorFusion(6, rank=2), [3, 5]) == 2 * (4 + 6) * 6 + 2 * 6
    assert count_macs(mmf.TensorFusion(4), [2, 3]) == 3 * 4 * 4


def test_solver_loop_body_is_counted_per_trip():
    layer = mmf.DEQFusion(8, max_iter=5)
    one, three = count_macs(layer, [8, 8], loop_trips=1), count_macs(layer, [8, 8], loop_trips=3)
    per_trip = (three - one) / 2
    # One update evaluation: two modality blocks (2 Dense 8x8 each) and the fusion block
    # (a gate per modality and the combine layer), plus any products of Anderson's step.
    # Every evaluation is inside the loop, so nothing is counted outside it.
    update = 2 * 2 * 64 + 2 * 64 + 64
    assert per_trip >= update and one == per_trip


def test_classification_metrics_match_hand_computed_values():
    labels = np.array([0, 0, 1, 1, 1])
    probabilities = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.7, 0.3], [0.1, 0.9]])
    metrics = classification_metrics(labels, probabilities)
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    precision, recall = 2 / 3, 2 / 3
    f1_class_1 = 2 * precision * recall / (precision + recall)
    f1_class_0 = 2 * (1 / 2) * (1 / 2) / (1 / 2 + 1 / 2)  # predicted 0 twice, one right; 2 true 0s
    assert metrics["f1_binary"] == pytest.approx(f1_class_1, abs=1e-6)
    assert metrics["f1_macro"] == pytest.approx((f1_class_0 + f1_class_1) / 2, abs=1e-6)
    assert metrics["f1_weighted"] == pytest.approx((2 * f1_class_0 + 3 * f1_class_1) / 5, abs=1e-6)
    assert "auc_macro_ovr" not in metrics
    # AUC: pairs (positive score > negative score) / (3 x 2): 0.8>0.1,0.8>0.6,0.3>0.1,0.9>0.1,0.9>0.6 -> 5/6.
    assert metrics["auc"] == pytest.approx(5 / 6, abs=2e-3)


def test_multiclass_metrics_name_macro_and_weighted_f1():
    labels = np.array([0, 0, 0, 0, 1, 2])
    probabilities = np.eye(3)[[0, 0, 0, 1, 1, 1]] * 0.8 + 0.2 / 3
    metrics = classification_metrics(labels, probabilities)
    f1 = {0: 2 * 1.0 * 0.75 / 1.75, 1: 2 * (1 / 3) * 1.0 / (4 / 3), 2: 0.0}  # from precision and recall
    assert metrics["f1_macro"] == pytest.approx(sum(f1.values()) / 3, abs=1e-6)
    assert metrics["f1_weighted"] == pytest.approx((4 * f1[0] + f1[1] + f1[2]) / 6, abs=1e-6)
    assert "f1_binary" not in metrics and "auc" not in metrics and 0 <= metrics["auc_macro_ovr"] <= 1
