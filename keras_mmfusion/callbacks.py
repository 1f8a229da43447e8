"""Training callbacks."""

import keras

from keras_mmfusion.validation import check_int


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

        found = [l for l in self.model._flatten_layers(include_self=False) if isinstance(l, DynamicFusion)]
        if not found:
            raise ValueError("TemperatureSchedule: the model has no DynamicFusion layer.")
        return found

    def on_epoch_begin(self, epoch, logs=None):
        for layer in self._layers():
            layer.temperature = self.value(epoch)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["dynmm_temperature"] = self.value(epoch)
