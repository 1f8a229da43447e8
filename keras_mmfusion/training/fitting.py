"""How every tool compiles and trains a classifier: Adam, sparse cross-entropy, early stopping."""

import math

import keras

from keras_mmfusion.callbacks import ClassifierLogs, EpochTimer
from keras_mmfusion.models import with_modality_heads
from keras_mmfusion.training.optimizers import CoupledDecayAdam
from keras_mmfusion.training.reproducibility import fixed_summation_order


def _optimizer(lr, clipnorm, weight_decay, epsilon, torch_epsilon=False):
    if clipnorm < 0:
        raise ValueError(f"clipnorm must be >= 0, got {clipnorm}.")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}.")
    options = {} if epsilon is None else {"epsilon": epsilon}
    return CoupledDecayAdam(lr, coupled_weight_decay=weight_decay, global_clipnorm=clipnorm or None,
                            torch_epsilon=torch_epsilon, **options)


def compile_classifier(model, lr=1e-3, jit_compile=False, modality_weight=0.0, weight_decay=0.0, clipnorm=0.0,
                       epsilon=None, torch_epsilon=False, loss_weight=1.0):
    """Compile ``model`` as every tool trains it: Adam, sparse cross-entropy, accuracy.

    Args:
        model: a classifier from :func:`keras_mmfusion.models.build_classifier` or
            :func:`keras_mmfusion.models.build_reference_classifier`.
        lr: Adam's learning rate.
        jit_compile: compile the training step with XLA.
        weight_decay: coupled L2 weight decay on every trainable variable, added to the
            gradient after clipping, as PyTorch's ``Adam(weight_decay=...)`` (see
            :class:`~keras_mmfusion.training.CoupledDecayAdam`); 0 for none.
        clipnorm: clip the gradients' global norm (over all variables together, as
            PyTorch's ``clip_grad_norm_``) to this value; 0 for no clipping.
        epsilon: Adam's epsilon; ``None`` for Keras's default (1e-7).
        torch_epsilon: add it where PyTorch's Adam does, to the bias-corrected
            ``sqrt(v)`` (see :class:`~keras_mmfusion.training.CoupledDecayAdam`).
        loss_weight: the weight of the classifier's cross-entropy in the loss; the
            layers' own losses (``add_loss``) keep their weights.
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
        model.compile(_optimizer(lr, clipnorm, weight_decay, epsilon, torch_epsilon), loss, loss_weights=loss_weight,
                      metrics=["accuracy"], jit_compile=jit_compile)
        return model
    trainer = with_modality_heads(model)
    names = list(trainer.output)
    trainer.compile(_optimizer(lr, clipnorm, weight_decay, epsilon, torch_epsilon), {n: loss for n in names},
                    loss_weights={n: loss_weight if n == "probabilities" else float(modality_weight) for n in names},
                    metrics={"probabilities": ["accuracy"]}, jit_compile=jit_compile)
    return trainer


def step_decay(lr, every, factor):
    """A ``keras.callbacks.LearningRateScheduler`` that starts at ``lr`` and multiplies it
    by ``factor`` after every ``every`` epochs."""
    if every < 1 or not 0 < factor <= 1:
        raise ValueError(f"Step decay needs every >= 1 and 0 < factor <= 1; got every={every}, factor={factor}.")
    return keras.callbacks.LearningRateScheduler(lambda epoch: lr * factor ** math.floor(epoch / every))


def fit_classifier(model, train, epochs, validation=None, batch_size=32, patience=20, lr=1e-3, monitor="val_loss",
                   modality_weight=0.0, verbose=0, callbacks=(), jit_compile=False, weight_decay=0.0, clipnorm=0.0,
                   lr_decay_every=0, lr_decay_factor=0.2, shuffle=True, epsilon=None, torch_epsilon=False,
                   loss_weight=1.0):
    """Compile and train a classifier; with validation data, stop early and keep the best epoch.

    Args:
        model: a classifier from :func:`keras_mmfusion.models.build_classifier`.
        train: ``(inputs, labels)``.
        epochs: the most epochs to run (all of them without ``validation``).
        validation: optional ``(inputs, labels)``; training then stops when
            ``monitor`` has not improved for ``patience`` epochs (with
            ``patience=0`` it runs all ``epochs``), and the weights of its best epoch
            are restored.
        callbacks: further callbacks; they run before the early stopping, so one
            that adds a value to the logs can be the ``monitor``.
        weight_decay, clipnorm, epsilon, torch_epsilon, loss_weight: see
            :func:`compile_classifier`.
        lr_decay_every, lr_decay_factor: with ``lr_decay_every`` > 0, the learning
            rate is multiplied by ``lr_decay_factor`` after every ``lr_decay_every``
            epochs (see :func:`step_decay`).
        modality_weight: see :func:`compile_classifier`. The logs and the history
            keep the classifier's names (see :class:`~keras_mmfusion.callbacks.ClassifierLogs`), so ``monitor``
            means the same with and without modality heads.
        shuffle: whether ``fit`` shuffles the training rows every epoch.

    ``fit`` runs with a fixed order of summation (:func:`~keras_mmfusion.training.fixed_summation_order`),
    so that one seed gives one training run, bit for bit, however TensorFlow's threads
    are scheduled.

    Returns:
        ``(history, timer)``: the Keras history dict and the :class:`~keras_mmfusion.callbacks.EpochTimer`.
    """
    trainer = compile_classifier(model, lr, jit_compile, modality_weight, weight_decay, clipnorm, epsilon,
                                 torch_epsilon, loss_weight)
    if trainer is not model:
        targets = lambda labels: {name: labels for name in trainer.output}  # noqa: E731
        train = (train[0], targets(train[1]))
        if validation is not None:
            validation = (validation[0], targets(validation[1]))
    timer = EpochTimer()
    # Renamed logs first and early stopping last, so that every callback sees the
    # classifier's names and a callback that adds a logged value can be monitored.
    order = [ClassifierLogs(), *callbacks, timer]
    if lr_decay_every:
        order.insert(0, step_decay(lr, lr_decay_every, lr_decay_factor))
    if validation is not None:
        mode = "min" if "loss" in monitor else "max"
        order.append(keras.callbacks.EarlyStopping(monitor, patience=patience or epochs, mode=mode,
                                                   restore_best_weights=True))
    build_before_tracing(trainer, *train)
    with fixed_summation_order():
        history = trainer.fit(*train, validation_data=validation, epochs=epochs, batch_size=batch_size,
                              verbose=verbose, callbacks=order, shuffle=shuffle)
    return history.history, timer


def build_before_tracing(model, x, y):
    """Create a compiled model's optimizer, metric and loss variables before ``fit`` or
    ``train_on_batch`` traces the training step. ``x`` and ``y`` are training inputs and
    labels as ``fit`` takes them (a batch or all of them); only their shapes are read.

    Without a distribution strategy, Keras creates them inside the first call of the
    step, and TensorFlow then traces the step a second time; for a DEQ classifier each
    trace takes seconds (the solver loops and their gradients), about half of the first
    epoch on small data. This is the build Keras runs itself under a strategy
    (``Trainer._symbolic_build``). Under a strategy, and on a Keras without that method,
    it does nothing.
    """
    build = getattr(model, "_symbolic_build", None)
    if build is None or getattr(model, "_distribute_strategy", None) is not None:
        return
    build(data_batch=(x, y))
