"""Classification metrics and the train-on-validation protocol shared by the tools."""

import time

import keras
import numpy as np

from keras_mmfusion.models import with_modality_heads


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


class EpochTimer(keras.callbacks.Callback):
    """Records the wall time of every training epoch in ``self.times``."""

    def on_train_begin(self, logs=None):
        self.times = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self._start)


def compile_classifier(model, lr=1e-3, jit_compile=False, modality_weight=0.0):
    """Compile ``model`` as every tool trains it: Adam, sparse cross-entropy, accuracy.

    Args:
        model: a classifier from :func:`keras_mmfusion.models.build_classifier`.
        lr: Adam's learning rate.
        jit_compile: compile the training step with XLA.
        modality_weight: with a positive weight, the model compiled is
            :func:`keras_mmfusion.models.with_modality_heads` of ``model``, whose
            per-modality cross-entropies are added to the classifier's, each times
            this weight.

    Returns:
        The compiled model to fit: ``model``, or the model with modality heads, which
        expects the labels once per output (see :func:`fit_classifier`). In the
        second case ``model`` itself stays uncompiled (the optimizer's state belongs
        to the model with heads); it predicts, saves and exports as it is.
    """
    if modality_weight < 0:
        raise ValueError(f"modality_weight must be >= 0, got {modality_weight}.")
    loss = "sparse_categorical_crossentropy"
    if not modality_weight:
        model.compile(keras.optimizers.Adam(lr), loss, metrics=["accuracy"], jit_compile=jit_compile)
        return model
    trainer = with_modality_heads(model)
    names = list(trainer.output)
    trainer.compile(keras.optimizers.Adam(lr), {n: loss for n in names},
                    loss_weights={n: 1.0 if n == "probabilities" else float(modality_weight) for n in names},
                    metrics={"probabilities": ["accuracy"]}, jit_compile=jit_compile)
    return trainer


class ClassifierLogs(keras.callbacks.Callback):
    """Log a model with modality heads under its classifier's names.

    At the end of each epoch, ``loss`` and ``accuracy`` (and their ``val_`` forms)
    become those of the ``probabilities`` output, and the weighted sum of all losses,
    which Keras logs as ``loss``, is kept as ``total_loss``. Callbacks listed after this
    one, and the history, see these names.
    """

    def on_epoch_end(self, epoch, logs=None):
        if not logs:
            return
        for prefix in ("", "val_"):
            if f"{prefix}probabilities_loss" not in logs:
                continue
            logs[f"{prefix}total_loss"] = logs[f"{prefix}loss"]
            logs[f"{prefix}loss"] = logs.pop(f"{prefix}probabilities_loss")
            if f"{prefix}probabilities_accuracy" in logs:
                logs[f"{prefix}accuracy"] = logs.pop(f"{prefix}probabilities_accuracy")


def fit_classifier(model, train, epochs, validation=None, batch_size=32, patience=20, lr=1e-3, monitor="val_loss",
                   modality_weight=0.0, verbose=0, callbacks=(), jit_compile=False):
    """Compile and train a classifier; with validation data, stop early and keep the best epoch.

    Args:
        model: a classifier from :func:`keras_mmfusion.models.build_classifier`.
        train: ``(inputs, labels)``.
        epochs: the most epochs to run (all of them without ``validation``).
        validation: optional ``(inputs, labels)``; training then stops when
            ``monitor`` has not improved for ``patience`` epochs, and the weights of
            its best epoch are restored.
        callbacks: further callbacks; they run before the early stopping, so one
            that adds a value to the logs can be the ``monitor``.
        modality_weight: see :func:`compile_classifier`. The logs and the history
            keep the classifier's names (see :class:`ClassifierLogs`), so ``monitor``
            means the same with and without modality heads.

    Returns:
        ``(history, timer)``: the Keras history dict and the :class:`EpochTimer`.
    """
    trainer = compile_classifier(model, lr, jit_compile, modality_weight)
    if trainer is not model:
        targets = lambda labels: {name: labels for name in trainer.output}  # noqa: E731
        train = (train[0], targets(train[1]))
        if validation is not None:
            validation = (validation[0], targets(validation[1]))
    timer = EpochTimer()
    # Renamed logs first and early stopping last, so that every callback sees the
    # classifier's names and a callback that adds a logged value can be monitored.
    order = [ClassifierLogs(), *callbacks, timer]
    if validation is not None:
        mode = "min" if "loss" in monitor else "max"
        order.append(keras.callbacks.EarlyStopping(monitor, patience=patience, mode=mode, restore_best_weights=True))
    history = trainer.fit(*train, validation_data=validation, epochs=epochs, batch_size=batch_size,
                          verbose=verbose, callbacks=order)
    return history.history, timer
