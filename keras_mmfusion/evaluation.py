"""Classification metrics and the train-on-validation protocol shared by the tools."""

import time

import keras
import numpy as np


def classification_metrics(labels, probabilities):
    """Accuracy, F1 and (for two classes) ROC AUC of predicted class probabilities.

    For two classes F1 is that of class 1 and AUC that of its probability; for more
    classes F1 is the macro average and AUC is the macro one-vs-rest average.
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
    return {
        "accuracy": float(np.mean(np.argmax(probabilities, -1) == labels)),
        "f1": float(per_class[1] if num_classes == 2 else per_class.mean()),
        "auc": float(auc.result()),
    }


class EpochTimer(keras.callbacks.Callback):
    """Records the wall time of every training epoch in ``self.times``."""

    def on_train_begin(self, logs=None):
        self.times = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self._start)


def compile_classifier(model, lr=1e-3, jit_compile=False):
    """Compile ``model`` as every tool trains it: Adam, sparse cross-entropy, accuracy."""
    model.compile(keras.optimizers.Adam(lr), "sparse_categorical_crossentropy", metrics=["accuracy"],
                  jit_compile=jit_compile)


def fit_with_validation(model, train, validation, epochs, batch_size=32, patience=20, lr=1e-3,
                        monitor="val_loss", verbose=0, callbacks=(), jit_compile=False):
    """Train with early stopping on the validation split and keep the best epoch.

    Returns:
        ``(history, timer)``: the Keras history dict and the :class:`EpochTimer`.
    """
    compile_classifier(model, lr, jit_compile)
    timer = EpochTimer()
    mode = "min" if "loss" in monitor else "max"
    stop = keras.callbacks.EarlyStopping(monitor, patience=patience, mode=mode, restore_best_weights=True)
    history = model.fit(*train, validation_data=validation, epochs=epochs, batch_size=batch_size,
                        verbose=verbose, callbacks=[stop, timer, *callbacks])
    return history.history, timer
