"""How every tool compiles and trains a classifier: Adam, sparse cross-entropy, early stopping."""

import keras

from keras_mmfusion.callbacks import ClassifierLogs, EpochTimer
from keras_mmfusion.models import with_modality_heads


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
            keep the classifier's names (see :class:`~keras_mmfusion.callbacks.ClassifierLogs`), so ``monitor``
            means the same with and without modality heads.

    Returns:
        ``(history, timer)``: the Keras history dict and the :class:`~keras_mmfusion.callbacks.EpochTimer`.
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
