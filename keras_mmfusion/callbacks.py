"""Training callbacks."""

import time

import keras

from keras_mmfusion._internals import sublayers
from keras_mmfusion._checks import check_int


class TemperatureSchedule(keras.callbacks.Callback):
    """Anneal the routing temperature of every ``DynamicFusion`` layer exponentially.

    At the start of epoch ``e`` the temperature is
    ``start * (end / start) ** min(e / (epochs - 1), 1)``: ``start`` at the first
    epoch, ``end`` from epoch ``epochs - 1`` on.

    Args:
        start: the temperature of the first epoch.
        end: the final temperature.
        epochs: the number of epochs over which to anneal.
    """

    def __init__(self, start=5.0, end=0.5, epochs=10):
        super().__init__()
        for name, value in (("start", start), ("end", end)):
            if not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}.")
        check_int("epochs", epochs)
        self.start, self.end, self.epochs = float(start), float(end), epochs

    def value(self, epoch):
        """The temperature used in epoch ``epoch`` (0-based)."""
        fraction = min(epoch / max(self.epochs - 1, 1), 1.0)
        return self.start * (self.end / self.start) ** fraction

    def _layers(self):
        from keras_mmfusion.layers.dynamic import DynamicFusion

        found = [l for l in sublayers(self.model) if isinstance(l, DynamicFusion)]
        if not found:
            raise ValueError("TemperatureSchedule: the model has no DynamicFusion layer.")
        return found

    def on_epoch_begin(self, epoch, logs=None):
        for layer in self._layers():
            layer.temperature = self.value(epoch)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["dynmm_temperature"] = self.value(epoch)


class RoutedObjective(keras.callbacks.Callback):
    """Log the validation value of DynMM's training objective, for model selection.

    At the end of each epoch with validation data this adds
    ``logs[name] = logs[loss_key] + cost_weight * logs[cost_key]``: the validation loss
    plus the cost term, where the cost is the realised mean relative cost of the hard
    routing (``val_dynmm_cost``, logged by ``DynamicFusion``). Selecting on validation
    accuracy alone prefers the epochs that route everything to the expensive expert;
    this objective weighs accuracy against cost the way training does. List it before an
    ``EarlyStopping`` or ``ModelCheckpoint`` that monitors ``name``.

    Args:
        cost_weight: the weight of the cost term, normally the layer's ``cost_weight``.
        name: the log key written.
        loss_key: the validation loss key read.
        cost_key: the realised validation cost key read.
    """

    def __init__(self, cost_weight, name="val_dynmm_objective", loss_key="val_loss", cost_key="val_dynmm_cost"):
        super().__init__()
        if not (isinstance(cost_weight, (int, float)) and cost_weight >= 0):
            raise ValueError(f"cost_weight must be a non-negative number, got {cost_weight!r}.")
        self.cost_weight, self.name, self.loss_key, self.cost_key = float(cost_weight), name, loss_key, cost_key

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or self.loss_key not in logs:
            return
        if self.cost_key not in logs:
            raise ValueError(f"RoutedObjective: the logs have no {self.cost_key!r}; "
                             f"found {sorted(logs)}. Is there a DynamicFusion layer and validation data?")
        logs[self.name] = float(logs[self.loss_key]) + self.cost_weight * float(logs[self.cost_key])


class EpochTimer(keras.callbacks.Callback):
    """Records the wall time of every training epoch in ``self.times``."""

    def on_train_begin(self, logs=None):
        self.times = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self._start)


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
