"""Scores of predicted class probabilities: accuracy, F1 scores and ROC AUC."""

import keras
import numpy as np


def headline_metrics(num_classes):
    """The metrics a results table reports: accuracy, binary F1 and AUC for two classes;
    accuracy, macro F1 and weighted F1 (the multi-omics literature's) for more."""
    return ("accuracy", "f1_binary", "auc") if num_classes == 2 else ("accuracy", "f1_macro", "f1_weighted")


def classification_metrics(labels, probabilities):
    """Accuracy, F1 scores and ROC AUC of predicted class probabilities.

    Returns ``accuracy``, ``f1_macro`` (the mean of the per-class F1 scores) and
    ``f1_weighted`` (their mean weighted by each class's number of samples); for two
    classes also ``f1_binary`` (the F1 of class 1) and ``auc`` (the ROC AUC of class 1's
    probability), for more classes ``auc_macro_ovr`` (the macro one-vs-rest ROC AUC).
    """
    labels = np.asarray(labels).astype("int64")
    probabilities = np.asarray(probabilities, dtype="float32")
    num_classes = probabilities.shape[-1]
    onehot = keras.utils.to_categorical(labels, num_classes)
    f1 = keras.metrics.F1Score(average=None, threshold=None)
    f1.update_state(onehot, probabilities)
    per_class = np.asarray(f1.result())
    auc = keras.metrics.AUC(num_thresholds=2000, multi_label=num_classes > 2)
    if num_classes == 2:
        auc.update_state(labels, probabilities[:, 1])
    else:
        auc.update_state(onehot, probabilities)
    support = np.bincount(labels, minlength=num_classes)
    metrics = {
        "accuracy": float(np.mean(np.argmax(probabilities, -1) == labels)),
        "f1_macro": float(per_class.mean()),
        "f1_weighted": float(np.sum(per_class * support) / max(support.sum(), 1)),
    }
    if num_classes == 2:
        metrics.update(f1_binary=float(per_class[1]), auc=float(auc.result()))
    else:
        metrics["auc_macro_ovr"] = float(auc.result())
    return metrics
